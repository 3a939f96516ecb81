"""Splits that do not leak: groups of images that must stay on one side of a split.

``--group-by`` names the group of every image, either

* a manifest COLUMN (``--group-by run`` with a ``path,label,run`` CSV), or
* a REGEX searched in the file path; the first capture group (the whole match when the
  pattern has none) is the group, e.g. ``--group-by 'patient_(\\d+)'``.

The held-out validation split (:func:`grouped_split`) and the folds of cross-validation
(:func:`folds`) then keep each group on one side: scikit-learn's ``StratifiedGroupKFold``
(class proportions kept as far as whole groups allow). :func:`groups_across_splits` is the
audit's check; :func:`leak_hint` the cheap near-duplicate check training runs when no group
is given.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from imgcls.data.records import ImageData, Split
from imgcls.errors import ImgclsError

NEAR_BITS = 3  # dHash Hamming distance counted as near-identical (as the audit's NEAR_DUP_BITS)
MIN_SIDE = 32  # smaller images get no near-duplicate check (see audit.audit_arrays)
MAX_BUCKET = 256  # band values shared by more images than this say nothing (flat images): skipped


def group_of(data: ImageData, split: Split, group_by: str) -> list[str]:
    """The group of every image of ``split`` (a split of ``data``), by manifest column or path regex."""
    if split.in_memory:
        raise ImgclsError(f"--group-by needs image files ({data.name} is an array data set)",
                          "give a folder or a CSV manifest with a group column")
    column = data.columns.get(group_by)  # manifest headers are lowercased: --group-by Run is the column 'run'
    column = data.columns.get(group_by.strip().lower()) if column is None else column
    if column is not None:
        return [column.get(str(p), "") for p in split.paths]
    try:
        rx = re.compile(group_by)
    except re.error as exc:
        cols = f" (manifest columns: {', '.join(sorted(data.columns))})" if data.columns else ""
        raise ImgclsError(f"--group-by '{group_by}' is neither a manifest column nor a valid regex: {exc}{cols}",
                          "give a column name, or a regex whose first capture group names the group") from None
    out, missed = [], []
    for p in split.paths:
        m = rx.search(str(p))
        if m is None:
            missed.append(p)
            out.append("")
        else:
            out.append(m.group(1) if rx.groups else m.group(0))
    if missed:
        cols = f"; the manifest's extra columns are {', '.join(sorted(data.columns))}" if data.columns else ""
        what = "none" if len(missed) == len(out) else f"{len(missed)}"
        raise ImgclsError(f"--group-by '{group_by}' matches {what} of the {len(out)} file paths "
                          f"(e.g. {Path(missed[0]).as_posix()}){cols}",
                          "fix the regex so it matches every path (its first capture group is the group)")
    return out


def _codes(groups: list[str]) -> np.ndarray:
    return np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)[1]


def folds(labels: torch.Tensor, k: int, seed: int, groups: list[str] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` stratified (and, with ``groups``, grouped) folds: ``[(train_idx, held_idx), ...]``."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    from imgcls.data.multilabel import strata

    y = strata(labels).numpy()  # multi-hot rows: stratified on each image's rarest label
    if groups is None:
        return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
    g = _codes(groups)
    if len(np.unique(g)) < k:
        raise ImgclsError(f"--group-by gives {len(np.unique(g))} group(s), fewer than the {k} folds",
                          "use fewer folds or a finer grouping")
    return list(StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y, g))


def grouped_split(labels: torch.Tensor, groups: list[str], fraction: float, seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep_idx, holdout_idx)``: about ``fraction`` of the images held out, whole groups
    only, stratified as far as the groups allow (one fold of ``round(1 / fraction)``)."""
    k = max(2, int(round(1.0 / fraction)))
    n_groups = len(set(groups))
    if n_groups < 2:
        raise ImgclsError(f"--group-by puts all {len(groups)} images in one group",
                          "a grouped hold-out needs two groups or more: check the column or regex")
    keep, hold = folds(labels, min(k, n_groups), seed, groups)[0]
    return torch.from_numpy(np.sort(keep)), torch.from_numpy(np.sort(hold))


def groups_across_splits(data: ImageData, group_by: str) -> list[tuple[str, list[str]]]:
    """Groups with images in more than one split: ``[(group, [splits]), ...]``."""
    where: dict[str, set[str]] = defaultdict(set)
    for name in ("train", "val", "test"):
        part = getattr(data, name)
        if part is not None and len(part):
            for g in group_of(data, part, group_by):
                where[g].add(name)
    order = ("train", "val", "test")
    return [(g, sorted(s, key=order.index)) for g, s in sorted(where.items()) if len(s) > 1]


# ---------------------------------------------------------------------- the cheap leak check
def _gray_small(images: torch.Tensor, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """9x8 area-resized grayscale and a flatness measure (the grayscale std at 16x16) of
    every image, a chunk at a time (a float copy of 50,000 decoded photos at once would not
    fit in memory). Area resizing is linear, so channels are resized first and weighted after."""
    small, std = [], []
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)

    def gray(x: torch.Tensor) -> torch.Tensor:
        return (x * weights).sum(1) if x.shape[1] == 3 else x.mean(1)

    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].float()
        small.append(gray(torch.nn.functional.interpolate(x, size=(8, 9), mode="area")))
        std.append(gray(torch.nn.functional.interpolate(x, size=(16, 16), mode="area")).flatten(1).std(1))
    return torch.cat(small), torch.cat(std)


def dhash(images: torch.Tensor) -> np.ndarray:
    """64-bit difference hashes of uint8 ``(N, C, H, W)`` images, vectorised (imagehash's
    dhash: grayscale, 9x8 area resize, left-right gradient signs). Written with torch
    rather than imagehash's per-image PIL calls: one pass for 50,000 images (~1 s)."""
    return _hash_bits(_gray_small(images)[0])


def _hash_bits(small: torch.Tensor) -> np.ndarray:
    bits = (small[:, :, 1:] > small[:, :, :-1]).reshape(len(small), 64).numpy().astype(np.uint64)
    return (bits << np.arange(63, -1, -1, dtype=np.uint64)).sum(1, dtype=np.uint64)


def _popcount(v: np.ndarray) -> np.ndarray:
    return np.unpackbits(v.view(np.uint8).reshape(len(v), 8), axis=1).sum(1)


def near_pairs_across(a: np.ndarray, b: np.ndarray, max_bits: int = NEAR_BITS) -> list[tuple[int, int]]:
    """Pairs ``(i, j)`` with ``a[i]`` and ``b[j]`` at most ``max_bits`` apart (the audit's
    pigeonhole bands; bands shared by more than MAX_BUCKET images are skipped)."""
    bands, width = max_bits + 1, 64 // (max_bits + 1)
    mask = np.uint64((1 << width) - 1)
    pairs: set[tuple[int, int]] = set()
    for band in range(bands):
        shift = np.uint64(band * width)
        index: dict[int, list[int]] = defaultdict(list)
        for i, v in enumerate(((a >> shift) & mask).tolist()):
            index[v].append(i)
        for j, v in enumerate(((b >> shift) & mask).tolist()):
            cand = index.get(v)
            if not cand or len(cand) > MAX_BUCKET:
                continue
            c = np.asarray(cand)
            close = c[_popcount(a[c] ^ b[j]) <= max_bits]
            pairs.update((int(i), j) for i in close)
    return sorted(pairs)


def leak_hint(train: torch.Tensor, val: torch.Tensor, max_images: int = 60_000) -> str | None:
    """One line when near-identical images sit in both train and val (else None): what
    training prints when no ``--group-by`` was given. Images below 32 px are not checked."""
    if min(train.shape[-2:]) < MIN_SIDE or not len(train) or not len(val) or len(train) + len(val) > max_images:
        return None
    (sa, da), (sb, db) = _gray_small(train), _gray_small(val)
    ha, hb = _hash_bits(sa), _hash_bits(sb)
    ia, ib = np.nonzero((da >= 3.0).numpy())[0], np.nonzero((db >= 3.0).numpy())[0]  # flat images: no hash
    pairs = near_pairs_across(ha[ia], hb[ib])
    if not pairs:
        return None
    n_val = len({j for _, j in pairs})
    return (f"leakage? {n_val} validation image(s) have a near-identical image in train "
            f"(e.g. train[{int(ia[pairs[0][0]])}] ~ val[{int(ib[pairs[0][1]])}]): if images come in groups "
            "(patient, session, video), split by group with --group-by COLUMN|REGEX")
