"""Uploaded bytes -> a decoded image, or an HTTP status that says what was wrong.

* not an image format Pillow knows          -> 415
* an image that fails to decode (corrupt,
  truncated)                                -> 422
* more pixels than allowed (decompression
  bomb; the check reads only the header)    -> 422
* more bytes than --max-upload-mb           -> 413 (also enforced while the body streams in,
                                               see app.BodyLimit)
Decoding goes through imgcls.data.decode (EXIF orientation, alpha flattening, modes),
the same code that training and ``imgcls predict`` use.
"""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, ImageOps, UnidentifiedImageError

from imgcls.data.decode import to_mode


class UploadError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def decode_upload(data: bytes, channels: int, max_bytes: int, max_pixels: int | None = None,
                  name: str = "upload") -> Image.Image:
    if not data:
        raise UploadError(400, f"{name} is empty: send an image file")
    if len(data) > max_bytes:
        raise UploadError(413, f"{name} is {len(data) / 2**20:.1f} MiB, more than the "
                               f"{max_bytes / 2**20:.1f} MiB allowed (--max-upload-mb)")
    max_pixels = max_pixels or Image.MAX_IMAGE_PIXELS
    try:
        with Image.open(io.BytesIO(data)) as im:
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; a server refuses outright,
            # before anything is decompressed
            if im.width * im.height > max_pixels:
                raise UploadError(422, f"{name} claims {im.width}x{im.height} pixels, more than the "
                                       f"{max_pixels:,} allowed (decompression bomb?)")
            im.seek(0)
            im.load()
            img = ImageOps.exif_transpose(im) or im
            return to_mode(img, channels)
    except UploadError:
        raise
    except Image.DecompressionBombError:
        raise UploadError(422, f"{name} has too many pixels (decompression bomb)") from None
    except UnidentifiedImageError:
        if _has_image_signature(data):  # says it is a PNG/JPEG/...: a damaged image, not a wrong type
            raise UploadError(422, f"{name} is a corrupt image (its header is unreadable)") from None
        raise UploadError(415, f"{name} is not an image format this server reads "
                               "(send JPEG, PNG, WebP, GIF, BMP or TIFF)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UploadError(422, f"{name} is a corrupt or truncated image ({exc})") from None


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
