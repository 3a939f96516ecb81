"""A self-contained HTML page of thumbnails (images inlined as base64 PNG; no CDN, no
scripts), written beside a CSV of label issues or ranked images."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import torch
from PIL import Image

THUMB = 112  # pixels, longer side

_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
.grid{display:flex;flex-wrap:wrap;gap:12px}.card{width:150px;font-size:12px;border:1px solid #ddd;
border-radius:6px;padding:6px;text-align:center}.card img{max-width:140px;max-height:140px;image-rendering:pixelated}
.bad{color:#b00}.good{color:#070}.path{color:#777;word-break:break-all}"""


def thumbnail_png(image: Any) -> str:
    """A base64 PNG thumbnail of a uint8 ``(C, H, W)`` tensor or an image file path ("" when unreadable)."""
    try:
        if isinstance(image, torch.Tensor):
            a = image.permute(1, 2, 0).numpy()
            img = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
        else:
            from imgcls.data.decode import UnreadableImage, decode_file

            try:
                img = decode_file(Path(image)).convert("RGB")
            except UnreadableImage:
                return ""
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB")
        scale = THUMB / max(img.size)
        if scale > 1:  # small images (digits) shown larger, pixel for pixel
            img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.NEAREST)
        else:
            img.thumbnail((THUMB, THUMB))
        buf = io.BytesIO()
        img.save(buf, "PNG")
        return base64.b64encode(buf.getvalue()).decode("ascii")
    except (OSError, ValueError):
        return ""


def write_gallery(path: str | Path, title: str, intro: str, cards: list[dict[str, Any]]) -> Path:
    """``cards``: dicts with ``image`` (tensor or path) and ``lines`` (list of (css class, text))."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>"
             "<div class='grid'>"]
    for c in cards:
        b64 = thumbnail_png(c["image"])
        img = f"<img alt='' src='data:image/png;base64,{b64}'>" if b64 else "<div class='bad'>(unreadable)</div>"
        text = "".join(f"<div class='{cls}'>{html.escape(str(t))}</div>" for cls, t in c["lines"])
        parts.append(f"<div class='card'>{img}{text}</div>")
    parts.append("</div></body></html>")
    path = Path(path)
    path.write_text("".join(parts), encoding="utf-8")
    return path


def as_image(split_images: torch.Tensor | None, paths: list[Path] | None, i: int) -> Any:
    """What :func:`thumbnail_png` takes for row ``i`` of a split (its tensor, or its file)."""
    return split_images[i] if split_images is not None else paths[i]



