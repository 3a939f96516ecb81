"""Grad-CAM overlay for /explain.

Uses pytorch-grad-cam on the Classifier's torch module. The target layer is the model's
last feature stage: timm's ``feature_info`` when the model has it, ``features`` for
reference_cnn-style models, else the last Conv2d.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

DISPLAY_SIDE = 320  # overlays are upscaled to at least this side so small inputs stay visible


@dataclass
class Overlay:
    png: bytes
    target: str
    top: list[tuple[str, float]]


def target_layer(model: nn.Module) -> nn.Module:
    info = getattr(model, "feature_info", None)
    if info is not None:
        try:
            return model.get_submodule(info[-1]["module"])
        except (AttributeError, KeyError, IndexError, TypeError):
            pass
    if isinstance(getattr(model, "features", None), nn.Module):
        return model.features
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("the model has no convolution layer for Grad-CAM")
    return convs[-1]


def gradcam_overlay(clf, image: Image.Image, target: int | None = None, top_k: int = 5) -> Overlay:
    """Grad-CAM of ``target`` (default: the predicted class) over the model's input view
    of ``image`` (a decoded PIL image in the model's mode)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    pre = clf.preprocessing
    model = clf.model.float().eval()
    device = next(model.parameters()).device
    x8 = pre.pil_transform()(image)  # uint8 (C, S, S): exactly what the model sees
    x = pre.normalize(x8[None].to(device))
    with torch.no_grad():
        probs = torch.softmax(model(x).float() / clf.temperature, 1)[0].cpu().numpy()
    order = np.argsort(-probs)[: max(1, min(top_k, clf.num_classes))]
    target = int(order[0]) if target is None else int(target)
    with GradCAM(model=model, target_layers=[target_layer(model)]) as cam:
        heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])[0]  # (S, S) in [0, 1]
    rgb = x8.float().div(255).permute(1, 2, 0).numpy()
    if rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    overlay = Image.fromarray(show_cam_on_image(rgb.astype(np.float32), heat, use_rgb=True, image_weight=0.55))
    if overlay.width < DISPLAY_SIDE:
        overlay = overlay.resize((DISPLAY_SIDE, DISPLAY_SIDE * overlay.height // overlay.width), Image.BILINEAR)
    buf = io.BytesIO()
    overlay.save(buf, format="PNG")
    return Overlay(buf.getvalue(), clf.classes[target], [(clf.classes[i], float(probs[i])) for i in order])
