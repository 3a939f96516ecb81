"""Mixing augmentations and their loss: timm's Mixup / CutMix with soft targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

class MixLoss:
    """timm's Mixup/CutMix on a normalised float batch, with the soft-target cross-entropy
    that goes with it (timm folds label smoothing into the soft targets)."""

    def __init__(self, mixup: float, cutmix: float, label_smoothing: float, num_classes: int,
                 multi_label: bool = False):
        from timm.data import Mixup

        # multi_label: multi-hot targets mixed as they are, smoothing towards 0.5 (timm's rule)
        self.mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                         num_classes=num_classes, multi_label=multi_label)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(x) % 2:  # timm mixes a batch with its flip: needs an even batch
            x, y = x[:-1], y[:-1]
        return self.mix(x, y)

    @staticmethod
    def loss(logits: torch.Tensor, soft_targets: torch.Tensor,
             class_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Soft-target cross-entropy. ``class_weights`` (``--balance weights``) weight each
        target column, and the sum is divided by the batch's total target weight: for one-hot
        targets that is exactly torch's weighted ``cross_entropy`` (sum of w_y * nll over the
        sum of w_y), and a mixed image counts each of its classes at that class's weight."""
        nll = -soft_targets * F.log_softmax(logits, dim=-1)  # (B, K)
        if class_weights is None:
            return nll.sum(-1).mean()
        w = class_weights.to(nll.dtype)
        return (nll * w).sum() / (soft_targets * w).sum().clamp_min(1e-12)


def mix_loss(mixup: float, cutmix: float, label_smoothing: float, num_classes: int,
             multi_label: bool = False) -> MixLoss | None:
    if mixup <= 0 and cutmix <= 0:
        return None
    return MixLoss(mixup, cutmix, label_smoothing, num_classes, multi_label)


def num_outputs(model: nn.Module) -> int:
    n = getattr(model, "num_classes", None)
    if n:
        return int(n)
    return int(model.get_classifier().out_features)
