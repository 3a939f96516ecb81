"""Intensity mapping: high bit depth and float pixels -> the 8 (or 16) bits a model reads.

Pillow hands 16-bit TIFF/PNG as mode ``I;16`` (or ``I``), 32-bit float TIFF as ``F``, and the
DICOM reader (:mod:`imgcls.data.formats`) gives modality values (Hounsfield units, ...) as
``F``. 16 bits a channel colour has no Pillow mode: the decoder hands it as an ``RGB`` image
whose 8-bit pixels are its ``auto`` mapping, holding the 16-bit pixels in
``info[INFO_DEEP]`` (:func:`deep_image`; mapped like 16-bit grey, one window over all three
channels so colours keep their ratios). :func:`decode.to_mode` leaves those as they are; :class:`Preprocessing` maps them
here, with the model's ``intensity`` setting, wherever an image is turned into a tensor
(training, the decode cache, evaluate, predict, export checks, serve), so every path maps
a file the same way.

Settings (``--intensity``, saved in ``model.json``):

* ``auto``: 8-bit images as they are; 16-bit (and 32-bit integer) images over their full
  range when their values span at least a quarter of it, else like ``percentile``; float
  images like ``percentile``; DICOM through the file's VOI window (Window Center/Width)
  when it has one, else like ``percentile``.
* ``full-range``: the type's range: 0..255, 0..65535, float 0..1; DICOM the stored bits
  (after Rescale Slope/Intercept).
* ``minmax``: each image's own minimum..maximum.
* ``percentile:LO,HI``: each image's LO-th..HI-th percentile (``percentile`` = 0.5,99.5).
* ``window:LO,HI``: fixed values (e.g. ``window:-1000,400`` for CT in Hounsfield units).

Values outside the window are clipped. MONOCHROME1 DICOM (white = low values) is inverted
after the mapping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from imgcls.errors import ImgclsError

HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
DEFAULT_PERCENTILES = (0.5, 99.5)
INTENSITY_HELP = "auto, full-range, minmax, percentile:0.5,99.5 or window:LO,HI"
# info keys set by the DICOM reader (imgcls.data.formats)
INFO_RANGE, INFO_WINDOW, INFO_INVERT = "imgcls_range", "imgcls_window", "imgcls_invert"
INFO_DEEP = "imgcls_rgb16"  # (H, W, 3) uint16: the pixels of a 16-bit colour image (deep_image)


@dataclass(frozen=True)
class Intensity:
    kind: str  # auto | full-range | minmax | percentile | window
    lo: float = 0.0
    hi: float = 0.0

    def __str__(self) -> str:
        if self.kind in ("percentile", "window"):
            return f"{self.kind}:{_num(self.lo)},{_num(self.hi)}"
        return self.kind


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def parse_intensity(text: object) -> Intensity:
    """``"percentile:1,99"`` -> Intensity; anything else than the documented forms is an ImgclsError."""
    if not isinstance(text, str):
        raise ImgclsError(f"invalid intensity setting {text!r}", f"use {INTENSITY_HELP}")
    kind, _, args = text.strip().lower().partition(":")
    if kind in ("auto", "full-range", "minmax") and not args:
        return Intensity(kind)
    if kind == "percentile" and not args:
        return Intensity(kind, *DEFAULT_PERCENTILES)
    if kind in ("percentile", "window"):
        try:
            lo, hi = (float(v) for v in args.split(","))
        except ValueError:
            raise ImgclsError(f"invalid intensity setting '{text}': {kind} needs two numbers LO,HI",
                              f"e.g. {kind}:{'0.5,99.5' if kind == 'percentile' else '-1000,400'}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ImgclsError(f"invalid intensity setting '{text}': needs finite LO < HI", f"use {INTENSITY_HELP}")
        if kind == "percentile" and not (0 <= lo and hi <= 100):
            raise ImgclsError(f"invalid intensity setting '{text}': percentiles lie in 0..100",
                              "e.g. percentile:0.5,99.5")
        return Intensity(kind, lo, hi)
    raise ImgclsError(f"invalid intensity setting '{text}'", f"use {INTENSITY_HELP}")


def deep_image(rgb16: np.ndarray) -> Image.Image:
    """(H, W, 3) uint16 -> an 'RGB' image (Pillow has no 16-bit colour mode) holding
    ``rgb16`` in ``info[INFO_DEEP]``; its own 8-bit pixels are the ``auto`` mapping of it,
    what code that reads it as plain RGB sees."""
    probe = Image.new("RGB", (rgb16.shape[1], rgb16.shape[0]))
    probe.info[INFO_DEEP] = rgb16
    img = Image.fromarray(np.round(to_unit(probe, Intensity("auto")) * 255.0).astype(np.uint8))
    img.info[INFO_DEEP] = rgb16
    return img


def deep_pixels(img: Image.Image) -> np.ndarray | None:
    """The 16-bit pixels of a :func:`deep_image`, or None (any other image, or one that was
    converted or resized since, which then is plain 8-bit RGB)."""
    arr = img.info.get(INFO_DEEP)
    if arr is None or img.mode != "RGB" or arr.shape[:2] != (img.height, img.width):
        return None
    return arr


def is_high_depth(img: Image.Image) -> bool:
    """16-bit, 32-bit or float pixels (grey modes, or a :func:`deep_image`)."""
    return img.mode in HIGH_DEPTH_MODES or deep_pixels(img) is not None


def _type_range(img: Image.Image, arr: np.ndarray) -> tuple[float, float]:
    if deep_pixels(img) is not None:
        return 0.0, 65535.0
    if INFO_RANGE in img.info:
        return img.info[INFO_RANGE]
    if img.mode == "F":
        return 0.0, 1.0
    if img.mode.startswith("I;16") or (img.mode == "I" and arr.min() >= 0 and arr.max() <= 65535):
        return 0.0, 65535.0
    if img.mode == "I":
        return float(-2**31), float(2**31 - 1)
    return 0.0, 255.0


def window_for(img: Image.Image, arr: np.ndarray, setting: Intensity) -> tuple[float, float] | None:
    """The (lo, hi) values mapped to black and white; None: keep an 8-bit image as it is."""
    kind = setting.kind
    high = is_high_depth(img)
    if kind == "auto":
        if not high:
            return None
        if INFO_WINDOW in img.info:
            return img.info[INFO_WINDOW]
        lo, hi = _type_range(img, arr)
        finite = arr[np.isfinite(arr)]
        if img.mode != "F" and finite.size and finite.max() - finite.min() >= (hi - lo) / 4:
            return lo, hi
        kind, setting = "percentile", Intensity("percentile", *DEFAULT_PERCENTILES)
    if kind == "full-range":
        return None if not high else _type_range(img, arr)
    if kind == "window":
        return setting.lo, setting.hi
    finite = arr[np.isfinite(arr)]
    if kind == "minmax":
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    else:
        lo, hi = (float(v) for v in np.percentile(finite, [setting.lo, setting.hi])) if finite.size else (0.0, 0.0)
    # a constant image has no spread to stretch: it keeps its place in the type's range
    return (lo, hi) if hi > lo else _type_range(img, arr)


def to_unit(img: Image.Image, setting: Intensity) -> np.ndarray | None:
    """Pixels mapped to float32 in [0, 1] ((H, W) or (H, W, C)); None when ``img`` is an
    8-bit image the setting keeps as it is (the caller uses it unchanged)."""
    deep = deep_pixels(img)
    arr = np.asarray(img if deep is None else deep, dtype=np.float64)
    window = window_for(img, arr, setting)
    if window is None:
        return None
    lo, hi = window
    if hi > lo:
        out = (arr - lo) / (hi - lo)
    else:  # a constant image (or a degenerate window): black
        out = np.zeros_like(arr)
    out = np.nan_to_num(np.clip(out, 0.0, 1.0), nan=0.0)
    if img.info.get(INFO_INVERT):
        out = 1.0 - out
    return out.astype(np.float32)


def map_8bit(img: Image.Image, setting: Intensity, channels: int) -> Image.Image:
    """``img`` (any decoded mode) -> 'L' or 'RGB' through ``setting``."""
    from imgcls.data.decode import to_mode

    if not is_high_depth(img) and img.mode not in ("L", "RGB") or deep_pixels(img) is not None:
        img = to_mode(img, channels)
    unit = to_unit(img, setting)
    if unit is not None:
        img = Image.fromarray(np.round(unit * 255.0).astype(np.uint8))
    return img.convert("L" if channels == 1 else "RGB") if img.mode != ("L" if channels == 1 else "RGB") else img


def map_16bit(img: Image.Image, setting: Intensity, channels: int) -> np.ndarray:
    """``img`` -> float32 (C, H, W) holding 16-bit values 0..65535 (an 8-bit image x 257)."""
    from imgcls.data.decode import to_mode

    if not is_high_depth(img) and img.mode not in ("L", "RGB") or deep_pixels(img) is not None:
        img = to_mode(img, channels)
    unit = to_unit(img, setting)
    if unit is None:  # 8-bit, kept: the same values at 16 bits
        unit = np.asarray(img, dtype=np.float32) / 255.0
    arr = unit * 65535.0
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    if channels == 1 and arr.shape[0] == 3:
        arr = (arr * np.array([0.299, 0.587, 0.114], np.float32)[:, None, None]).sum(0, keepdims=True)
    elif channels == 3 and arr.shape[0] == 1:
        arr = np.repeat(arr, 3, 0)
    return np.ascontiguousarray(arr, dtype=np.float32)
