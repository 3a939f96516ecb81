"""Learning-rate range test (Smith 2015; the fastai / PyTorch-Lightning ``lr_find``).

Trains a throw-away copy of the model for ``steps`` batches while the learning rate grows
exponentially from ``start_lr`` to ``end_lr``, records the smoothed loss, and suggests a
rate one tenth of the one at the loss minimum (fastai's ``lr_min``): high enough to learn
fast, safely below where training diverges.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from imgcls.data.transforms import BatchAugment, Preprocessing
from imgcls.engine.device import autocast
from imgcls.engine.optim import build_optimizer
from imgcls.engine.speed import init_from_data


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


def lr_find(model: nn.Module, pre: Preprocessing, batches, device: torch.device, amp_dtype: torch.dtype | None,
            *, optimizer: str = "adam", weight_decay: float = 0.0, momentum: float = 0.9,
            label_smoothing: float = 0.0, batch_augment: BatchAugment | None = None,
            start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 100, smooth: float = 0.98,
            diverge: float = 4.0, seed: int = 0, channels_last: bool = True) -> LRFindResult:
    """Run the range test on a copy of ``model`` (its own weights are left untouched)."""
    if not 0 < start_lr < end_lr:
        raise ValueError("need 0 < start_lr < end_lr")
    net = copy.deepcopy(model).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    init_from_data(net, batches, pre, device)
    opt = build_optimizer(net, optimizer, start_lr, weight_decay, momentum)
    base = [g["lr"] / start_lr for g in opt.param_groups]  # per-group lr scales (e.g. airbench biases)
    gamma = (end_lr / start_lr) ** (1 / max(1, steps - 1))
    gen = torch.Generator().manual_seed(seed)
    res = LRFindResult()
    avg, best = 0.0, math.inf
    net.train()
    step, epoch = 0, 0
    while step < steps:
        epoch += 1
        batches.set_epoch(epoch)
        for x, y in batches:
            lr = start_lr * gamma ** step
            for g, b in zip(opt.param_groups, base):
                g["lr"] = lr * b
            x, y = x.to(device), y.to(device)
            if batch_augment is not None:
                x = batch_augment(x, gen)
            x = pre.normalize(x, channels_last)
            with autocast(device, amp_dtype):
                loss = F.cross_entropy(net(x).float(), y, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            step += 1
            if not math.isfinite(value):
                res.stopped_early = True
                break
            avg = smooth * avg + (1 - smooth) * value
            smoothed = avg / (1 - smooth ** step)
            res.lrs.append(lr)
            res.losses.append(smoothed)
            best = min(best, smoothed)
            if step > 10 and smoothed > diverge * best:
                res.stopped_early = True
                break
            if step >= steps:
                break
        if res.stopped_early:
            break
    if not res.losses:
        raise ValueError("the learning-rate finder recorded no steps")
    i = min(range(len(res.losses)), key=res.losses.__getitem__)
    res.min_loss_lr = res.lrs[i]
    res.suggestion = float(f"{res.min_loss_lr / 10:.3g}")
    return res
