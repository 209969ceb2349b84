"""Protocol validation and image decoding: each bad input gets its own error code."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from pydantic import ValidationError
from PIL import Image

from avatar_server import protocol
from avatar_server.images import ImageError, decode_image
from avatar_server.settings import MIB, Limits

LIMITS = Limits(max_text_chars=20, max_prompt_chars=50)


def png_b64(width: int, height: int, mode: str = "RGB") -> str:
    out = io.BytesIO()
    Image.new(mode, (width, height)).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


@pytest.mark.parametrize(
    ("raw", "code", "field"),
    [
        ("{not json", "bad_json", None),
        ("[1, 2]", "bad_message", None),
        ('{"text": "hi"}', "missing_type", "type"),
        ('{"type": "dance"}', "unknown_type", "type"),
        ('{"type": "speak", "utterance_id": "u", "text": "' + "x" * 21 + '"}', "text_too_long", "text"),
        ('{"type": "speak", "text": "hi"}', "invalid_field", "utterance_id"),
        ('{"type": "speak", "utterance_id": "u", "text": 5}', "invalid_field", "text"),
        ('{"type": "speak", "utterance_id": "", "text": "hi"}', "invalid_field", "utterance_id"),
        ('{"type": "session.start", "image": ""}', "image_invalid", "image"),
        ('{"type": "session.start", "image": "aGk=", "prompt": "' + "p" * 51 + '"}', "prompt_too_long", "prompt"),
        ('{"type": "webrtc.offer", "sdp": ""}', "invalid_field", "sdp"),
    ],
)
def test_bad_frames_map_to_specific_codes(raw: str, code: str, field: str | None) -> None:
    result = protocol.parse_client_message(raw, LIMITS)
    assert isinstance(result, protocol.ErrorMessage)
    assert (result.code, result.field) == (code, field)
    assert result.message


def test_limit_errors_name_the_field_and_the_limit() -> None:
    result = protocol.parse_client_message(json.dumps({"type": "speak", "utterance_id": "u", "text": "x" * 25}), LIMITS)
    assert result.message == "text: 25 characters in one chunk; the limit is max_text_chars = 20"
    unknown = protocol.parse_client_message('{"type": "dance"}', LIMITS)
    assert "'dance'" in unknown.message and "session.start" in unknown.message


def test_image_size_is_checked_before_decoding() -> None:
    limits = Limits(max_image_bytes=4 * MIB)
    huge = "A" * (6 * MIB)
    result = protocol.parse_client_message(json.dumps({"type": "session.start", "image": huge}), limits)
    assert result.code == "image_too_large" and "max_image_bytes = 4194304" in result.message


def test_good_frames_parse() -> None:
    assert isinstance(protocol.parse_client_message('{"type": "interrupt"}', LIMITS), protocol.Interrupt)
    speak = protocol.parse_client_message(
        '{"type": "speak", "utterance_id": "u1", "text": "Hallo", "language": "German", "extra": 1}', LIMITS
    )
    assert isinstance(speak, protocol.Speak) and speak.language == "German"
    assert isinstance(protocol.parse_client_message(b'{"type": "speak.end", "utterance_id": "u1"}', LIMITS), protocol.SpeakEnd)


def test_server_messages_serialise_with_their_type() -> None:
    frame = json.loads(protocol.Interrupted(utterance_id=None, played_ms=0).model_dump_json())
    assert frame == {"type": "interrupted", "utterance_id": None, "played_ms": 0}
    error = json.loads(protocol.ErrorMessage(code="internal", message="y").model_dump_json())
    assert error == {"type": "error", "code": "internal", "message": "y", "field": None, "limit": None, "in_reply_to": None}
    with pytest.raises(ValidationError):  # codes are one typed set
        protocol.ErrorMessage(code="x", message="y")


def test_an_error_names_its_field_and_limit_and_answers_the_message_id() -> None:
    limits = Limits(max_text_chars=5)
    error = protocol.parse_client_message(
        json.dumps({"type": "speak", "id": "m-17", "utterance_id": "u", "text": "too long"}), limits
    )
    assert isinstance(error, protocol.ErrorMessage)
    assert (error.code, error.field, error.limit, error.in_reply_to) == ("text_too_long", "text", "max_text_chars", "m-17")
    error = protocol.parse_client_message(json.dumps({"type": "speak", "id": "m-18", "text": "hi"}), limits)
    assert (error.code, error.field, error.limit, error.in_reply_to) == ("invalid_field", "utterance_id", None, "m-18")
    error = protocol.parse_client_message(json.dumps({"type": "nope", "id": 5}), limits)
    assert (error.code, error.field, error.in_reply_to) == ("unknown_type", "type", None)  # an id that is no string
    assert protocol.parse_client_message(b"{oops", limits).in_reply_to is None


def test_portrait_png_is_accepted_with_default_limits(media_dir) -> None:
    data = base64.b64encode((media_dir / "portrait.png").read_bytes()).decode()
    assert len(data) > 1_300_000  # ~1.3 MB of base64
    limits = Limits()
    assert isinstance(
        protocol.parse_client_message(json.dumps({"type": "session.start", "image": data}), limits),
        protocol.SessionStart,
    )
    image = decode_image(data, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels)
    assert image.shape == (720, 1280, 3) and image.dtype == np.uint8
    # a data URL prefix (FileReader.readAsDataURL) is accepted too
    assert decode_image("data:image/png;base64," + data, max_bytes=8 * MIB, max_pixels=1 << 24).shape == (720, 1280, 3)


@pytest.mark.parametrize(
    ("data", "code", "needle"),
    [
        ("not base64!!", "image_invalid", "base64"),
        (base64.b64encode(b"GIF89a-but-not-really" * 10).decode(), "image_invalid", "image"),
        (base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 100).decode(), "image_invalid", "image"),
        (png_b64(5000, 4000, "1"), "image_too_large", "max_image_pixels = 16777216"),
        (base64.b64encode(b"\0" * (9 * MIB)).decode(), "image_too_large", "max_image_bytes = 8388608"),
    ],
    ids=["not-base64", "not-an-image", "truncated-png", "too-many-pixels", "too-many-bytes"],
)
def test_bad_images(data: str, code: str, needle: str) -> None:
    with pytest.raises(ImageError) as info:
        decode_image(data, max_bytes=8 * MIB, max_pixels=4096 * 4096)
    assert info.value.code == code and needle in str(info.value)


def test_gif_is_not_an_accepted_format() -> None:
    out = io.BytesIO()
    Image.new("RGB", (4, 4)).save(out, format="GIF")
    with pytest.raises(ImageError, match="GIF"):
        decode_image(base64.b64encode(out.getvalue()).decode(), max_bytes=MIB, max_pixels=100)


def test_limits_keep_room_for_a_720p_png() -> None:
    with pytest.raises(ValueError, match="max_image_bytes"):
        Limits(max_image_bytes=MIB)
    with pytest.raises(ValueError, match="max_message_bytes"):
        Limits(max_message_bytes=2 * MIB)
