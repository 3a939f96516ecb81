"""Grad-CAM overlay for /explain, through imgcls.explain (the same explanations as
``imgcls explain``), sized for a web page and encoded as PNG."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

MIN_SIDE, MAX_SIDE = 320, 768  # tiny inputs are upscaled to stay visible; photos downscaled to stay light


@dataclass
class Overlay:
    png: bytes
    target: str
    top: list[tuple[str, float]]


def _display_size(w: int, h: int) -> tuple[int, int]:
    scale = 1.0
    if max(w, h) > MAX_SIDE:
        scale = MAX_SIDE / max(w, h)
    elif max(w, h) < MIN_SIDE:
        scale = MIN_SIDE / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def gradcam_overlay(clf, image: Image.Image, target: int | None = None, top_k: int = 5,
                    device: str = "cpu") -> Overlay:
    """Grad-CAM of ``target`` (default: the predicted class) over ``image`` (RGB, as uploaded).
    Runs in the server's inference thread, so nothing else uses the model meanwhile."""
    from imgcls.explain import explain

    [e] = explain(clf, [image], method="gradcam", target=target, top_k=top_k, faithfulness=False, device=device)
    overlay = e.overlay.convert("RGB")
    size = _display_size(*overlay.size)
    if size != overlay.size:
        overlay = overlay.resize(size, Image.BILINEAR)
    buf = io.BytesIO()
    overlay.save(buf, format="PNG", compress_level=3)  # speed over the last few percent of size
    return Overlay(buf.getvalue(), e.target, list(e.top))
