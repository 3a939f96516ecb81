"""Multi-label data: an image carries a *set* of labels instead of one class.

A multi-label ``Split`` holds its labels as a float32 multi-hot matrix ``(N, K)`` (1 where
the image has the label) instead of the single-label ``(N,)`` int64 class indices. A run is
multi-label when its data is (a manifest ``labels`` column with ``cat;dog`` cells or one
0/1 column per class, an ``.npz`` whose ``y_train`` is a 0/1 matrix whose rows do not all
hold exactly one 1); ``--task single|multi`` overrides (:func:`as_task`).
"""

from __future__ import annotations

import dataclasses

import torch

from imgcls.errors import ImgclsError

SEPARATOR = ";"  # between the labels of one manifest cell: cat;dog
TASKS = ("auto", "single", "multi")


def is_multi(labels: torch.Tensor) -> bool:
    return labels.ndim == 2


def multi_hot(label_sets: list[list[int]], num_classes: int) -> torch.Tensor:
    y = torch.zeros(len(label_sets), num_classes, dtype=torch.float32)
    for i, s in enumerate(label_sets):
        y[i, s] = 1.0
    return y


def split_cell(cell: str) -> list[str]:
    """``"cat; dog"`` -> ``["cat", "dog"]`` (empty parts dropped, order kept, no repeats)."""
    return list(dict.fromkeys(p.strip() for p in cell.split(SEPARATOR) if p.strip()))


def label_counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    """Images per class: class indices counted, or a multi-hot matrix summed per column."""
    if is_multi(labels):
        return [int(v) for v in (labels > 0.5).sum(0).tolist()]
    return torch.bincount(labels, minlength=num_classes).tolist()


def strata(labels: torch.Tensor) -> torch.Tensor:
    """One stratum per image for a stratified hold-out / balanced sampling of multi-hot
    labels: its rarest label (images without labels form a stratum of their own). The cheap
    approximation of iterative stratification (Sechidis et al. 2011) that keeps every label
    in both parts; exact for single-label-per-image data."""
    if not is_multi(labels):
        return labels
    pos = labels > 0.5
    freq = pos.sum(0).float()
    rank = torch.where(pos, freq.expand_as(labels), torch.full_like(labels, float("inf")))
    key = rank.argmin(1)
    key[~pos.any(1)] = labels.shape[1]
    return key


def to_multi(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    if is_multi(labels):
        return labels
    return torch.nn.functional.one_hot(labels.long(), num_classes).float() if len(labels) \
        else torch.zeros(0, num_classes)


def to_single(labels: torch.Tensor, what: str) -> torch.Tensor:
    """Multi-hot rows with exactly one label as class indices; anything else is refused."""
    if not is_multi(labels):
        return labels
    n = (labels > 0.5).sum(1)
    bad = torch.nonzero(n != 1).flatten()
    if len(bad):
        i = int(bad[0])
        raise ImgclsError(f"{what} image {i} has {int(n[i])} labels, but --task single needs exactly one per image",
                          "drop --task single (the data is multi-label), or fix its labels")
    return labels.argmax(1)


def as_task(data, task: str):
    """``data`` (an ImageData) as a single- or multi-label data set: ``auto`` keeps what the
    data is; ``multi`` turns class indices into one-hot rows; ``single`` accepts multi-hot
    rows only when each has exactly one label."""
    if task not in TASKS:
        raise ImgclsError(f"unknown --task '{task}'", "use auto, single or multi")
    if task == "auto":
        return data

    def convert(split, name):
        if split is None:
            return None
        y = to_multi(split.labels, data.num_classes) if task == "multi" else to_single(split.labels, name)
        return dataclasses.replace(split, labels=y)

    return dataclasses.replace(data, train=convert(data.train, "train"), val=convert(data.val, "val"),
                               test=convert(data.test, "test"), notes=list(data.notes))


def relabel_multi(labels: torch.Tensor, mapping: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Multi-hot columns moved to a new class order (``mapping[old] = new``)."""
    out = torch.zeros(len(labels), num_classes, dtype=labels.dtype)
    out[:, mapping] = labels
    return out
