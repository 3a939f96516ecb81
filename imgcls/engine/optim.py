"""Optimizer and learning-rate schedule from the config."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D parameters), the usual practice."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _fast_kwargs(model: nn.Module) -> dict:
    """One fused kernel per step on CUDA (``fused=True``); elsewhere the multi-tensor
    (``foreach``) path, which batches the per-parameter updates into a few ops."""
    p = next((p for p in model.parameters() if p.requires_grad), None)
    if p is not None and p.device.type == "cuda":
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.0,
                    momentum: float = 0.9, groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """``groups`` (optional) are ready-made parameter groups with their own lr / weight
    decay (discriminative learning rates, engine/finetune.py). Otherwise a model may ask for
    its own groups (e.g. airbench: faster BatchNorm biases) via ``param_groups(weight_decay)``
    returning groups with an ``lr_scale``."""
    if groups is None:
        hook = getattr(model, "param_groups", None)
        groups = hook(weight_decay) if callable(hook) else _param_groups(model, weight_decay)
        groups = [{k: v for k, v in g.items() if k != "lr_scale"} | {"lr": lr * g.get("lr_scale", 1.0)}
                  for g in groups if g["params"]]
    fast = _fast_kwargs(model)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, **fast)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **fast)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0, **fast)
    raise ValueError(name)


def build_scheduler(opt: torch.optim.Optimizer, name: str, total_steps: int, warmup_steps: int,
                    progress: Callable[[], float] | None = None) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step multiplier on the base learning rate.

    onecycle: linear warm-up from lr/25 to lr, then cosine down to ~0 (the one-cycle policy
    without momentum cycling); cosine: linear warm-up from ~0, then cosine to 0; linear:
    warm-up from lr/5, then a straight line down to 0 (airbench's triangle); constant:
    warm-up, then flat. Written as one LambdaLR rather than torch's OneCycleLR, which
    divides by zero when a tiny data set gives only a handful of steps.

    ``progress`` (a time budget, engine/trainer.py): a callable giving the share of the
    budget spent, 0..1; the schedule then runs at ``max(step, progress() * total_steps)``, so
    warm-up and decay follow whichever of the step count and the clock is further along.
    """
    total_steps = max(1, total_steps)
    warmup_steps = min(max(0, warmup_steps), total_steps - 1)
    start = {"onecycle": 1 / 25, "linear": 0.2}.get(name, 0.0)

    def factor(step: float) -> float:
        if progress is not None:
            step = max(step, progress() * total_steps)
        if step < warmup_steps:
            return start + (1 - start) * (step + 1) / (warmup_steps + 1)
        if name == "constant":
            return 1.0
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if name == "linear":
            return max(0.0, 1.0 - t)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
