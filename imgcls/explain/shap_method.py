"""SHAP values with the ``shap`` package's partition explainer and image masker
(hierarchical Owen values over pixel blocks)."""

from __future__ import annotations

import numpy as np
import torch

from imgcls.explain.base import EXPLAINERS, ExplainContext


@EXPLAINERS.register("shap")
def shap(ctx: ExplainContext, x: torch.Tensor, target: int, samples: int = 500,
         batch_size: int = 100) -> np.ndarray:
    """``samples`` (max_evals) model evaluations; masked pixels take the mean colour.
    Summed over channels; signed."""
    import shap as shap_lib

    from imgcls.explain.lime_method import hwc_batch_fn

    pixels = ctx.unnormalize(x)[0].permute(1, 2, 0).detach().cpu().numpy().astype(np.float32)  # (S, S, C)
    fill = np.broadcast_to(ctx.mean_pixels(), pixels.shape).copy()
    masker = shap_lib.maskers.Image(fill, pixels.shape)
    explainer = shap_lib.Explainer(hwc_batch_fn(ctx, batch_size), masker, algorithm="partition",
                                   seed=ctx.seed)
    values = explainer(pixels[None], max_evals=samples, batch_size=batch_size, outputs=np.array([target]),
                       silent=True).values  # (1, S, S, C, 1)
    return np.asarray(values[0, ..., 0].sum(-1), dtype=np.float32)
