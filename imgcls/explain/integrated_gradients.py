"""Integrated gradients through captum."""

from __future__ import annotations

import numpy as np
import torch

from imgcls.explain.base import EXPLAINERS, ExplainContext


@EXPLAINERS.register("ig")
def integrated_gradients(ctx: ExplainContext, x: torch.Tensor, target: int, steps: int = 32,
                         batch_size: int = 32) -> np.ndarray:
    """Path integral of gradients from the mean image to the input (Sundararajan et al. 2017),
    summed over channels; signed (negative = evidence against the class)."""
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(ctx.model)
    attr = ig.attribute(x, baselines=ctx.baseline(), target=target, n_steps=steps,
                        internal_batch_size=batch_size)  # (1, C, S, S)
    return attr[0].sum(0).detach().float().cpu().numpy()
