"""Reference images from the client: base64 -> checked, decoded RGB array.

Decoding goes through Pillow with the size checked from the header before any pixel is
decoded (and ``Image.MAX_IMAGE_PIXELS`` set as a backstop), then ``verify`` and a full load.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")


class ImageError(ValueError):
    """The image cannot be used; ``code`` is the protocol error code, the message names the limit."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def set_pixel_limit(max_pixels: int) -> None:
    """Pillow's decompression-bomb limit (process-wide): a second line behind :func:`decode_image`."""
    Image.MAX_IMAGE_PIXELS = max_pixels


def decode_image(data: str, *, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Decode a base64 PNG/JPEG/WebP (a ``data:`` URL prefix is allowed) to uint8 ``[H, W, 3]`` RGB.

    Raises:
        ImageError: ``image_invalid`` (not base64, not an image, unsupported format, corrupt)
            or ``image_too_large`` (over ``max_bytes`` or ``max_pixels``).
    """
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image_invalid", "image: not valid base64") from None
    if len(raw) > max_bytes:
        raise ImageError("image_too_large", f"image: {len(raw)} bytes; the limit is max_image_bytes = {max_bytes}")
    try:
        with Image.open(io.BytesIO(raw)) as probe:
            fmt = probe.format
            width, height = probe.size
            if fmt not in ACCEPTED_FORMATS:
                raise ImageError("image_invalid", f"image: format {fmt} is not one of {', '.join(ACCEPTED_FORMATS)}")
            if width * height > max_pixels:
                raise ImageError(
                    "image_too_large",
                    f"image: {width}x{height} = {width * height} pixels; the limit is max_image_pixels = {max_pixels}",
                )
            probe.verify()
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            rgb = image.convert("RGB")
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("image_invalid", "image: not a PNG, JPEG or WebP image") from None
    except Image.DecompressionBombError:
        raise ImageError("image_too_large", f"image: over the limit max_image_pixels = {max_pixels}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError("image_invalid", f"image: cannot be decoded ({type(exc).__name__})") from None
    if rgb.width == 0 or rgb.height == 0:
        raise ImageError("image_invalid", "image: has no pixels")
    return np.asarray(rgb, dtype=np.uint8)
