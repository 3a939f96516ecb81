"""Formats beyond Pillow's own: what a file is (by its bytes, not its name), the optional
plugins that decode it, and DICOM.

* HEIC/HEIF (every iPhone photo): ``pillow-heif`` (``pip install pillow-heif``);
* AVIF: Pillow itself from 11.3 on;
* JPEG XL: ``pillow-jxl-plugin``;
* DICOM: ``pydicom`` (Rescale Slope/Intercept applied; the VOI window and MONOCHROME1 are
  passed on to the intensity mapping, :mod:`imgcls.data.intensity`; one frame at a time);
* 16 bits a channel colour (and grey + alpha) PNG and TIFF: Pillow opens them but decodes
  them at 8 bits (the high byte: values 1000..3000 become 3..11), so they are read at full
  depth by ``imagecodecs`` (PNG) and ``tifffile`` (TIFF; its compressions need
  ``imagecodecs`` too), recognised from the header (:func:`sniff`, :func:`deep_colour`).

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
    "PNG16": ("imagecodecs", "imagecodecs", "a 16-bit colour PNG"),
    "TIFF16": ("tifffile imagecodecs", "tifffile imagecodecs", "a 16-bit colour TIFF"),
}
_PNG = b"\x89PNG\r\n\x1a\n"
_PNG_RAWMODES_16 = ("RGB;16B", "RGBA;16B", "LA;16B")  # colour types 2, 6, 4 at 16 bits (Pillow's IHDR parse)
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")


def sniff(head: bytes, name: str = "") -> str | None:
    """The format of a file from its first 132+ bytes, for the formats that need more than
    Pillow's own plugins (HEIF, AVIF, JXL, DICOM, PNG16: 16-bit colour or grey + alpha PNG);
    None for everything else (16-bit colour TIFF: see :func:`deep_colour`)."""
    if head[:8] == _PNG and head[12:16] == b"IHDR" and len(head) > 25 and head[24] == 16 and head[25] in (2, 4, 6):
        return "PNG16"
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
    try:
        mod = [__import__(module) for module in PLUGINS[fmt][0].split()][0]
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


# ------------------------------------------------------------ 16 bits a colour channel
def deep_colour(im: Image.Image) -> str | None:
    """"PNG16" / "TIFF16" for an opened (not yet loaded) PNG / TIFF of 16 bits a channel
    with colour or alpha, which Pillow would decode at 8 bits; None for everything else."""
    if im.format == "PNG":
        raw = im.tile[0].args if getattr(im, "tile", None) else None
        return "PNG16" if raw in _PNG_RAWMODES_16 else None
    if im.format != "TIFF":
        return None
    tags = im.tag_v2
    bits, samples = tags.get(258, 1), tags.get(277, 1)
    bits = bits if isinstance(bits, tuple) else (bits,)
    unsigned = tags.get(339, 1) in (1, (1,) * len(bits))  # SampleFormat: unsigned integers
    rgb_or_grey = tags.get(262) in (1, 2)  # Photometric: BlackIsZero (+ alpha) or RGB
    return "TIFF16" if samples >= 2 and set(bits) == {16} and unsigned and rgb_or_grey else None


def load_deep(source, fmt: str, frame: int = 0) -> tuple[np.ndarray, bool]:
    """(pixels (H, W, C) uint16, C = 2 (grey + alpha), 3 or 4; whether the alpha is
    premultiplied) of a "PNG16" / "TIFF16" file (a path, or a binary file object)."""
    if fmt == "PNG16":
        import imagecodecs

        data = source.read() if hasattr(source, "read") else Path(source).read_bytes()
        arr = imagecodecs.png_decode(data)
        return (arr if arr.ndim == 3 else arr[..., None]), False
    import tifffile

    with tifffile.TiffFile(source) as tif:
        page = tif.pages[frame]
        arr = page.asarray()
        if page.axes.startswith("S"):  # planar configuration: one plane a channel
            arr = np.moveaxis(arr, 0, -1)
        return arr, tuple(page.extrasamples[:1]) == (1,)  # ExtraSamples 1: associated alpha


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
