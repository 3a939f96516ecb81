"""Multi-label training and decisions: the loss, validation figures and per-class thresholds.

* Loss (``--loss``): ``bce`` - ``BCEWithLogitsLoss`` (``--pos-weight auto``: each label's
  positives weighted by its negatives / positives in the training split, for rare labels) -
  or ``asl``, timm's ``AsymmetricLossMultiLabel`` (Ridnik et al. 2021). ``--balance
  weights`` weights each label's loss by its inverse frequency (data/balance.py counts
  labels). Label smoothing pulls multi-hot targets towards 0.5 (``y (1 - e) + e / 2``, timm's
  multi-label rule); mixup / cutmix mix the multi-hot targets (timm's ``Mixup(multi_label=True)``).
* Validation: BCE loss, mAP (macro average precision; picks the best epoch) and exact match.
* Thresholds: one per class, tuned on the validation split - the threshold of maximal F1, or
  the lowest one reaching a precision (``precision:0.9``; the most recall at that precision)
  or the highest one keeping a recall (``recall:0.9``). Stored in model.json ``thresholds``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_THRESHOLD = 0.5
MAX_POS_WEIGHT = 100.0  # a label seen once in 50k images would otherwise weigh 50,000 times


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))


def pos_weights(labels: torch.Tensor) -> torch.Tensor:
    """negatives / positives per label (clamped to [1, MAX_POS_WEIGHT]; 1 for a label without positives)."""
    pos = (labels > 0.5).sum(0).double()
    neg = len(labels) - pos
    w = torch.where(pos > 0, neg / pos.clamp_min(1), torch.ones_like(pos))
    return w.clamp(1.0, MAX_POS_WEIGHT).float()


class MultiLabelLoss:
    """``loss(logits, targets)`` for float multi-hot (or mixed, soft) targets ``(B, K)``."""

    def __init__(self, kind: str = "bce", smoothing: float = 0.0, class_weights: torch.Tensor | None = None,
                 pos_weight: torch.Tensor | None = None):
        self.kind, self.smoothing = kind, smoothing
        if kind == "asl":
            from timm.loss import AsymmetricLossMultiLabel

            self.asl = AsymmetricLossMultiLabel(smoothing=smoothing, weight=class_weights, pos_weight=pos_weight)
        self.weight, self.pos_weight = class_weights, pos_weight

    def to(self, device: torch.device) -> MultiLabelLoss:
        for name in ("weight", "pos_weight"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        if self.kind == "asl":
            self.asl.to(device)
            self.asl.weight = self.weight
            self.asl.pos_weight = self.pos_weight
        return self

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, smoothed: bool = False) -> torch.Tensor:
        """``smoothed``: the targets already carry label smoothing (timm's mixup adds it)."""
        y = y.float()
        if self.kind == "asl":
            # ASL sums over labels per image (reduction batchmean); divided by K so its scale,
            # and the learning rates that suit it, match BCE's mean
            self.asl.smoothing = 0.0 if smoothed else self.smoothing
            return self.asl(logits, y) / logits.shape[1]
        if self.smoothing and not smoothed:
            y = y * (1.0 - self.smoothing) + 0.5 * self.smoothing
        return F.binary_cross_entropy_with_logits(logits, y, weight=self.weight, pos_weight=self.pos_weight)


def build_loss(kind: str, smoothing: float, class_weights: torch.Tensor | None,
               train_labels: torch.Tensor | None, pos_weight: str = "none") -> MultiLabelLoss:
    pw = pos_weights(train_labels) if pos_weight == "auto" and train_labels is not None else None
    if class_weights is not None:
        class_weights = class_weights / class_weights[class_weights > 0].mean()  # mean 1: the loss keeps its scale
    return MultiLabelLoss("asl" if kind == "asl" else "bce", smoothing, class_weights, pw)


def exact_matches(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Images whose whole label set is right at threshold 0.5 (logit 0)."""
    return ((logits > 0) == (y > 0.5)).all(1).sum()


def mean_ap(y: np.ndarray, probs: np.ndarray) -> float:
    """Macro average precision over the labels that have positives (sklearn)."""
    from sklearn.metrics import average_precision_score

    have = (y > 0.5).any(0)
    if not have.any():
        return 0.0
    return float(average_precision_score((y[:, have] > 0.5).astype(int), probs[:, have], average="macro"))


def val_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Validation loss (BCE), exact-match ratio (``val_acc``) and mAP (``val_map``)."""
    y = labels.float()
    return {"val_loss": float(F.binary_cross_entropy_with_logits(logits, y)),
            "val_acc": float(exact_matches(logits, y)) / max(len(y), 1),
            "val_map": mean_ap(y.numpy(), torch.sigmoid(logits).numpy())}


def _threshold_for(y: np.ndarray, p: np.ndarray, target: str) -> tuple[float, dict[str, float]]:
    from sklearn.metrics import precision_recall_curve

    if not (y > 0.5).any() or (y > 0.5).all():
        return DEFAULT_THRESHOLD, {"note": "no positives or no negatives in val: default threshold"}
    prec, rec, thr = precision_recall_curve((y > 0.5).astype(int), p)
    prec, rec = prec[:-1], rec[:-1]  # the last point has no threshold
    kind, _, value = target.partition(":")
    if kind == "precision":
        ok = np.nonzero(prec >= float(value))[0]
        i = int(ok[0]) if len(ok) else int(np.argmax(prec))  # lowest threshold reaching it: most recall
    elif kind == "recall":
        ok = np.nonzero(rec >= float(value))[0]
        i = int(ok[-1]) if len(ok) else 0  # highest threshold keeping it: most precision
    else:
        f1 = 2 * prec * rec / np.maximum(prec + rec, 1e-12)
        i = int(np.argmax(f1))
    # halfway down to the next lower validation score: the same decisions on val (scores >= thr[i]
    # are positive), with a margin on both sides for new images
    t = float(thr[i]) if i == 0 else float((thr[i - 1] + thr[i]) / 2)
    f1_i = 2 * prec[i] * rec[i] / max(prec[i] + rec[i], 1e-12)
    return t, {"precision": round(float(prec[i]), 5), "recall": round(float(rec[i]), 5), "f1": round(float(f1_i), 5)}


def tune_thresholds(y: np.ndarray, probs: np.ndarray, classes: list[str], target: str = "f1",
                    fitted_on: str = "val") -> dict[str, Any]:
    """Per-class thresholds (model.json ``thresholds``) for validation labels ``y`` (N, K) and
    sigmoid probabilities ``probs``; with each class's precision / recall / F1 at its threshold."""
    values, at = {}, {}
    for k, c in enumerate(classes):
        t, info = _threshold_for(y[:, k], probs[:, k], target)
        values[c], at[c] = round(t, 6), info
    return {"target": target, "fitted_on": fitted_on, "num_images": int(len(y)), "values": values, "val": at}


def default_thresholds(classes: list[str], why: str) -> dict[str, Any]:
    return {"target": "default", "fitted_on": why, "num_images": 0,
            "values": {c: DEFAULT_THRESHOLD for c in classes}, "val": {}}
