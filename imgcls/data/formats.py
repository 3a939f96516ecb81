"""Formats beyond Pillow's own: what a file is (by its bytes, not its name), the optional
plugins that decode it, and DICOM.

* HEIC/HEIF (every iPhone photo): ``pillow-heif`` (``pip install pillow-heif``);
* AVIF: Pillow itself from 11.3 on;
* JPEG XL: ``pillow-jxl-plugin``;
* DICOM: ``pydicom`` (Rescale Slope/Intercept applied; the VOI window and MONOCHROME1 are
  passed on to the intensity mapping, :mod:`imgcls.data.intensity`; one frame at a time).

A file of one of these formats whose package is missing is reported as
``unsupported format — pip install NAME``, never silently dropped.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, features

from imgcls.data.intensity import INFO_INVERT, INFO_RANGE, INFO_WINDOW

# format -> (module to import, pip package, what it is)
PLUGINS = {
    "HEIF": ("pillow_heif", "pillow-heif", "a HEIC/HEIF image"),
    "JXL": ("pillow_jxl", "pillow-jxl-plugin", "a JPEG XL image"),
    "DICOM": ("pydicom", "pydicom", "a DICOM file"),
}
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")


def sniff(head: bytes, name: str = "") -> str | None:
    """The format of a file from its first 132+ bytes, for the formats that need more than
    Pillow's own plugins (HEIF, AVIF, JXL, DICOM); None for everything else."""
    if head[128:132] == b"DICM" or (name.lower().endswith(DICOM_SUFFIXES) and head[:1] in (b"\x02", b"\x08")):
        return "DICOM"
    if head[4:8] == b"ftyp":
        size = int.from_bytes(head[:4], "big")
        brands = {head[i:i + 4] for i in range(8, min(max(size, 16), len(head)), 4)} - {head[12:16]}
        if brands & {b"avif", b"avis"}:
            return "AVIF"
        if brands & _HEIF_BRANDS:
            return "HEIF"
    if head[:2] == b"\xff\x0a" or head[:12] == b"\x00\x00\x00\x0cJXL \r\n\x87\n":
        return "JXL"
    return None


@functools.cache
def plugin_available(fmt: str) -> bool:
    """Import (and register with Pillow) the package a format needs; False when it is missing."""
    if fmt == "AVIF":
        return bool(features.check("avif"))
    if fmt not in PLUGINS:
        return True
    module = PLUGINS[fmt][0]
    try:
        mod = __import__(module)
    except ImportError:
        return False
    if fmt == "HEIF":
        mod.register_heif_opener()
    return True


def missing_plugin(fmt: str) -> tuple[str, str]:
    """(what the file is, the pip command) for a format whose package is absent."""
    if fmt == "AVIF":
        return "an AVIF image", "pip install 'pillow>=11.3'"
    _, package, what = PLUGINS[fmt]
    return what, f"pip install {package}"


def register_available() -> None:
    """Register every optional plugin that is installed (e.g. before Image.open of bytes)."""
    for fmt in ("HEIF", "JXL"):
        plugin_available(fmt)


# ----------------------------------------------------------------------------- DICOM
def dicom_frames(path: str | os.PathLike) -> int:
    """Number of frames in a DICOM file (reads the header only)."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def dicom_mode(path: str | os.PathLike) -> str:
    """'F' (grayscale) or 'RGB': what :func:`load_dicom` gives, from the header only."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    return "F" if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper().startswith("MONO") else "RGB"


def _first(value) -> float | None:
    """A DICOM number, or the first of several (multi-valued Window Center ...)."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        value = value[0] if len(value) else None
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _stored_range(ds) -> tuple[float, float]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return float(-2 ** (bits - 1)), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1)


def _rescaled(ds, lo: float, hi: float) -> tuple[float, float]:
    slope = _first(ds.get("RescaleSlope")) or 1.0
    intercept = _first(ds.get("RescaleIntercept")) or 0.0
    a, b = lo * slope + intercept, hi * slope + intercept
    return min(a, b), max(a, b)


def load_dicom(path: Path, frame: int = 0) -> Image.Image:
    """One frame of a DICOM file as a PIL image: grayscale as mode 'F' holding modality
    values (Rescale Slope/Intercept or the Modality LUT applied, pydicom's
    ``apply_modality_lut``), with the full stored range, the file's VOI window and
    MONOCHROME1 in ``img.info`` for the intensity mapping; colour (RGB, YBR, palette) as
    8-bit RGB. Raises ValueError / OSError / AttributeError on damaged files and
    IndexError for a frame the file does not have."""
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array

    try:
        ds = pydicom.dcmread(path, force=True)
    except pydicom.errors.InvalidDicomError as exc:
        raise ValueError(str(exc)) from None
    if "PixelData" not in ds:
        raise LookupError("no Pixel Data element")
    n = max(1, int(ds.get("NumberOfFrames", 1) or 1))
    if not 0 <= frame < n:
        raise IndexError(f"frame {frame} requested, the file has {n}")
    arr = pixel_array(ds, index=frame if n > 1 else None)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        photometric = "RGB"
    if arr.ndim == 3:  # colour (pydicom converts YBR to RGB)
        if arr.dtype != np.uint8:  # 16/32-bit colour: its stored bits scaled to 8
            top = 2.0 ** int(ds.get("BitsStored", 8 * arr.dtype.itemsize) or 8 * arr.dtype.itemsize) - 1
            arr = np.clip(np.round(arr.astype(np.float64) / top * 255), 0, 255).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(arr), "RGB")
    values = apply_modality_lut(arr, ds).astype(np.float32)
    img = Image.fromarray(np.ascontiguousarray(values), "F")
    img.info[INFO_RANGE] = _rescaled(ds, *_stored_range(ds))
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is not None and width is not None and width >= 1:
        # DICOM PS3.3 C.11.2.1.2.1, linear: below c - 0.5 - (w-1)/2 black, above c - 0.5 + (w-1)/2 white
        img.info[INFO_WINDOW] = (center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2)
    if photometric == "MONOCHROME1":
        img.info[INFO_INVERT] = True
    return img
