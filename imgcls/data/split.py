"""Deterministic stratified hold-out."""

from __future__ import annotations

import torch


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (keep_idx, holdout_idx): ``fraction`` of every class, at least one sample of
    each class with two or more samples, chosen reproducibly from ``seed``.

    Hand-written rather than sklearn's ``train_test_split(stratify=...)`` because that one
    refuses classes with a single sample, which small real folders have.

    The draws are made class by class in label order, so the split depends on the class
    order: data relabelled to another order (``--classes dog,cat``) holds out other images.
    Kept so, because every existing run's validation split is this one; evaluation rebuilds
    a run's split in the run's own class order instead (``load_data(like=model classes)``).
    """
    from imgcls.data.multilabel import strata

    labels = strata(labels)  # multi-hot rows: stratified on each image's rarest label
    gen = torch.Generator().manual_seed(seed)
    keep, hold = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = int(round(fraction * len(idx)))
        if fraction > 0 and len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        hold.append(idx[:k])
        keep.append(idx[k:])
    return torch.sort(torch.cat(keep)).values, torch.sort(torch.cat(hold)).values
