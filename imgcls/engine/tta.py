"""Test-time augmentation: the views (mirror, one-pixel shifts) whose logits are averaged.

``tta_forward`` is the one definition; ``TTAModel`` wraps a network so that an exported
graph (ONNX) averages its own views and every prediction road gives the same answer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imgcls.artifact import TTA_MODES  # the names a model card may give (checked when it is read)
from imgcls.errors import ImgclsError


def check_mode(tta: str) -> str:
    """``tta`` when it is a TTA mode, else a one-line error naming the valid ones."""
    if tta not in TTA_MODES:
        raise ImgclsError(f"unknown TTA mode {repr(tta)[:40]}", f"use one of {', '.join(TTA_MODES)}")
    return tta


def tta_forward(model: nn.Module, x: torch.Tensor, tta: str) -> torch.Tensor:
    """Logits for ``x``. ``flip``: the mean over the image and its mirror; ``flip-shift``:
    half that, half the same for copies shifted by one pixel up-left and down-right
    (reflect-padded), airbench's test-time augmentation."""
    if check_mode(tta) == "none":
        return model(x)
    out = (model(x).float() + model(x.flip(-1)).float()) / 2
    if tta == "flip-shift":
        h, w = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = [padded[..., :h, :w], padded[..., 2:, 2:]]
        shifted = [t.contiguous(memory_format=torch.channels_last) if x.is_contiguous(
            memory_format=torch.channels_last) else t for t in shifted]
        out = out / 2 + sum((model(t).float() + model(t.flip(-1)).float()) / 2 for t in shifted) / 4
    return out


class TTAModel(nn.Module):
    """``model`` whose forward is :func:`tta_forward`: exported, the graph takes the batch
    and averages its own views, so ONNX Runtime gives what PyTorch gives."""

    def __init__(self, model: nn.Module, tta: str):
        super().__init__()
        self.model, self.tta = model, check_mode(tta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tta_forward(self.model, x, self.tta)
