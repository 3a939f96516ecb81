"""Grad-CAM and Grad-CAM++ through pytorch-grad-cam (jacobgil/pytorch-grad-cam)."""

from __future__ import annotations

import numpy as np
import torch

from imgcls.explain.base import EXPLAINERS, ExplainContext
from imgcls.explain.layers import find_target_layer


def _cam(cam_class, ctx: ExplainContext, x: torch.Tensor, target: int) -> np.ndarray:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = find_target_layer(ctx.model.model, x, ctx.layer)
    ctx.layer = layer.name
    ctx.model.evaluations = 0  # the probing pass is bookkeeping, not part of the explanation
    with cam_class(model=ctx.model, target_layers=[layer.module], reshape_transform=layer.reshape) as cam:
        # (1, S, S) in [0, 1]: ReLU'd class-weighted activations, upsampled to the input size
        heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])
    return np.asarray(heat[0], dtype=np.float32)


@EXPLAINERS.register("gradcam")
def gradcam(ctx: ExplainContext, x: torch.Tensor, target: int) -> np.ndarray:
    """Gradient-weighted class activation map of the last conv block (Selvaraju et al. 2017)."""
    from pytorch_grad_cam import GradCAM

    return _cam(GradCAM, ctx, x, target)


@EXPLAINERS.register("gradcam++")
def gradcam_plus_plus(ctx: ExplainContext, x: torch.Tensor, target: int) -> np.ndarray:
    """Grad-CAM++: higher-order gradient weights, better with several instances (Chattopadhay et al. 2018)."""
    from pytorch_grad_cam import GradCAMPlusPlus

    return _cam(GradCAMPlusPlus, ctx, x, target)
