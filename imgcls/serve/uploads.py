"""Uploaded bytes -> a decoded image, or an HTTP status that says what was wrong.

* an empty upload                           -> 400
* more bytes than --max-upload-mb           -> 413 (also enforced while the body streams in,
                                               see app.BodyLimit)
* not one of the formats the service reads  -> 415 (JPEG, PNG, WebP, GIF, BMP, TIFF: only
                                               these Pillow plugins ever see the bytes, so
                                               no EPS/Ghostscript, ICO, FITS, ...)
* an image that fails to decode (corrupt,
  truncated, any decoder error)             -> 422
* more pixels than --max-pixels (a
  decompression bomb)                       -> 422, judged from the header before anything
                                               is decompressed, and again after decoding;
                                               Pillow's DecompressionBombWarning is an error
Decoding goes through imgcls.data.decode (EXIF orientation, alpha flattening, modes,
the reduced-scale JPEG decode), the same code that training and ``imgcls predict`` use:
``min_side`` (:func:`imgcls.data.cache.decode_min_side`) is the one ``eval_batches`` decodes files with, so
an uploaded JPEG reaches the model as the same pixels as the file does.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Sequence

from PIL import Image, ImageOps, UnidentifiedImageError

from imgcls.data import formats as file_formats
from imgcls.data.decode import DECODE_ERRORS, UnreadableImage, draft, to_mode

# The formats the service documents (README, docs/deploy.md, the page). Pillow identifies
# multi-picture JPEGs (MPO) through its JPEG plugin, so they are read too.
SERVE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
FORMAT_NAMES = "JPEG, PNG, WebP, GIF, BMP or TIFF"
DEFAULT_MAX_PIXELS = 40_000_000  # the server's own limit (--max-pixels), below Pillow's 89.5 Mpx

# What a decoder may raise on hostile bytes besides the errors decode.py lists
# (found by fuzzing: TypeError when Pillow rewrites a damaged EXIF block or TIFF tag,
# OverflowError for a TIFF tag too large for C).
_MORE_DECODE_ERRORS = (TypeError, OverflowError)


class UploadError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def pixel_limit(max_pixels: int | None) -> int:
    """The effective limit: ``max_pixels`` (default: Pillow's), never above Pillow's own, since
    Pillow warns from there on and the service refuses what Pillow warns about."""
    limits = [n for n in (max_pixels, Image.MAX_IMAGE_PIXELS) if n]
    return min(limits) if limits else DEFAULT_MAX_PIXELS


def refuse_bomb_warnings() -> None:
    """Make Pillow's DecompressionBombWarning an exception in this process, as Pillow's docs
    advise for servers. A process-wide filter, not ``warnings.catch_warnings()``, because
    uploads decode on many threads at once and ``catch_warnings`` is not thread-safe."""
    for action, _msg, category, _module, _line in warnings.filters:
        if issubclass(Image.DecompressionBombWarning, category):
            if action == "error":
                return
            break
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


def claimed_pixels(data: bytes, formats: Sequence[str] = SERVE_FORMATS) -> int:
    """Width x height from the header alone (nothing is decompressed); 0 when the bytes do not
    open, in which case decode_upload says why."""
    refuse_bomb_warnings()
    try:
        im = Image.open(io.BytesIO(data), formats=list(formats))
        return im.width * im.height
    except Exception:  # any failure: decode_upload repeats the open and reports it properly
        return 0


def _check_pixels(size: tuple[int, int], limit: int, name: str, verb: str) -> None:
    w, h = size
    if w * h > limit:
        raise UploadError(422, f"{name} {verb} {w}x{h} = {w * h / 1e6:.1f} Mpx, more than the "
                               f"{limit / 1e6:.1f} Mpx allowed (--max-pixels; a decompression bomb?)")


def decode_upload(data: bytes, channels: int, max_bytes: int, max_pixels: int | None = None,
                  name: str = "upload", formats: Sequence[str] = SERVE_FORMATS,
                  min_side: int | None = None, draft_up_to: int | None = None) -> Image.Image:
    """Decode ``data`` to an 'L' or 'RGB' image, or raise :class:`UploadError` with a 4xx status.
    ``min_side``: a JPEG may decode at reduced scale while its shorter side stays that long
    (:func:`imgcls.data.cache.decode_min_side`; None: full size); ``draft_up_to``: only when
    its longer side is at most that (None: any size)."""
    if not data:
        raise UploadError(400, f"{name} is empty: send an image file")
    if len(data) > max_bytes:
        raise UploadError(413, f"{name} is {len(data) / 2**20:.1f} MiB, more than the "
                               f"{max_bytes / 2**20:.1f} MiB allowed (--max-upload-mb)")
    limit = pixel_limit(max_pixels)
    refuse_bomb_warnings()
    try:
        im = Image.open(io.BytesIO(data), formats=list(formats))
        _check_pixels(im.size, limit, name, "is")  # from the header: before the pixels are decompressed
        im.seek(0)
        if file_formats.deep_colour(im):  # 16 bits a channel: read at full depth, as files are
            return to_mode(im, channels)
        if draft_up_to is None or max(im.size) <= draft_up_to:
            draft(im, min_side, square=False)  # as open_pillow does for files (eval_batches' min_side)
        im.load()
        _check_pixels(im.size, limit, name, "decoded to")  # in case a plugin learns the size only now
        ImageOps.exif_transpose(im, in_place=True)
        if im.mode == ("L" if channels == 1 else "RGB") and "transparency" not in im.info:
            return im  # already what the model takes: no copy of a possibly large image
        return to_mode(im, channels)
    except UploadError:
        raise
    except UnreadableImage as exc:  # e.g. a 16-bit colour PNG without imagecodecs installed
        raise UploadError(415, f"{name}: {exc.oneline()}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UploadError(422, f"{name} has too many pixels ({str(exc).split(',')[0]}; a decompression "
                               "bomb?)") from None
    except UnidentifiedImageError:
        if _has_image_signature(data):  # says it is a PNG/JPEG/...: a damaged image, not a wrong type
            raise UploadError(422, f"{name} is a corrupt image (its header is unreadable)") from None
        raise UploadError(415, f"{name} is not an image format this server reads (send {FORMAT_NAMES})") from None
    except (*DECODE_ERRORS, *_MORE_DECODE_ERRORS) as exc:
        raise UploadError(422, f"{name} is a corrupt or truncated image ({_one_line(exc)})") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:160]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# Leading bytes of the formats a server is asked to read; Pillow reports a damaged header of
# any of these as "unidentified", which would otherwise read as a wrong file type.
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def _has_image_signature(data: bytes) -> bool:
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def decode_base64(text: str, max_bytes: int) -> bytes:
    if not isinstance(text, str) or not text:
        raise UploadError(400, "JSON body needs \"image\": a base64 string")
    if text.startswith("data:"):  # a data URL, as a browser's FileReader makes
        text = text.split(",", 1)[-1]
    if len(text) > max_bytes * 4 // 3 + 8:
        raise UploadError(413, f"the image is more than the {max_bytes / 2**20:.1f} MiB allowed (--max-upload-mb)")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise UploadError(422, "\"image\" is not valid base64") from None
