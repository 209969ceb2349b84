"""Reference images (issue 18): EXIF orientation is applied; line-wrapped and URL-safe base64
are accepted; what is still refused names the field and the accepted forms."""

from __future__ import annotations

import base64
import io
import textwrap

import numpy as np
import pytest
from PIL import Image

from avatar_server.images import ImageError, decode_image

MIB = 1024 * 1024
LIMITS = {"max_bytes": 8 * MIB, "max_pixels": 4096 * 4096}
EXIF_ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def portrait_jpegs(request) -> dict[int, bytes]:
    """``../shared/media/portrait.png`` (scaled to 320 x 180) as JPEGs with orientation tags 1, 3, 6, 8."""
    from tests.conftest import MEDIA_DIR

    if not MEDIA_DIR.is_dir():
        pytest.skip(f"shared media not found at {MEDIA_DIR}")
    with Image.open(MEDIA_DIR / "portrait.png") as png:
        small = png.convert("RGB").resize((320, 180))
    out: dict[int, bytes] = {}
    for orientation in (1, 3, 6, 8):
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        buf = io.BytesIO()
        small.save(buf, format="JPEG", quality=90, exif=exif.tobytes())
        out[orientation] = buf.getvalue()
    return out


def stored_pixels(jpeg: bytes) -> np.ndarray:
    """The pixels as stored in the file (no orientation applied)."""
    with Image.open(io.BytesIO(jpeg)) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize(
    ("orientation", "upright"),
    [
        (1, lambda a: a),
        (3, lambda a: np.rot90(a, 2)),
        (6, lambda a: np.rot90(a, -1)),  # stored rotated 90 degrees anticlockwise: turn clockwise
        (8, lambda a: np.rot90(a, 1)),
    ],
)
def test_exif_orientation_is_applied(portrait_jpegs, orientation: int, upright) -> None:
    jpeg = portrait_jpegs[orientation]
    with Image.open(io.BytesIO(jpeg)) as image:
        assert image.getexif()[EXIF_ORIENTATION] == orientation
    decoded = decode_image(base64.b64encode(jpeg).decode(), **LIMITS)
    expected = upright(stored_pixels(jpeg))
    assert decoded.shape == expected.shape == ((320, 180, 3) if orientation in (6, 8) else (180, 320, 3))
    assert np.array_equal(decoded, expected)


def test_line_wrapped_and_url_safe_base64_are_accepted(portrait_jpegs) -> None:
    jpeg = portrait_jpegs[6]
    reference = decode_image(base64.b64encode(jpeg).decode(), **LIMITS)
    standard = base64.b64encode(jpeg).decode()
    forms = {
        "mime-76": base64.encodebytes(jpeg).decode(),  # 76 columns, \n after each line
        "crlf-64": "\r\n".join(textwrap.wrap(standard, 64)),
        "url-safe": base64.urlsafe_b64encode(jpeg).decode(),
        "url-safe-unpadded": base64.urlsafe_b64encode(jpeg).decode().rstrip("="),
        "data-url-wrapped": "data:image/jpeg;base64,\n" + base64.encodebytes(jpeg).decode(),
    }
    assert "-" in forms["url-safe"] or "_" in forms["url-safe"]  # the test exercises the other alphabet
    assert forms["url-safe-unpadded"] != forms["url-safe"]
    for name, data in forms.items():
        assert np.array_equal(decode_image(data, **LIMITS), reference), name


@pytest.mark.parametrize(
    "data",
    ["not base64!!", "ab+c-d==", "abcde"],
    ids=["bad-characters", "mixed-alphabets", "truncated"],
)
def test_bad_base64_names_the_field_and_the_accepted_forms(data: str) -> None:
    with pytest.raises(ImageError) as info:
        decode_image(data, **LIMITS)
    message = str(info.value)
    assert info.value.code == "image_invalid"
    assert message.startswith("image: ") and "URL-safe" in message and "line breaks" in message
