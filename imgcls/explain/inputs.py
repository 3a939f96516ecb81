"""Images in whatever form the user has (files, folders, PIL images, arrays) -> ExplainImage:
the original for display and the exact pixels the model sees, made by the same
preprocessing as predict (Preprocessing from model.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from imgcls.data.decode import UnreadableImage, images_in_folder, load_image, to_mode
from imgcls.data.pipeline import array_images
from imgcls.data.transforms import Preprocessing
from imgcls.errors import ImgclsError
from imgcls.explain.base import ExplainImage


def _model_pixels(t: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """uint8 (C, H, W) -> (C', S, S) float in [0, 1]: channel conversion and resizing as the
    model's preprocessing does them (through normalize, then undone)."""
    x = pre.normalize(t[None])
    mean = torch.tensor(pre.mean).view(1, -1, 1, 1)
    std = torch.tensor(pre.std).view(1, -1, 1, 1)
    return (x * std + mean).clamp(0, 1)[0]


def _crop_box(size: tuple[int, int], pre: Preprocessing) -> tuple[int, int, int, int]:
    """The part of the original the model sees: everything (squash) or the centre crop."""
    w, h = size
    if pre.resize != "shorter_side":
        return 0, 0, w, h
    resized_short = int(round(pre.img_size / pre.crop_pct))
    side = min(w, h) * pre.img_size / resized_short  # crop side in original pixels
    left, top = int(round((w - side) / 2)), int(round((h - side) / 2))
    return left, top, min(w, int(round(left + side))), min(h, int(round(top + side)))


def _from_pil(img: Image.Image, source: str, pre: Preprocessing) -> ExplainImage:
    display = pre.to_display(img)  # 16-bit / float images through the model's intensity setting
    t = pre.pil_transform()(to_mode(img, pre.in_chans))
    return ExplainImage(source, display, _model_pixels(t, pre), _crop_box(display.size, pre))


def _from_array(t: torch.Tensor, source: str, pre: Preprocessing) -> ExplainImage:
    arr = t.permute(1, 2, 0).numpy()
    display = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).convert("RGB")
    if pre.resize == "shorter_side":  # resized and centre-cropped as predict does (pipeline.as_split)
        return ExplainImage(source, display, _model_pixels(pre.tensor_geometry()(t), pre),
                            _crop_box(display.size, pre))
    return ExplainImage(source, display, _model_pixels(t, pre), (0, 0, display.width, display.height))


def explain_images(images: Any, pre: Preprocessing, skipped: dict[str, str] | None = None) -> list[ExplainImage]:
    """Image files, folders (recursively), PIL images, or arrays ((H,W), (H,W,C), (N,...)).
    An unreadable file is an error, or - given ``skipped`` - left out and recorded there
    (source -> the one-line reason ``predict`` shows for it)."""
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    t = array_images(images)
    if t is not None:
        return [_from_array(t[i], f"array[{i}]", pre) for i in range(len(t))]
    out: list[ExplainImage] = []
    for item in images:
        if isinstance(item, Image.Image):
            out.append(_from_pil(item, f"image[{len(out)}]", pre))
            continue
        if isinstance(item, np.ndarray):
            out += explain_images(item, pre)
            continue
        p = Path(item)
        if p.is_dir():
            for f in images_in_folder(p):
                _add_file(out, f, pre, skipped)
        elif p.is_file():
            _add_file(out, p, pre, skipped)
        else:
            raise ImgclsError(f"image not found: {p}", "check the path")
    if not out and skipped:
        first = next(iter(skipped.values()))
        raise ImgclsError(f"none of the {len(skipped)} images could be read (first: {first})",
                          "check the files, e.g. with imgcls audit")
    if not out:
        raise ImgclsError("no images given", "give image files, folders, PIL images or arrays")
    return out


def _add_file(out: list[ExplainImage], path: Path, pre: Preprocessing, skipped: dict[str, str] | None) -> None:
    try:
        out.append(_from_pil(load_image(path, 3), str(path), pre))
    except UnreadableImage as exc:
        if skipped is None:
            raise
        skipped[str(path)] = exc.oneline()  # the reason predict gives the same file (data/loaders.py)
