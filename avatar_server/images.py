"""Reference images from the client: base64 -> checked, decoded RGB array.

Decoding goes through Pillow with the size checked from the header before any pixel is
decoded (and ``Image.MAX_IMAGE_PIXELS`` set as a backstop), then ``verify`` and a full load.
The EXIF orientation of a photo (JPEG/WebP from a phone camera) is applied, so the array is
upright as a browser shows it (EXIF 2.32 tag 0x0112; Pillow's ``ImageOps.exif_transpose``).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import re

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
ACCEPTED_BASE64 = (
    "standard (RFC 4648 section 4) or URL-safe (section 5) base64, padding optional, "
    "line breaks and spaces ignored, optionally after a data: URL prefix"
)
_WHITESPACE = re.compile(r"[ \t\r\n]+")


class ImageError(ValueError):
    """The image cannot be used; ``code`` is the protocol error code, the message names the limit."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def set_pixel_limit(max_pixels: int) -> None:
    """Pillow's decompression-bomb limit (process-wide): a second line behind :func:`decode_image`."""
    Image.MAX_IMAGE_PIXELS = max_pixels


def decode_image(data: str, *, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Decode a base64 PNG/JPEG/WebP (any form :func:`decode_base64` takes) to uint8 ``[H, W, 3]``
    RGB, turned upright by its EXIF orientation tag if it has one (``H, W`` are then the
    displayed height and width).

    Raises:
        ImageError: ``image_invalid`` (not base64, not an image, unsupported format, corrupt)
            or ``image_too_large`` (over ``max_bytes`` or ``max_pixels``).
    """
    raw = decode_base64(data)
    if len(raw) > max_bytes:
        raise ImageError(
            "image_too_large", f"image: {len(raw)} bytes; the limit is max_image_bytes = {max_bytes}"
        )
    try:
        with Image.open(io.BytesIO(raw)) as probe:
            fmt = probe.format
            width, height = probe.size
            if fmt not in ACCEPTED_FORMATS:
                raise ImageError(
                    "image_invalid", f"image: format {fmt} is not one of {', '.join(ACCEPTED_FORMATS)}"
                )
            if width * height > max_pixels:
                raise ImageError(
                    "image_too_large",
                    f"image: {width}x{height} = {width * height} pixels; the limit is max_image_pixels = {max_pixels}",
                )
            probe.verify()
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            rgb = _upright(image).convert("RGB")
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("image_invalid", "image: not a PNG, JPEG or WebP image") from None
    except Image.DecompressionBombError:
        raise ImageError(
            "image_too_large", f"image: over the limit max_image_pixels = {max_pixels}"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError("image_invalid", f"image: cannot be decoded ({type(exc).__name__})") from None
    if rgb.width == 0 or rgb.height == 0:
        raise ImageError("image_invalid", "image: has no pixels")
    return np.asarray(rgb, dtype=np.uint8)


def decode_base64(data: str) -> bytes:
    """The bytes of ``data`` in any of the forms of ``ACCEPTED_BASE64``: a ``data:...,`` prefix
    is removed, spaces and line breaks (MIME's 76-column wrapping, RFC 2045 section 6.8) are
    ignored, ``-``/``_`` of the URL-safe alphabet read as ``+``/``/``, missing ``=`` padding is
    restored. Mixing ``+``/``/`` with ``-``/``_`` is refused.

    Raises:
        ImageError: ``image_invalid``, naming the field and the accepted forms.
    """
    if data.startswith("data:"):
        data = data.partition(",")[2]
    data = _WHITESPACE.sub("", data)
    url_safe = "-" in data or "_" in data
    if url_safe and ("+" in data or "/" in data):
        raise ImageError(
            "image_invalid",
            f"image: mixes the standard and URL-safe base64 alphabets; accepted: {ACCEPTED_BASE64}",
        )
    if url_safe:
        data = data.translate(str.maketrans("-_", "+/"))
    if len(data) % 4 == 1:
        raise ImageError("image_invalid", f"image: not valid base64 (truncated); accepted: {ACCEPTED_BASE64}")
    data += "=" * (-len(data) % 4) if not data.endswith("=") else ""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image_invalid", f"image: not valid base64; accepted: {ACCEPTED_BASE64}") from None


def _upright(image: Image.Image) -> Image.Image:
    """``image`` turned by its EXIF orientation (unchanged without one). A broken EXIF block
    is not a reason to refuse the picture: it is then used as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # noqa: BLE001 - Pillow raises what its EXIF parser raises
        logger.warning("reference image: EXIF orientation not applied (%s)", type(exc).__name__)
        return image
