"""Grad-CAM overlay for /explain, through imgcls.explain (the same explanations as
``imgcls explain``), sized for a web page and encoded as PNG.

The upload is shrunk *before* it is explained: the overlay's colour maps are float arrays of
the image's size, so explaining a 7000x7000 upload at full size took gigabytes for a picture
shown at 768 px."""

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


def explain_side(img_size: int) -> int:
    """The longest side an upload is explained at: the overlay's size, or the model's input
    size when that is larger (so the model sees the detail it would in /predict)."""
    return max(MAX_SIDE, img_size)


def shrink_for_explain(image: Image.Image, img_size: int) -> Image.Image:
    """``image`` scaled down (aspect kept) to at most ``explain_side(img_size)`` on its longer
    side; smaller images come back as they are. Pillow's reducing_gap first reduces by an
    integer factor, so a large upload costs little memory or time."""
    side = explain_side(img_size)
    w, h = image.size
    if max(w, h) <= side:
        return image
    scale = side / max(w, h)
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR, reducing_gap=2.0)


def gradcam_overlay(clf, image: Image.Image, target: int | None = None, top_k: int = 5,
                    device: str = "cpu") -> Overlay:
    """Grad-CAM of ``target`` (default: the predicted class) over ``image`` (RGB, as uploaded,
    shrunk first as :func:`shrink_for_explain` says). Nothing else may use ``clf``'s module
    meanwhile (the server gives this its own copy of the model)."""
    from imgcls.explain import explain

    image = shrink_for_explain(image, clf.preprocessing.img_size)
    [e] = explain(clf, [image], method="gradcam", target=target, top_k=top_k, faithfulness=False, device=device)
    overlay = e.overlay.convert("RGB")
    size = _display_size(*overlay.size)
    if size != overlay.size:
        overlay = overlay.resize(size, Image.BILINEAR)
    buf = io.BytesIO()
    overlay.save(buf, format="PNG", compress_level=3)  # speed over the last few percent of size
    return Overlay(buf.getvalue(), e.target, list(e.top))
