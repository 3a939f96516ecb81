"""Occlusion through captum: slide a patch of mean-colour pixels over the image and record
how much the class score drops."""

from __future__ import annotations

import numpy as np
import torch

from imgcls.explain.base import EXPLAINERS, ExplainContext


@EXPLAINERS.register("occlusion")
def occlusion(ctx: ExplainContext, x: torch.Tensor, target: int, window: int | None = None,
              stride: int | None = None, batch_size: int = 64) -> np.ndarray:
    """Default window: a seventh of the side (4 px at 28, 32 px at 224) with half-window
    stride, i.e. about 13 x 13 = 169 model evaluations at any input size."""
    from captum.attr import Occlusion

    c, s = x.shape[1], x.shape[-1]
    window = window or max(2, round(s / 7))
    stride = stride or max(1, window // 2)
    attr = Occlusion(ctx.model).attribute(
        x, sliding_window_shapes=(c, window, window), strides=(c, stride, stride), baselines=0.0,
        target=target, perturbations_per_eval=batch_size)  # (1, C, S, S), same value in every channel
    return attr[0].mean(0).detach().float().cpu().numpy()
