"""Class imbalance: class-weighted loss or a class-balanced sampler.

``--balance weights``: cross-entropy weights ``n / (k * count_c)`` (scikit-learn's
"balanced" weights: every class contributes as much loss as a balanced set would).
``--balance sampler``: each epoch draws as many images as the split has, with
replacement, every class equally likely (:class:`imgcls.data.loaders.BalancedOrder`).
Multi-label data counts images per label (label frequencies): the weights scale each label's
binary loss (engine/multilabel.py), the sampler balances each image's rarest label.
``--balance auto``: class weights when the largest class is at least
``AUTO_RATIO`` times the smallest, else nothing. Weights rather than the sampler because
they keep every image in every epoch (oversampling repeats the few images of the small
classes and drops others of the big ones at random).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

AUTO_RATIO = 3.0
MODES = ("auto", "none", "weights", "sampler")


def imbalance_ratio(counts: list[int]) -> float:
    present = [c for c in counts if c > 0]
    return max(present) / min(present) if present else 1.0


@dataclass
class BalancePlan:
    requested: str
    mode: str  # none | weights | sampler
    ratio: float
    counts: dict[str, int]
    class_weights: list[float] | None = None
    notes: list[str] = field(default_factory=list)

    def weight_tensor(self) -> torch.Tensor | None:
        return torch.tensor(self.class_weights, dtype=torch.float32) if self.class_weights else None

    def to_dict(self) -> dict[str, Any]:
        d = {"requested": self.requested, "mode": self.mode, "imbalance_ratio": round(self.ratio, 3),
             "class_counts": self.counts}
        if self.class_weights:
            d["class_weights"] = [round(w, 4) for w in self.class_weights]
        return d

    def describe(self) -> str:
        what = {"none": "no rebalancing", "weights": "class-weighted loss",
                "sampler": "class-balanced sampling"}[self.mode]
        return f"class imbalance {self.ratio:.1f}:1 -> {what} (--balance {self.requested})"


def plan_balance(labels: torch.Tensor, classes: list[str], requested: str = "auto") -> BalancePlan:
    if requested not in MODES:
        raise ValueError(requested)
    from imgcls.data.multilabel import label_counts

    counts = label_counts(labels, len(classes))  # multi-label: images per label (label frequencies)
    ratio = imbalance_ratio(counts)
    mode = requested
    if requested == "auto":
        mode = "weights" if ratio >= AUTO_RATIO else "none"
    weights = None
    if mode == "weights":
        n, k = sum(counts), sum(1 for c in counts if c > 0)
        weights = [n / (k * c) if c else 0.0 for c in counts]
    return BalancePlan(requested=requested, mode=mode, ratio=ratio,
                       counts=dict(zip(classes, counts)), class_weights=weights)
