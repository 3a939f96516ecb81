"""FixMatch (Sohn et al. 2020) inside the one training loop: consistency between a weak and a
strong augmentation of the same unlabelled image.

Each training step of :class:`~imgcls.engine.trainer.Trainer` also takes ``mu`` x the
labelled batch of unlabelled images (the pool is cycled, independently of the labelled
epochs). The model itself - in training mode, without gradients - predicts the weak view
(the run's own augmentation: shifts and flips, or random resized crops for photos); where
its top probability reaches ``threshold`` that class is the target of a cross-entropy on the
strong view (the weak view + RandAugment/TrivialAugmentWide + Cutout, data/transforms.py),
which goes through the same forward pass as the labelled batch (one batch for BatchNorm, as
FixMatch's reference code). The loss is ``labelled CE + weight * mean(mask * CE(strong))``.

Hand-written (a few tensor lines): the FixMatch implementations on PyPI are whole training
scripts with their own loops, data sets and models.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def confidence_threshold(threshold: float, label_smoothing: float, num_classes: int) -> float:
    """``threshold`` on the scale a model trained with label smoothing ``eps`` can reach: its
    targets top out at ``1 - eps (K-1)/K`` (0.82 for airbench's 0.2 and 10 classes), so a plain
    0.95 would keep almost nothing; the threshold is scaled by that ceiling."""
    return threshold * (1.0 - label_smoothing * (num_classes - 1) / max(num_classes, 1))


@dataclass
class FixMatch:
    batches: object  # data.pipeline.UnlabeledInputs.batches: uint8 pool batches, shuffled
    weak: object  # weak view of a uint8 batch (the run's augmentation)
    strong: object  # strong view of a (weak-view) uint8 batch
    threshold: float = 0.95
    weight: float = 1.0

    def __post_init__(self) -> None:
        self._it: Iterator | None = None
        self._epoch = 0

    def next_batch(self) -> torch.Tensor:
        """The next uint8 batch of the pool, a new shuffled epoch of it when one ends."""
        while True:
            if self._it is None:
                self._epoch += 1
                self.batches.set_epoch(self._epoch)
                self._it = iter(self.batches)
            try:
                return next(self._it)[0]
            except StopIteration:
                self._it = None

    def views(self, gen: torch.Generator | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Weak and strong views (uint8, or float in [0, 1] from an accelerator's crop) of the
        next pool batch, on ``device``."""
        x = self.next_batch().to(device)
        return self.weak(x, gen), self.strong(self.weak(x, gen), gen)

    @staticmethod
    def targets(weak_logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Pseudo-labels of the weak view and the mask of those at least ``threshold`` sure."""
        conf, label = torch.softmax(weak_logits.float(), 1).max(1)
        return label, (conf >= threshold).float()

    def loss(self, strong_logits: torch.Tensor, label: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``weight`` x the masked cross-entropy of the strong view (averaged over the whole
        unlabelled batch, as FixMatch: unsure images count as zero)."""
        ce = F.cross_entropy(strong_logits.float(), label, reduction="none")
        return self.weight * (ce * mask).mean()
