"""Learning-rate range test (Smith 2015; the fastai / PyTorch-Lightning ``lr_find``).

An :class:`LRFinder` callback on the ordinary :class:`~imgcls.engine.trainer.Trainer`
(fastai's ``LRFinder`` idea: extra behaviour is a callback on the one loop): a throw-away
copy of the model trains on the run's own training batches - same pipeline, augmentation,
precision and initialisation as ``fit`` - for ``steps`` batches while the learning rate
grows exponentially from ``start_lr`` to ``end_lr``. It records the smoothed loss and
suggests a rate one tenth of the one at the loss minimum (fastai's ``lr_min``): high
enough to learn fast, safely below where training diverges.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from imgcls.data.transforms import Preprocessing
from imgcls.engine.callbacks import Callback, TrainState
from imgcls.engine.trainer import FitSettings, Trainer


@dataclass
class LRFindResult:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # smoothed (bias-corrected EMA) losses
    suggestion: float = 0.0
    min_loss_lr: float = 0.0
    stopped_early: bool = False  # the loss diverged before end_lr

    def to_dict(self) -> dict:
        return {"suggestion": self.suggestion, "min_loss_lr": self.min_loss_lr,
                "stopped_early": self.stopped_early,
                "curve": [{"lr": lr, "loss": loss} for lr, loss in zip(self.lrs, self.losses)]}


class LRFinder(Callback):
    """Sets each step's learning rate (per-group scales kept, e.g. airbench's biases),
    records the smoothed loss, and stops the run after ``steps`` steps or when the loss
    exceeds ``diverge`` times its minimum."""

    def __init__(self, start_lr: float, end_lr: float, steps: int, smooth: float = 0.98, diverge: float = 4.0):
        if not 0 < start_lr < end_lr:
            raise ValueError("need 0 < start_lr < end_lr")
        self.start_lr, self.steps, self.smooth, self.diverge = start_lr, steps, smooth, diverge
        self.gamma = (end_lr / start_lr) ** (1 / max(1, steps - 1))
        self.result = LRFindResult()
        self.trainer: Trainer | None = None
        self._avg, self._best, self._lr, self._scales = 0.0, math.inf, start_lr, []

    def attach(self, trainer: Trainer) -> LRFinder:
        self.trainer = trainer
        return self

    def on_fit_start(self, state: TrainState, model: nn.Module) -> None:
        self._scales = [g["lr"] / self.start_lr for g in self.trainer.opt.param_groups]

    def on_batch_start(self, state: TrainState) -> None:
        self._lr = self.start_lr * self.gamma ** state.step
        for g, scale in zip(self.trainer.opt.param_groups, self._scales):
            g["lr"] = self._lr * scale

    def on_batch_end(self, state: TrainState) -> None:
        value, res = float(state.loss), self.result
        if not math.isfinite(value):
            res.stopped_early = state.stop = True
            return
        self._avg = self.smooth * self._avg + (1 - self.smooth) * value
        smoothed = self._avg / (1 - self.smooth ** state.step)
        res.lrs.append(self._lr)
        res.losses.append(smoothed)
        self._best = min(self._best, smoothed)
        if state.step > 10 and smoothed > self.diverge * self._best:
            res.stopped_early = state.stop = True
        elif state.step >= self.steps:
            state.stop = True

    def finish(self) -> LRFindResult:
        res = self.result
        if not res.losses:
            raise ValueError("the learning-rate finder recorded no steps")
        i = min(range(len(res.losses)), key=res.losses.__getitem__)
        res.min_loss_lr = res.lrs[i]
        res.suggestion = float(f"{res.min_loss_lr / 10:.3g}")
        return res


def lr_find(model: nn.Module, pre: Preprocessing, batches, device: torch.device, amp_dtype: torch.dtype | None,
            settings: FitSettings, *, batch_augment=None, start_lr: float = 1e-7, end_lr: float = 10.0,
            steps: int = 100, channels_last: bool = True) -> LRFindResult:
    """Run the range test on a copy of ``model`` (its own weights are left untouched),
    with the optimizer, label smoothing and mixing of ``settings``."""
    finder = LRFinder(start_lr, end_lr, steps)
    epochs = max(1, -(-steps // max(1, len(batches))))  # enough passes over the data for ``steps``
    s = replace(settings, epochs=epochs, lr=start_lr, schedule="constant", warmup_epochs=0.0, compile=False)
    trainer = Trainer(copy.deepcopy(model), pre, s, device, amp_dtype, batch_augment=batch_augment,
                      callbacks=[finder], channels_last=channels_last)
    finder.attach(trainer)
    trainer.fit(batches, None)
    return finder.finish()
