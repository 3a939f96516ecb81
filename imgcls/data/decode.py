"""The only place that opens image files.

Decoding goes through Pillow (every common format, plus HEIC/HEIF, AVIF, JPEG XL and
DICOM through :mod:`imgcls.data.formats`; EXIF orientation applied) and ends in an L or
RGB image, whichever the model needs, or, for 16-bit, 32-bit and float data, in a
single-channel high-bit-depth image (``I;16``, ``I``, ``F``) or a 16-bit colour image
(:func:`imgcls.data.intensity.deep_image`: PNG / TIFF of 16 bits a channel, which Pillow
would decode at 8, read by ``imagecodecs`` / ``tifffile``) that the model's
:class:`~imgcls.data.transforms.Preprocessing` maps with its intensity setting
(:mod:`imgcls.data.intensity`). Files are recognised by their bytes, not their names.
Every failure becomes an :class:`UnreadableImage` that names the file and has a short
``reason`` for reports.

Folder scans (:func:`scan_folder`) account for every entry: a file is a candidate (decoded,
or reported with its reason: not an image, broken link, symlink loop, unsupported format
— pip install ...) unless it is hidden or a known non-image sidecar, which are passed over
and counted.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from imgcls.data import formats
import numpy as np

from imgcls.data.intensity import HIGH_DEPTH_MODES, deep_image, deep_pixels, map_8bit, parse_intensity
from imgcls.errors import ImgclsError

# Extensions of the image formats imgcls decodes (for documentation and quick checks; folder
# scans look at every file's bytes, whatever its name).
IMAGE_EXTENSIONS = frozenset(
    (".jpg .jpeg .jpe .jfif .png .bmp .gif .webp .tif .tiff .ppm .pgm .pbm .pnm .ico .avif .heic .heif "
     ".jxl .dcm .dicom").split()
)
# Passed over by folder scans (and counted): known non-image companions of image files.
SIDECAR_SUFFIXES = frozenset(".txt .json .csv .xml".split())
SIDECAR_NAMES = frozenset(["thumbs.db", "desktop.ini"])

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


def passed_over(path: Path) -> str | None:
    """Why a folder scan passes ``path`` over ("hidden file", "sidecar"), or None: a candidate."""
    name = path.name
    if name.startswith("."):
        return "hidden file"
    if path.suffix.lower() in SIDECAR_SUFFIXES or name.lower() in SIDECAR_NAMES:
        return "sidecar"
    return None


def is_image_file(path: Path) -> bool:
    """Whether a folder scan hands ``path`` to the decoder (everything but hidden files and sidecars)."""
    return passed_over(path) is None


@dataclass
class FolderScan:
    files: list[Path] = field(default_factory=list)  # candidates, sorted: decoded or reported with a reason
    passed_over: list[tuple[Path, str]] = field(default_factory=list)  # (entry, "hidden file" | "sidecar")


def scan_folder(folder: str | Path) -> FolderScan:
    """Every entry below ``folder``, recursively: links to folders are followed (a link back
    to a folder above it is a candidate that decodes to "symlink loop"), broken links,
    link loops, FIFOs and other special files are candidates too, so each gets its reason."""
    out = FolderScan()
    _walk(Path(folder), out, _ancestors(Path(folder)))
    out.files.sort()
    out.passed_over.sort()
    return out


def _ancestors(folder: Path) -> set[tuple[int, int]]:
    """(device, inode) of every folder above ``folder`` (as written and as resolved): a link
    from a class folder up to the data root (``cat/loop -> ..``) is a loop, not more images."""
    out = set()
    for p in {*Path(os.path.abspath(folder)).parents, *Path(os.path.realpath(folder)).parents}:
        try:
            st = os.stat(p)
        except OSError:
            continue
        out.add((st.st_dev, st.st_ino))
    return out


def _walk(folder: Path, out: FolderScan, above: set[tuple[int, int]]) -> None:
    try:
        st = os.stat(folder)
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        out.files.append(folder)  # unreadable folder: the decoder says why
        return
    here = above | {(st.st_dev, st.st_ino)}
    for e in entries:
        p = Path(e.path)
        why = passed_over(p)
        if why:
            out.passed_over.append((p, why))
            continue
        try:
            is_dir = e.is_dir()  # follows links
        except OSError:
            is_dir = False
        if not is_dir:
            out.files.append(p)
            continue
        try:
            target = os.stat(p)
        except OSError:
            out.files.append(p)
            continue
        if (target.st_dev, target.st_ino) in here:
            out.files.append(p)  # a link to a folder above it: "symlink loop"
        else:
            _walk(p, out, here)


def images_in_folder(folder: Path) -> list[Path]:
    """Every candidate file below ``folder`` (recursively, sorted; see :func:`scan_folder`);
    an error when there is none."""
    found = scan_folder(folder).files
    if not found:
        raise ImgclsError(f"no images in folder {folder}", "give image files or a folder that has some")
    return found


def path_problem(path: Path) -> UnreadableImage | None:
    """Why ``path`` cannot be opened as a file (missing, broken link, link loop, a folder, a
    FIFO or device, no permission), or None when it is a regular file."""
    try:
        lst = os.lstat(path)
    except FileNotFoundError:
        return UnreadableImage(f"image not found: {path}", "check the path", "file not found")
    except OSError as exc:
        return UnreadableImage(f"cannot read {path}: {exc.strerror}", "check the path", f"cannot read ({exc.strerror})")
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return UnreadableImage(f"{path} is a symlink loop", "remove the link or point it at an image",
                                   "symlink loop")
        if stat.S_ISLNK(lst.st_mode):
            return UnreadableImage(f"{path} is a broken link (to {os.readlink(path)})",
                                   "remove the link or restore the file it points to", "broken link")
        return UnreadableImage(f"cannot read {path}: {exc.strerror}", "check the path", f"cannot read ({exc.strerror})")
    if stat.S_ISDIR(st.st_mode):
        real, parent = os.path.realpath(path), os.path.realpath(path.parent)
        if stat.S_ISLNK(lst.st_mode) and (parent + os.sep).startswith(real.rstrip(os.sep) + os.sep):
            return UnreadableImage(f"{path} is a symlink loop (a link to {real}, a folder above it)",
                                   "remove the link", "symlink loop")
        return UnreadableImage(f"{path} is a folder, not an image", "give image files", "a folder")
    if not stat.S_ISREG(st.st_mode):
        return UnreadableImage(f"{path} is not a regular file (a FIFO, socket or device)", "remove it",
                               "not a regular file")
    if not os.access(path, os.R_OK):
        return UnreadableImage(f"cannot read {path}: permission denied", "fix the file's permissions",
                               "permission denied")
    return None


def _flatten_alpha(img: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """Composite transparency onto a white background instead of dropping it."""
    rgba = img.convert("RGBA")
    base = Image.new("RGBA", rgba.size, background + (255,))
    return Image.alpha_composite(base, rgba).convert("RGB")


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert a decoded image to 'L' (channels=1) or 'RGB' (channels=3). High-bit-depth
    single-channel images (``I;16``, ``I``, ``F``) are returned as they are: the model's
    intensity setting maps them (``Preprocessing.pil_transform``, :mod:`imgcls.data.intensity`)."""
    if channels not in (1, 3):
        raise ImgclsError(f"unsupported channel count {channels}", "use 1 (grayscale) or 3 (RGB)")
    fmt = formats.deep_colour(img) if getattr(img, "tile", None) else None  # an unloaded Image.open(...)
    if fmt is not None:
        img = _deep_colour(img.fp, fmt, img, 0, getattr(img, "filename", "") or "image")
    rgb16 = deep_pixels(img)
    if rgb16 is not None:
        return img if channels == 3 else _luma16(rgb16)
    if img.mode in HIGH_DEPTH_MODES:
        return img
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        img = _flatten_alpha(img)
    return img.convert("L" if channels == 1 else "RGB")


def _luma16(rgb16: np.ndarray) -> Image.Image:
    """16-bit colour -> 16-bit grey (``I;16``) by ITU-R 601 luma, as convert("L") does at 8 bits."""
    grey = np.round(rgb16.astype(np.float64) @ np.array([0.299, 0.587, 0.114]))
    return Image.fromarray(np.clip(grey, 0, 65535).astype(np.uint16))


def _on_white16(arr: np.ndarray, premultiplied: bool) -> np.ndarray:
    """(H, W, C) uint16 with alpha (C = 2 or 4) composited on white, as :func:`_flatten_alpha`
    does at 8 bits; without alpha (C = 3) as it is. Grey comes out (H, W)."""
    if arr.shape[-1] in (2, 4):
        colour, alpha = arr[..., :-1].astype(np.float64), arr[..., -1:] / 65535.0
        out = (colour if premultiplied else colour * alpha) + 65535.0 * (1.0 - alpha)
        arr = np.clip(np.round(out), 0, 65535).astype(np.uint16)
    return arr[..., 0] if arr.shape[-1] == 1 else arr


# EXIF orientation -> the transposition that undoes it (as ImageOps.exif_transpose)
_ORIENT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


def _deep_colour(source, fmt: str, im: Image.Image, frame: int, name) -> Image.Image:
    """A PNG / TIFF of 16 bits a channel (``im``: Pillow's opened, unloaded view of it, for its
    size and EXIF orientation) at full depth: grey + alpha as ``I;16``, colour as a
    :func:`deep_image`; alpha composited on white. Pillow would give the high bytes only."""
    _need_plugin(Path(name), fmt)
    if hasattr(source, "seek"):
        source.seek(0)
    arr, premultiplied = formats.load_deep(source, fmt, frame)
    if arr.shape[:2] != (im.height, im.width) or arr.shape[-1] not in (2, 3, 4):
        raise ValueError(f"{arr.shape} pixels where its header says {im.width}x{im.height}")
    arr = _on_white16(arr, premultiplied)
    turn = _ORIENT.get(im.getexif().get(0x0112))
    if turn is not None:  # Pillow transposes one 16-bit channel at a time (no 16-bit colour mode)
        planes = [np.asarray(Image.fromarray(np.ascontiguousarray(c)).transpose(turn))
                  for c in (arr[..., None] if arr.ndim == 2 else arr).transpose(2, 0, 1)]
        arr = np.stack(planes, -1) if arr.ndim == 3 else planes[0]
    return Image.fromarray(arr) if arr.ndim == 2 else deep_image(arr)


def draft(im: Image.Image, min_side: int | None, square: bool) -> None:
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


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(256)


def _need_plugin(path: Path, fmt: str | None) -> None:
    if fmt is not None and not formats.plugin_available(fmt):
        what, pip = formats.missing_plugin(fmt)
        raise UnreadableImage(f"{path} is {what}, which needs an optional package", pip,
                              f"unsupported format — {pip}")


def largest_icon(im: Image.Image) -> None:
    """An ICO file holds several sizes: use the largest (Pillow opens some other one)."""
    if im.format == "ICO" and im.info.get("sizes"):
        im.size = max(im.info["sizes"], key=lambda s: s[0] * s[1])


def open_pillow(path, frame: int = 0, min_side: int | None = None, square: bool = False,
                name: str | None = None) -> Image.Image:
    """Decode ``path`` (a file, or a file object named ``name`` in messages) with Pillow:
    frame ``frame``, EXIF orientation applied, ICO at its largest size. Pillow's
    exceptions pass through (see :func:`load_image`)."""
    with warnings.catch_warnings():
        # Pillow warns for headers between 1x and 2x the limit; check_pixels refuses them
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(path)
    with im:
        largest_icon(im)
        check_pixels(im, name or path)
        if frame >= getattr(im, "n_frames", 1):
            raise IndexError(f"frame {frame} requested, the file has {getattr(im, 'n_frames', 1)}")
        im.seek(frame)
        deep = formats.deep_colour(im)
        if deep is not None:
            return _deep_colour(path, deep, im, frame, name or path)
        draft(im, min_side, square)
        im.load()
        return ImageOps.exif_transpose(im) or im


def decode_file(path: Path, frame: int = 0, min_side: int | None = None, square: bool = False) -> Image.Image:
    """``path`` decoded as it is (any mode); raises UnreadableImage naming the file."""
    problem = path_problem(path)
    if problem is not None:
        raise problem
    fmt = None
    try:
        head = _head(path)
        if not head:
            raise UnreadableImage(f"{path} is an empty file", "remove it or replace it with a valid image",
                                  "empty file")
        fmt = formats.sniff(head, path.name)
        _need_plugin(path, fmt)
        if fmt == "DICOM":
            return _dicom(path, frame)
        return open_pillow(path, frame, min_side, square)
    except UnreadableImage:
        raise
    except (PermissionError, Image.DecompressionBombError, UnidentifiedImageError, RuntimeError,
            *DECODE_ERRORS) as exc:  # RuntimeError: pillow-jxl-plugin on damaged data
        raise as_unreadable(exc, path, fmt) from None


def as_unreadable(exc: Exception, path: Path, fmt: str | None = None) -> UnreadableImage:
    """The UnreadableImage (message, hint, reason) for what Pillow raised decoding ``path``
    (``fmt``: what its bytes say it is, see formats.sniff)."""
    if isinstance(exc, PermissionError):
        return UnreadableImage(f"cannot read {path}: permission denied", "fix the file's permissions",
                               "permission denied")
    if isinstance(exc, Image.DecompressionBombError):  # Pillow's own check in open(): over 2x the limit
        claimed = str(exc).split(",")[0]  # "Image size (N pixels) exceeds limit of M pixels"
        return UnreadableImage(f"refused {path}: {claimed} (a decompression bomb?)",
                               "set IMGCLS_MAX_IMAGE_PIXELS to a larger pixel count if the image is genuine",
                               "too many pixels (a decompression bomb?)")
    if isinstance(exc, (UnidentifiedImageError, RuntimeError)):
        if fmt is not None:  # its signature says HEIF/AVIF/JXL, its plugin cannot read it: damaged
            return UnreadableImage(f"cannot decode {path}: a damaged {fmt} file", "remove or replace it",
                                   f"truncated or corrupt (unreadable {fmt} data)")
        if isinstance(exc, UnidentifiedImageError):
            return UnreadableImage(f"{path} is not an image Pillow can read",
                                   "remove it or replace it with a valid image", "not an image")
    return UnreadableImage(f"cannot decode {path}: {exc}", "the file is corrupt or truncated; remove or replace it",
                           f"truncated or corrupt ({type(exc).__name__}: {exc})")


def _dicom(path: Path, frame: int) -> Image.Image:
    try:
        img = formats.load_dicom(path, frame)
    except LookupError:
        raise UnreadableImage(f"{path} is a DICOM file without an image (no Pixel Data)", "remove it",
                              "not an image (DICOM without pixel data)") from None
    except (RuntimeError, NotImplementedError) as exc:  # pydicom: no decoder for this compression
        pip = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"
        raise UnreadableImage(f"cannot decode {path}: {str(exc).splitlines()[0].rstrip(':')}", pip,
                              f"unsupported format — {pip}") from None
    except (IndexError, *DECODE_ERRORS, AttributeError, KeyError, TypeError) as exc:
        raise UnreadableImage(f"cannot decode {path}: {exc}", "the file is corrupt or truncated; remove or replace it",
                              f"truncated or corrupt ({type(exc).__name__}: {exc})") from None
    check_pixels(img, path)
    return img


def header_mode(path: Path) -> str | None:
    """The mode a file decodes to, from its header only (None: it cannot be read)."""
    path = Path(path)
    try:
        if path_problem(path) is not None:
            return None
        fmt = formats.sniff(_head(path), path.name)
        if fmt is not None and not formats.plugin_available(fmt):
            return None
        if fmt == "DICOM":
            return formats.dicom_mode(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.mode
    except Exception:  # any failure is reported, with its reason, when the file is decoded
        return None


def header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from a file's header only, without decoding its pixels (None: it
    cannot be read this way, e.g. DICOM, or a file that fails to open)."""
    try:
        if path_problem(Path(path)) is not None:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.size
    except Exception:  # reported, with its reason, when the file is decoded
        return None


def typical_side(paths: list[Path], sample: int = 64) -> int | None:
    """The median shorter side of (an evenly spaced sample of) image files, read from their
    headers (a few ms for 64 files); None when none can be read."""
    step = max(1, len(paths) // sample)
    sides = sorted(min(wh) for p in paths[::step][:sample] if (wh := header_size(p)))
    return sides[len(sides) // 2] if sides else None


def frame_count(path: Path) -> int:
    """Frames of a multi-frame DICOM file (its header only); 1 for every other file, and
    for files that cannot be read (their decode reports why)."""
    try:
        if path_problem(Path(path)) is not None:
            return 1
        if formats.sniff(_head(Path(path)), Path(path).name) == "DICOM" and formats.plugin_available("DICOM"):
            return formats.dicom_frames(path)
    except Exception:  # reported, with its reason, when the file is decoded
        return 1
    return 1


def load_image(path: str | Path, channels: int = 3, min_side: int | None = None,
               square: bool = False, frame: int = 0, intensity: str | None = None) -> Image.Image:
    """Decode ``path`` fully (frame ``frame``, default the first), apply EXIF orientation and
    convert to ``channels`` (high-bit-depth grayscale stays as it is unless ``intensity``
    is given, e.g. "auto": then it is mapped to 8 bits here). ``min_side`` allows a
    reduced-size JPEG decode that keeps the shorter side (both sides with ``square``) at
    least that long. Raises UnreadableImage naming the file on any failure."""
    path = Path(path)
    img = to_mode(decode_file(path, frame, min_side, square), channels)
    return map_8bit(img, parse_intensity(intensity), channels) if intensity is not None else img



def load_image_bytes(data: bytes, name: str, channels: int = 3, min_side: int | None = None,
                     square: bool = False) -> Image.Image:
    """An image held as bytes (a member of a shard, named ``name`` in messages) decoded as
    :func:`load_image` decodes a file: recognised by its bytes, first frame, EXIF
    orientation, converted to ``channels``. Raises UnreadableImage naming ``name``."""
    import io

    if not data:
        raise UnreadableImage(f"{name} is empty", "re-write the shard with `imgcls shard`", "empty file")
    fmt = formats.sniff(data[:256], name)
    try:
        _need_plugin(Path(name), fmt)
        if fmt == "DICOM":
            raise UnreadableImage(f"{name} is a DICOM file inside a shard, which imgcls does not decode",
                                  "write the shards with `imgcls shard --resize S` (re-encodes it as PNG)",
                                  "unsupported format (DICOM in a shard)")
        return to_mode(open_pillow(io.BytesIO(data), 0, min_side, square, name=name), channels)
    except UnreadableImage:
        raise
    except (Image.DecompressionBombError, UnidentifiedImageError, RuntimeError, *DECODE_ERRORS) as exc:
        raise as_unreadable(exc, Path(name), fmt) from None
