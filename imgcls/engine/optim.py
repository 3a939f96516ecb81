"""Optimizer and learning-rate schedule from the config."""

from __future__ import annotations

import inspect
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


_EAGER: dict[type, type] = {}


def eager_optimizer(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``cls`` without torch.optim's first-call ``import torch._dynamo``: 1.2 s of a 16 s
    MNIST ``imgcls train`` on 2 cores (docs/benchmarks.md). Its step (``_use_grad_for_
    differentiable``), zero_grad, add_param_group and state-dict methods are wrapped in
    torch.compile guards whose first call imports the compiler, and which in eager mode do
    nothing else; this subclass calls the wrapped methods directly, the step under the grad
    mode the guard would set. For eager training only (``--compile`` keeps torch's class);
    a torch whose methods no longer expose ``__wrapped__`` gets its own class back."""
    if cls in _EAGER:
        return _EAGER[cls]
    opt = torch.optim.Optimizer
    guarded = (cls.step, opt.zero_grad, opt.add_param_group, opt.state_dict, opt.load_state_dict)
    if not all(hasattr(m, "__wrapped__") for m in guarded):
        return _EAGER.setdefault(cls, cls)
    # unwrap all the way: once torch's own class has an instance, its step is also wrapped in
    # the profiler hook (Optimizer._patch_step_function), which this subclass gets anew
    step, zero_grad, add_group, state_dict, load_state = (inspect.unwrap(m) for m in guarded)

    def _step(self, closure=None):
        with torch.set_grad_enabled(self.defaults["differentiable"]):
            return step(self, closure)

    methods = {"step": _step,
               "zero_grad": lambda self, set_to_none=True: zero_grad(self, set_to_none),
               "add_param_group": lambda self, group: add_group(self, group),
               "state_dict": lambda self: state_dict(self),
               "load_state_dict": lambda self, state: load_state(self, state)}
    return _EAGER.setdefault(cls, type(cls.__name__, (cls,), {"__module__": __name__, **methods}))


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.0,
                    momentum: float = 0.9, groups: list[dict] | None = None,
                    eager: bool = True) -> torch.optim.Optimizer:
    """``groups`` (optional) are ready-made parameter groups with their own lr / weight
    decay (discriminative learning rates, engine/finetune.py). Otherwise a model may ask for
    its own groups (e.g. airbench: faster BatchNorm biases) via ``param_groups(weight_decay)``
    returning groups with an ``lr_scale``. ``eager``: the model is not compiled, so the
    optimiser skips torch.compile's guards (:func:`eager_optimizer`)."""
    if groups is None:
        hook = getattr(model, "param_groups", None)
        groups = hook(weight_decay) if callable(hook) else _param_groups(model, weight_decay)
        groups = [{k: v for k, v in g.items() if k != "lr_scale"} | {"lr": lr * g.get("lr_scale", 1.0)}
                  for g in groups if g["params"]]
    fast = _fast_kwargs(model)
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name]
    if eager:
        cls = eager_optimizer(cls)
    if name == "sgd":
        return cls(groups, lr=lr, momentum=momentum, nesterov=momentum > 0, **fast)
    return cls(groups, lr=lr, **fast)


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
