"""A reproducible class folder of the odd files users have (tests/test_oddfiles.py).

:func:`write_corpus` writes it and returns, for every entry, what imgcls must do with it:
``Decoded(reference, tol)`` (the pixels :func:`load_image` with ``intensity="auto"`` gives,
computed here independently: numpy for the intensity windows, pydicom's own VOI LUT for
DICOM), ``Listed(reason)`` (in skipped.csv / the audit with that reason) or
``Passed(why)`` (a hidden file or a sidecar: passed over, counted). DICOM files are
pydicom's own test data (``pydicom.data.get_testdata_file``).
"""

from __future__ import annotations

import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tests.imagefiles import bomb_png, jpeg_bytes


@dataclass
class Decoded:
    reference: np.ndarray  # (H, W) or (H, W, 3) uint8 that load_image(path, channels, intensity="auto") gives
    tol: int = 0  # max abs difference (lossy formats)
    channels: int = 3


@dataclass
class Listed:
    reason: str  # start of the reason in skipped.csv and the audit


@dataclass
class Passed:
    why: str  # "hidden file" | "sidecar"


def gradient(h: int = 32, w: int = 48) -> np.ndarray:
    """A smooth colour image (lossy codecs keep it within a few levels)."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), np.full_like(xx, 90)], -1).astype(np.uint8)


def encoded(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def percentile_window(values: np.ndarray, lo: float = 0.5, hi: float = 99.5) -> np.ndarray:
    a, b = np.percentile(values, [lo, hi])
    return np.round(np.clip((values - a) / (b - a), 0, 1) * 255).astype(np.uint8)


def _formats(d: Path) -> dict[str, object]:
    import pillow_heif

    pillow_heif.register_heif_opener()
    import pillow_jxl  # noqa: F401 (registers the JXL plugin)

    rgb = gradient()
    out: dict[str, object] = {}
    (d / "plain.png").write_bytes(encoded(rgb, "PNG"))
    out["plain.png"] = Decoded(rgb)
    (d / "photo.jfif").write_bytes(jpeg_bytes(rgb))
    out["photo.jfif"] = Decoded(rgb, tol=12)
    (d / "no_extension").write_bytes(encoded(rgb[::-1], "PNG"))
    out["no_extension"] = Decoded(rgb[::-1])
    (d / "png_named.jpg").write_bytes(encoded(rgb[:, ::-1], "PNG"))  # wrong extension
    out["png_named.jpg"] = Decoded(rgb[:, ::-1])
    (d / "iphone.heic").write_bytes(encoded(rgb, "HEIF", quality=95))
    out["iphone.heic"] = Decoded(rgb, tol=16)
    (d / "web.avif").write_bytes(encoded(rgb, "AVIF", quality=95))
    out["web.avif"] = Decoded(rgb, tol=16)
    (d / "new.jxl").write_bytes(encoded(rgb, "JXL", lossless=True))
    out["new.jxl"] = Decoded(rgb)
    icon = np.repeat(np.repeat(gradient(8, 8), 8, 0), 8, 1)  # 64 x 64
    (d / "favicon.ico").write_bytes(encoded(icon, "ICO", sizes=[(16, 16), (32, 32), (64, 64)]))
    out["favicon.ico"] = Decoded(icon)  # the largest size, not the 16 px one
    return out


def _high_depth(d: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    full = (np.arange(32 * 48).reshape(32, 48) * 42).astype(np.uint16)  # 0..64470: uses the range
    Image.fromarray(full).save(d / "full16.tif")
    out["full16.tif"] = Decoded(np.round(full / 65535 * 255).astype(np.uint8), channels=1)
    narrow = (291 + np.arange(32 * 48).reshape(32, 48) * 403 // (32 * 48 - 1)).astype(np.uint16)  # 291..694
    Image.fromarray(narrow).save(d / "narrow16.tif")
    out["narrow16.tif"] = Decoded(percentile_window(narrow.astype(np.float64)), tol=1, channels=1)  # rounding
    values = np.linspace(-3.1, 3.1, 32 * 48, dtype=np.float32).reshape(32, 48)
    Image.fromarray(values, "F").save(d / "float32.tif")
    out["float32.tif"] = Decoded(percentile_window(values.astype(np.float64)), tol=1, channels=1)
    return out


def _dicom(d: Path) -> dict[str, object]:
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    out: dict[str, object] = {}
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # Rescale Slope/Intercept, no window
    shutil.copy(get_testdata_file("CT_small.dcm"), d / "ct.dcm")
    hu = apply_modality_lut(ct.pixel_array, ct).astype(np.float64)
    out["ct.dcm"] = Decoded(percentile_window(hu), tol=1, channels=1)
    ct.PhotometricInterpretation = "MONOCHROME1"  # white = low values: inverted
    ct.save_as(d / "ct_monochrome1.dcm")
    out["ct_monochrome1.dcm"] = Decoded(255 - percentile_window(hu), tol=1, channels=1)
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))  # Window Center 600 / Width 1600
    shutil.copy(get_testdata_file("MR_small.dcm"), d / "mr_scan")  # no extension: found by its DICM preamble
    voi = apply_voi_lut(mr.pixel_array.astype(np.float64), mr)  # pydicom's windowing, onto the stored range
    bits = mr.BitsStored
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if mr.PixelRepresentation else (0, 2**bits - 1)
    out["mr_scan"] = Decoded(np.round((voi - lo) / (hi - lo) * 255).astype(np.uint8), tol=1, channels=1)
    dose = pydicom.dcmread(get_testdata_file("rtdose.dcm"))  # 15 frames: the first one
    shutil.copy(get_testdata_file("rtdose.dcm"), d / "dose_15frames.dcm")
    frame0 = apply_modality_lut(dose.pixel_array[0], dose).astype(np.float64)
    out["dose_15frames.dcm"] = Decoded(percentile_window(frame0), tol=1, channels=1)
    colour = pydicom.dcmread(get_testdata_file("examples_rgb_color.dcm"))
    shutil.copy(get_testdata_file("examples_rgb_color.dcm"), d / "colour.dcm")
    out["colour.dcm"] = Decoded(colour.pixel_array)
    shutil.copy(get_testdata_file("MR_truncated.dcm"), d / "truncated.dcm")
    out["truncated.dcm"] = Listed("truncated or corrupt")
    shutil.copy(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"), d / "jpegls.dcm")
    out["jpegls.dcm"] = Listed("unsupported format — pip install pylibjpeg")
    return out


def _broken(d: Path) -> dict[str, object]:
    good = jpeg_bytes(gradient())
    heic = encoded(gradient(), "HEIF", quality=90)
    png = encoded(gradient(), "PNG")
    files = {
        "truncated.jpg": (good[: len(good) // 2], "truncated or corrupt"),
        "truncated.heic": (heic[: len(heic) // 2], "truncated or corrupt"),
        "damaged.jxl": (b"\xff\n" + bytes(range(40)), "truncated or corrupt"),  # the plugin raises RuntimeError
        "corrupt.png": (png[:60] + bytes(range(256)) * 4 + png[-12:], "truncated or corrupt"),
        "zero.jpg": (b"", "empty file"),
        "text.jpg": (b"this is not a picture\n", "not an image"),
        "readme.md": (b"# notes\n", "not an image"),
        "random.bin": (np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not an image"),
        "bomb.png": (bomb_png(), "too many pixels"),
        "big_header.png": (bomb_png(10_000, 12_000), "too many pixels"),
    }
    out: dict[str, object] = {}
    for name, (data, reason) in files.items():
        (d / name).write_bytes(data)
        out[name] = Listed(reason)
    os.symlink(d / "gone.jpg", d / "broken_link.jpg")
    out["broken_link.jpg"] = Listed("broken link")
    os.symlink("self_loop.png", d / "self_loop.png")
    out["self_loop.png"] = Listed("symlink loop")
    (d / "sub").mkdir()
    (d / "sub" / "nested.png").write_bytes(png)
    out["sub/nested.png"] = Decoded(gradient())
    os.symlink("..", d / "sub" / "up")  # a link to a folder above it
    out["sub/up"] = Listed("symlink loop")
    os.mkfifo(d / "pipe.jpg")
    out["pipe.jpg"] = Listed("not a regular file")
    return out


def _passed(d: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, why in [(".hidden.jpg", "hidden file"), (".DS_Store", "hidden file"), ("Thumbs.db", "sidecar"),
                      ("labels.txt", "sidecar"), ("meta.json", "sidecar"), ("boxes.csv", "sidecar"),
                      ("annotations.xml", "sidecar")]:
        (d / name).write_bytes(jpeg_bytes(gradient()) if name.endswith(".jpg") else b"x\n")
        out[name] = Passed(why)
    return out


def write_corpus(root: Path) -> dict[str, object]:
    """``root/odd/`` (every case) and ``root/plain/`` (two PNGs, so it is a two-class data
    set); returns {path relative to root/odd: Decoded | Listed | Passed}."""
    d = root / "odd"
    d.mkdir(parents=True)
    (root / "plain").mkdir()
    for i in range(2):
        (root / "plain" / f"{i}.png").write_bytes(encoded(gradient()[:, ::1 - 2 * i], "PNG"))
    return _formats(d) | _high_depth(d) | _dicom(d) | _broken(d) | _passed(d)


def every_entry(folder: Path) -> set[str]:
    """Every file, link and special file below ``folder`` (links not followed), relative."""
    found = set()
    for base, dirs, files in os.walk(folder, followlinks=False):
        for name in files + [x for x in dirs if os.path.islink(os.path.join(base, x))]:
            found.add(os.path.relpath(os.path.join(base, name), folder))
    return found
