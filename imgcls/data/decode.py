"""The only place that opens image files.

Decoding goes through Pillow (every common format; EXIF orientation applied) and ends
in an RGB or L image, whichever the model needs. Every failure becomes an
:class:`ImgclsError` that names the file.
"""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from imgcls.errors import ImgclsError

# Extensions treated as images when scanning folders (Pillow decodes all of them).
IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .png .bmp .gif .webp .tif .tiff .ppm .pgm .pbm .pnm".split()
)

# Refuse decompression bombs outright. Pillow checks the header's size in Image.open
# (before any pixel memory is allocated) but only *warns* between MAX_IMAGE_PIXELS and
# twice that; :func:`check_pixels` turns that band into a refusal too. 89.5 Mpx is
# Pillow's default (a 9500 x 9500 photo passes, a 50k x 50k PNG header does not).
Image.MAX_IMAGE_PIXELS = int(os.environ.get("IMGCLS_MAX_IMAGE_PIXELS", 89_478_485))


def check_pixels(im: Image.Image, path: Path) -> None:
    """Refuse an opened (not yet decoded) image whose header claims too many pixels."""
    w, h = im.size
    limit = Image.MAX_IMAGE_PIXELS
    if limit and w * h > limit:
        raise UnreadableImage(f"refused {path}: its header claims {w}x{h} = {w * h / 1e6:.0f} Mpx, over the "
                          f"{limit / 1e6:.0f} Mpx limit (a decompression bomb?)",
                          "set IMGCLS_MAX_IMAGE_PIXELS to a larger pixel count if the image is genuine",
                          f"too many pixels ({w}x{h}, a decompression bomb?)")


# Truncated or corrupt data: Pillow's decoders signal it with any of these.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, ZeroDivisionError)


class UnreadableImage(ImgclsError):
    """An image file that cannot be used; ``reason`` is a short phrase for reports
    ("empty file", "truncated or corrupt", ...)."""

    def __init__(self, message: str, hint: str, reason: str):
        super().__init__(message, hint)
        self.reason = reason


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def images_in_folder(folder: Path) -> list[Path]:
    """Every image file below ``folder`` (recursively, sorted); an error when there is none."""
    found = sorted(f for f in Path(folder).rglob("*") if f.is_file() and is_image_file(f))
    if not found:
        raise ImgclsError(f"no images in folder {folder}", "give image files or a folder that has some")
    return found


def _flatten_alpha(img: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """Composite transparency onto a white background instead of dropping it."""
    rgba = img.convert("RGBA")
    base = Image.new("RGBA", rgba.size, background + (255,))
    return Image.alpha_composite(base, rgba).convert("RGB")


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert a decoded image to 'L' (channels=1) or 'RGB' (channels=3)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits instead of clipping
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray((arr / top * 255.0).round().clip(0, 255).astype("uint8"), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        img = _flatten_alpha(img)
    if channels == 1:
        return img.convert("L")
    if channels == 3:
        return img.convert("RGB")
    raise ImgclsError(f"unsupported channel count {channels}", "use 1 (grayscale) or 3 (RGB)")


def _draft(im: Image.Image, min_side: int | None, square: bool) -> None:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling: several times
    faster) when the image stays at least ``min_side`` on its shorter side (``square``:
    on both sides, for squash resizing). Other formats ignore it."""
    if not min_side or im.format != "JPEG":
        return
    w, h = im.size
    if square:
        want = (min_side, min_side)
    else:
        short = min(w, h)
        want = (-(-w * min_side // short), -(-h * min_side // short))
    im.draft(im.mode, want)


def load_image(path: str | Path, channels: int = 3, min_side: int | None = None,
               square: bool = False) -> Image.Image:
    """Decode ``path`` fully (first frame of animations), apply EXIF orientation and
    convert to ``channels``. ``min_side`` allows a reduced-size JPEG decode that keeps
    the shorter side (both sides with ``square``) at least that long. Raises
    ImgclsError naming the file on any failure."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # Pillow warns for headers between 1x and 2x the limit; check_pixels refuses them
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            check_pixels(im, path)
            im.seek(0)
            _draft(im, min_side, square)
            im.load()
            img = ImageOps.exif_transpose(im) or im
            return to_mode(img, channels)
    except FileNotFoundError:
        raise UnreadableImage(f"image not found: {path}", "check the path", "file not found") from None
    except PermissionError:
        raise UnreadableImage(f"cannot read {path}: permission denied", "fix the file's permissions",
                              "permission denied") from None
    except IsADirectoryError:
        raise UnreadableImage(f"{path} is a folder, not an image", "give image files", "a folder") from None
    except Image.DecompressionBombError as exc:  # Pillow's own check in open(): over 2x the limit
        claimed = str(exc).split(",")[0]  # "Image size (N pixels) exceeds limit of M pixels"
        raise UnreadableImage(f"refused {path}: {claimed} (a decompression bomb?)",
                              "set IMGCLS_MAX_IMAGE_PIXELS to a larger pixel count if the image is genuine",
                              "too many pixels (a decompression bomb?)") from None
    except UnidentifiedImageError:
        what = "an empty file" if _size(path) == 0 else "not an image Pillow can read"
        raise UnreadableImage(f"{path} is {what}", "remove it or replace it with a valid image",
                              what.replace("an empty", "empty").replace(" Pillow can read", "")) from None
    except DECODE_ERRORS as exc:
        raise UnreadableImage(f"cannot decode {path}: {exc}", "the file is corrupt or truncated; remove or replace it",
                              f"truncated or corrupt ({exc})") from None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1
