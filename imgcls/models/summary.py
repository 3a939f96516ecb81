"""A Keras-style model summary: layers, output shapes, parameters and FLOPs per image.

Output shapes come from forward hooks on one real forward pass (batch of 1, eval
mode); FLOPs from PyTorch's own ``torch.utils.flop_counter.FlopCounterMode``, which
counts a multiply-add as 2 FLOPs (convolutions, matmuls, attention; elementwise ops are
not counted), per module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class LayerRow:
    name: str
    type: str
    depth: int
    output_shape: list[int] | None
    params: int
    trainable: int
    flops: int


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)):
        for o in out:
            t = _first_tensor(o)
            if t is not None:
                return t
    if isinstance(out, dict):
        for o in out.values():
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


@torch.no_grad()
def summarize(model: nn.Module, input_shape: tuple[int, int, int], depth: int = 2) -> dict[str, Any]:
    """Rows for every module down to ``depth`` levels (in definition order), with totals.
    ``input_shape`` is (channels, height, width) of one image."""
    was_training = model.training
    model.eval()
    shapes: dict[str, list[int]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if name and name.count(".") < depth:
            def hook(_m, _i, out, name=name):
                t = _first_tensor(out)
                if t is not None:
                    shapes[name] = [int(s) for s in t.shape[1:]]
            hooks.append(mod.register_forward_hook(hook))
    try:
        x = torch.zeros(1, *input_shape)
        with FlopCounterMode(display=False, depth=None) as counter:
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    root = type(model).__name__
    per_module = {k: int(sum(v.values())) for k, v in counter.get_flop_counts().items()}
    rows = []
    for name, mod in model.named_modules():
        if not name or name.count(".") >= depth or name not in shapes:
            continue
        params = sum(p.numel() for p in mod.parameters())
        trainable = sum(p.numel() for p in mod.parameters() if p.requires_grad)
        rows.append(LayerRow(name=name, type=type(mod).__name__, depth=name.count("."), output_shape=shapes[name],
                             params=params, trainable=trainable, flops=per_module.get(f"{root}.{name}", 0)))
    out_t = _first_tensor(out)
    total_flops = int(counter.get_total_flops())
    return {
        "model": root, "input_shape": list(input_shape),
        "output_shape": [int(s) for s in out_t.shape[1:]] if out_t is not None else None,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "flops_per_image": total_flops, "macs_per_image": total_flops // 2,
        "layers": [asdict(r) for r in rows],
    }


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)}"


def format_summary(s: dict[str, Any], title: str | None = None) -> str:
    """The summary as a plain-text table (stable for logs, diffs and tests)."""
    def shape(v: list[int] | None) -> str:
        return "(" + ", ".join(str(d) for d in v) + ")" if v is not None else "-"

    header = ("layer", "type", "output shape", "params", "FLOPs")
    body = [("  " * r["depth"] + r["name"], r["type"], shape(r["output_shape"]), f"{r['params']:,}",
             _human(r["flops"]) if r["flops"] else "-") for r in s["layers"]]
    widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
    line = lambda row: "  ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w)  # noqa: E731
                                 for i, (c, w) in enumerate(zip(row, widths)))
    rule = "-" * len(line(header))
    out = [title or s["model"], f"input {shape(s['input_shape'])} -> output {shape(s['output_shape'])}", rule,
           line(header), rule, *(line(r) for r in body), rule,
           f"parameters: {s['params']:,} ({s['trainable_params']:,} trainable)",
           f"FLOPs per image: {_human(s['flops_per_image'])} ({_human(s['macs_per_image'])} multiply-adds)"]
    return "\n".join(out)
