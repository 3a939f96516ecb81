"""LIME on superpixels (Ribeiro et al. 2016) through the ``lime`` package."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch

from imgcls.explain.base import EXPLAINERS, ExplainContext


def hwc_batch_fn(ctx: ExplainContext, batch_size: int):
    """A numpy (N, H, W, C') in [0, 1] -> probabilities (N, K) function, evaluated in
    batches, for the model-agnostic libraries (C' = 3 for LIME's RGB images)."""

    def predict(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
        if x.shape[1] != ctx.preprocessing.in_chans:
            x = x[:, :1]  # LIME hands grayscale images over as three equal channels
        return ctx.probabilities(ctx.normalize(x), batch_size).cpu().numpy()

    return predict


@EXPLAINERS.register("lime")
def lime(ctx: ExplainContext, x: torch.Tensor, target: int, samples: int = 300, segments: int = 50,
         batch_size: int = 100) -> np.ndarray:
    """``samples`` perturbed images (superpixels switched to the mean colour), a weighted
    linear fit; each pixel gets its superpixel's weight. SLIC superpixels: LIME's default
    quickshift makes only a handful of segments on small images."""
    from lime.lime_image import LimeImageExplainer
    from lime.wrappers.scikit_image import SegmentationAlgorithm

    pixels = ctx.unnormalize(x)[0].permute(1, 2, 0).detach().cpu().numpy().astype(np.float64)  # (S, S, C)
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    mean = ctx.mean_pixels()
    hide = np.resize(mean, 3) if len(mean) == 1 else mean
    seg = SegmentationAlgorithm("slic", n_segments=segments, compactness=10, sigma=1, start_label=0,
                                random_seed=ctx.seed)
    # lime 0.2 always draws a tqdm bar on stderr, with no switch to turn it off
    with contextlib.redirect_stderr(io.StringIO()):
        exp = LimeImageExplainer(random_state=ctx.seed).explain_instance(
            pixels, hwc_batch_fn(ctx, batch_size), labels=(target,), top_labels=None, hide_color=hide,
            num_samples=samples, batch_size=batch_size, segmentation_fn=seg, random_seed=ctx.seed)
    weights = dict(exp.local_exp[target])
    lut = np.array([weights.get(i, 0.0) for i in range(int(exp.segments.max()) + 1)], dtype=np.float32)
    return lut[exp.segments]
