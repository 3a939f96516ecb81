"""The only place that opens image files.

Decoding goes through Pillow (every common format; EXIF orientation applied) and ends
in an RGB or L image, whichever the model needs. Every failure becomes an
:class:`ImgclsError` that names the file.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from imgcls.errors import ImgclsError

# Extensions treated as images when scanning folders (Pillow decodes all of them).
IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .png .bmp .gif .webp .tif .tiff .ppm .pgm .pbm .pnm".split()
)

# Refuse decompression bombs outright: Pillow only warns between MAX_IMAGE_PIXELS and
# twice that, and raises DecompressionBombError above. 89.5 Mpx is Pillow's default.
Image.MAX_IMAGE_PIXELS = int(os.environ.get("IMGCLS_MAX_IMAGE_PIXELS", 89_478_485))


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


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
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = _flatten_alpha(img)
    if channels == 1:
        return img.convert("L")
    if channels == 3:
        return img.convert("RGB")
    raise ImgclsError(f"unsupported channel count {channels}", "use 1 (grayscale) or 3 (RGB)")


def load_image(path: str | Path, channels: int = 3) -> Image.Image:
    """Decode ``path`` fully (first frame of animations), apply EXIF orientation and
    convert to ``channels``. Raises ImgclsError naming the file on any failure."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.seek(0)
            im.load()
            img = ImageOps.exif_transpose(im) or im
            return to_mode(img, channels)
    except FileNotFoundError:
        raise ImgclsError(f"image not found: {path}", "check the path") from None
    except PermissionError:
        raise ImgclsError(f"cannot read {path}: permission denied", "fix the file's permissions") from None
    except Image.DecompressionBombError as exc:
        raise ImgclsError(f"refused {path}: {exc}".split(" could be")[0],
                          "it claims too many pixels; set IMGCLS_MAX_IMAGE_PIXELS to allow it") from None
    except UnidentifiedImageError:
        raise ImgclsError(f"{path} is not an image Pillow can read",
                          "remove it or replace it with a valid image") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated / corrupt data
        raise ImgclsError(f"cannot decode {path}: {exc}", "the file is corrupt or truncated; remove or replace it") from None
