"""The WebSocket control protocol as pydantic models (documented in docs/PROTOCOL.md).

Every frame is a JSON object with a ``type``. Client frames form a discriminated union on
``type``: an unknown type, malformed JSON or a field over its limit is a validation error,
which :func:`parse_client_message` turns into an :class:`ErrorMessage` with a specific code.
Limits come from the server settings through the validation context.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

import pydantic_core
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from avatar_server.settings import Limits

UTTERANCE_ID_MAX_CHARS = 128
RESUME_TOKEN_MAX_CHARS = 128  # the server's tokens are 43 characters (secrets.token_urlsafe(32))


class ErrorCode(StrEnum):
    """Every ``error`` frame code (and HTTP error code) of the protocol; docs/PROTOCOL.md
    ("Error codes") says when each is sent."""

    # the frame
    BAD_JSON = "bad_json"
    BAD_MESSAGE = "bad_message"
    MISSING_TYPE = "missing_type"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_FIELD = "invalid_field"
    # session.start
    IMAGE_INVALID = "image_invalid"
    IMAGE_TOO_LARGE = "image_too_large"
    PROMPT_TOO_LONG = "prompt_too_long"
    SESSION_EXISTS = "session_exists"
    CAPACITY = "capacity"
    SHUTTING_DOWN = "shutting_down"
    FORBIDDEN = "forbidden"
    TOO_MANY_SESSIONS = "too_many_sessions"
    # speech
    TEXT_TOO_LONG = "text_too_long"
    UTTERANCE_TOO_LONG = "utterance_too_long"
    UTTERANCE_ENDED = "utterance_ended"
    UNKNOWN_UTTERANCE = "unknown_utterance"
    TOO_MANY_UTTERANCES = "too_many_utterances"
    NO_SESSION = "no_session"
    # recording
    RECORDING_ACTIVE = "recording_active"
    TOO_MANY_RECORDINGS = "too_many_recordings"
    DISK_FULL = "disk_full"
    NO_RECORDING = "no_recording"
    RECORDING_FAILED = "recording_failed"
    # WebRTC and media
    BAD_SDP = "bad_sdp"
    SDP_TOO_LARGE = "sdp_too_large"
    WEBRTC_EXISTS = "webrtc_exists"
    MEDIA_TIMEOUT = "media_timeout"
    MEDIA_FAILED = "media_failed"
    MICROPHONE_INVALID = "microphone_invalid"
    MICROPHONE_TOO_FAST = "microphone_too_fast"
    # engine and server
    ENGINE_INPUT = "engine_input"
    ENGINE_FAILED = "engine_failed"
    INTERNAL = "internal"
    # connection limits and session ends
    RATE_LIMITED = "rate_limited"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    SESSION_TIMEOUT = "session_timeout"
    SLOW_CLIENT = "slow_client"
    IDLE_TIMEOUT = "idle_timeout"
    MAX_DURATION = "max_duration"
    RESUME_FAILED = "resume_failed"
    ENDED_BY_OPERATOR = "ended_by_operator"
    # sessions on air (docs/ON_AIR.md): outputs and WHEP viewers
    OUTPUT_LIMIT = "output_limit"
    UNKNOWN_OUTPUT = "unknown_output"
    VIEWER_LIMIT = "viewer_limit"
    SERVER_VIEWER_LIMIT = "server_viewer_limit"
    NO_VIEWER = "no_viewer"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    # HTTP only
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    BAD_REQUEST = "bad_request"


MESSAGE_ID_MAX_CHARS = 64


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _ClientMessage(_Message):
    id: str | None = Field(
        None,
        max_length=MESSAGE_ID_MAX_CHARS,
        description="optional message id, echoed as in_reply_to in the error frame that answers it",
    )


def _limits(info: ValidationInfo) -> Limits:
    context = info.context or {}
    return context.get("limits") or Limits()


# ------------------------------------------------------------------------------- client -> server
class SessionStart(_ClientMessage):
    """Start a session: reference image (base64 PNG/JPEG/WebP, data-URL prefix allowed) + appearance."""

    type: Literal["session.start"]
    image: str
    prompt: str = ""
    session_id: str | None = Field(None, max_length=64, description="must be the token's session id, if sent")
    mode: Literal["lipsync", "conversation"] = Field(
        "lipsync", description="microphone: the user's voice drives the lips (lipsync) or the avatar listens"
    )
    barge_in: bool = Field(False, description="the user starting to speak interrupts the avatar")

    @field_validator("image")
    @classmethod
    def _image_size(cls, value: str, info: ValidationInfo) -> str:
        limits = _limits(info)
        # base64 carries 3 bytes per 4 characters; a data-URL prefix is short.
        estimate = (len(value) - value.find(",") - 1 if value.startswith("data:") else len(value)) * 3 // 4
        if estimate > limits.max_image_bytes + 2:
            raise PydanticCustomError(
                "image_too_large",
                "image: about {size} bytes; the limit is max_image_bytes = {limit}",
                {"size": estimate, "limit": limits.max_image_bytes, "setting": "max_image_bytes"},
            )
        if not value:
            raise PydanticCustomError("image_invalid", "image: empty; send a base64 PNG or JPEG", {})
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt_size(cls, value: str, info: ValidationInfo) -> str:
        limit = _limits(info).max_prompt_chars
        if len(value) > limit:
            raise PydanticCustomError(
                "prompt_too_long",
                "prompt: {size} characters; the limit is max_prompt_chars = {limit}",
                {"size": len(value), "limit": limit, "setting": "max_prompt_chars"},
            )
        return value


class WebRTCOffer(_ClientMessage):
    """The client's SDP offer (no trickle ICE: candidates are inside the SDP)."""

    type: Literal["webrtc.offer"]
    sdp: str = Field(min_length=1)


class Speak(_ClientMessage):
    """A chunk of text of utterance ``utterance_id``; chunks are joined verbatim."""

    type: Literal["speak"]
    utterance_id: str = Field(min_length=1, max_length=UTTERANCE_ID_MAX_CHARS)
    text: str
    language: str | None = Field(None, max_length=32, description="e.g. English, German (goes into the prompt)")

    @field_validator("text")
    @classmethod
    def _text_size(cls, value: str, info: ValidationInfo) -> str:
        limit = _limits(info).max_text_chars
        if len(value) > limit:
            raise PydanticCustomError(
                "text_too_long",
                "text: {size} characters in one chunk; the limit is max_text_chars = {limit}",
                {"size": len(value), "limit": limit, "setting": "max_text_chars"},
            )
        return value


class SpeakEnd(_ClientMessage):
    """No more text will come for ``utterance_id``."""

    type: Literal["speak.end"]
    utterance_id: str = Field(min_length=1, max_length=UTTERANCE_ID_MAX_CHARS)


class Interrupt(_ClientMessage):
    """Stop speaking now."""

    type: Literal["interrupt"]


class SessionUpdate(_ClientMessage):
    """Change session options while it runs (fields left out stay as they are)."""

    type: Literal["session.update"]
    mode: Literal["lipsync", "conversation"] | None = None
    barge_in: bool | None = None


class RecordStart(_ClientMessage):
    """Start recording the session server-side (MP4 of what the client sees and hears)."""

    type: Literal["record.start"]


class RecordStop(_ClientMessage):
    """Stop the recording; answered with ``record.stopped`` once the file is complete."""

    type: Literal["record.stop"]


class SessionResume(_ClientMessage):
    """Take over a session whose WebSocket dropped (see docs/PROTOCOL.md, "Resume")."""

    type: Literal["session.resume"]
    resume_token: str = Field(
        min_length=1,
        max_length=RESUME_TOKEN_MAX_CHARS,
        description="the resume_token of session.ready or of the last session.resumed",
    )


class LiveOutput(BaseModel):
    """A live output of a session: ``rtmp`` (``rtmp://`` or ``rtmps://`` URL with the stream key)
    or ``whip`` (the endpoint URL and its bearer token). Secrets are never shown back."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["rtmp", "whip"]
    url: str = Field(max_length=2048, description="ingest URL; its stream key is never shown back")
    bearer_token: str | None = Field(None, max_length=4096, description="WHIP Authorization: Bearer token")
    video_bitrate_bps: int = Field(1_500_000, ge=100_000, le=50_000_000)
    audio_bitrate_bps: int = Field(128_000, ge=32_000, le=320_000)
    gop_s: float = Field(2.0, gt=0, le=10, description="RTMP keyframe period, seconds")
    width: int | None = Field(None, ge=16, le=4096, description="RTMP frame width (even; default: the session's)")
    height: int | None = Field(None, ge=16, le=4096, description="RTMP frame height (even; default: the session's)")


class OutputStart(_ClientMessage):
    """Start pushing the session to a live platform (docs/ON_AIR.md); answered with
    ``output.started``, then ``output.state`` as it connects."""

    type: Literal["output.start"]
    output: LiveOutput


class OutputStop(_ClientMessage):
    """Stop an output; its last ``output.state`` is ``stopped``."""

    type: Literal["output.stop"]
    output_id: str = Field(min_length=1, max_length=64)


AnyClientMessage = (
    SessionStart
    | WebRTCOffer
    | Speak
    | SpeakEnd
    | Interrupt
    | SessionUpdate
    | RecordStart
    | RecordStop
    | SessionResume
    | OutputStart
    | OutputStop
)
ClientMessage = Annotated[AnyClientMessage, Field(discriminator="type")]
CLIENT_MESSAGE_TYPES = (
    "session.start",
    "webrtc.offer",
    "speak",
    "speak.end",
    "interrupt",
    "session.update",
    "record.start",
    "record.stop",
    "session.resume",
    "output.start",
    "output.stop",
)


# ------------------------------------------------------------------------------- server -> client
class SessionReady(_Message):
    type: Literal["session.ready"] = "session.ready"
    session_id: str
    width: int
    height: int
    fps: int
    sample_rate: int
    engine: str
    notice: str | None = Field(
        None,
        description="a sentence to show the user about what this engine's picture is when it is not a real "
        "person (the preview's untrained weights: noise by design; the test pattern), or null",
    )
    ice_servers: list[dict[str, Any]] = Field(
        default_factory=list, description="STUN/TURN servers for the client's RTCPeerConnection (RTCIceServer form)"
    )
    sr: bool = Field(False, description="idle super-resolution on: width x height is the SR size")
    mode: Literal["lipsync", "conversation"] = "lipsync"
    barge_in: bool = False
    resume_token: str | None = Field(
        None, description="secret for session.resume after a dropped WebSocket (None: resume is off)"
    )
    resume_grace_s: float = Field(0.0, description="how long a dropped session waits for session.resume, s")


class SessionResumed(SessionReady):
    """Answer to ``session.resume``: the fields of ``session.ready`` as the session is now;
    ``missed_messages`` frames kept while no WebSocket was attached follow in order,
    ``dropped_messages`` more were lost."""

    type: Literal["session.resumed"] = "session.resumed"  # type: ignore[assignment]
    resume_token: str = Field(description="the new token (the one just used no longer works)")  # type: ignore[assignment]
    peer_connection: str | None = Field(
        None, description="state of the session's peer connection (None: no offer yet); failed/closed: re-offer"
    )
    recording_id: str | None = Field(None, description="the recording running, if any")
    missed_messages: int = Field(0, description="frames kept while parked, sent right after this one")
    dropped_messages: int = Field(0, description="frames lost while parked (the buffer was full); stats not counted")


class WebRTCAnswer(_Message):
    type: Literal["webrtc.answer"] = "webrtc.answer"
    sdp: str


class State(_Message):
    type: Literal["state"] = "state"
    state: Literal["idle", "speaking", "listening"]


class SpeakStarted(_Message):
    type: Literal["speak.started"] = "speak.started"
    utterance_id: str
    played_ms: int = 0


class SpeakEnded(_Message):
    type: Literal["speak.ended"] = "speak.ended"
    utterance_id: str
    played_ms: int


class Interrupted(_Message):
    type: Literal["interrupted"] = "interrupted"
    utterance_id: str | None
    played_ms: int


class Stats(_Message):
    """Live figures of the session, sent every ``stats_interval_s``."""

    type: Literal["stats"] = "stats"
    buffer_ms: int
    underruns: int
    segments: int
    frames_sent: int
    rtf: float | None = None
    ttff_ms: int | None = None
    state: str
    frames_dropped: int = 0
    gen_ms: int | None = None
    encode_ms: float | None = None
    av_offset_ms: float | None = None
    interrupt_ms: int | None = None
    queue: int = 0
    upgraded: int = 0
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    barge_in: bool = False
    recording: bool = False


class RecordStarted(_Message):
    type: Literal["record.started"] = "record.started"
    recording_id: str
    path: str = Field(description="the MP4 file's name relative to the server's recordings_dir (never a server path)")


class RecordStopped(_Message):
    """A recording is finished; the file is a complete MP4 whatever the reason."""

    type: Literal["record.stopped"] = "record.stopped"
    recording_id: str
    path: str = Field(description="the MP4 file's name relative to the server's recordings_dir (never a server path)")
    duration_ms: int
    dropped_frames: int = 0
    error: str | None = None
    reason: Literal["stopped", "session_ended", "max_duration", "max_size", "disk_full", "failed"] = Field(
        "stopped",
        description=(
            "stopped (record.stop), session_ended, a limit (max_duration, max_size, disk_full) or failed (see error)"
        ),
    )
    message: str = Field("", description="why it stopped; names the limit when one stopped it")
    size_bytes: int = Field(0, description="size of the finished file in bytes")


class SessionEnded(_Message):
    """The server ended the session (the WebSocket closes next)."""

    type: Literal["session.ended"] = "session.ended"
    reason: str = Field(description="idle_timeout, max_duration, shutdown, resume_timeout or a limit")
    message: str = ""


class ErrorMessage(_Message):
    """Something the client sent could not be used (the connection stays open unless the
    code ends it); ``field`` and ``limit`` name what was wrong and the setting it broke."""

    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    field: str | None = Field(None, description="the field at fault (dotted path), if one is")
    limit: str | None = Field(None, description="the setting the message broke, e.g. max_text_chars")
    in_reply_to: str | None = Field(None, description="the id of the client message this answers, if it had one")


class OutputStarted(_Message):
    """An ``output.start`` was accepted: the output's id and its URL with secrets redacted."""

    type: Literal["output.started"] = "output.started"
    output_id: str
    output_type: Literal["rtmp", "whip"]
    url: str


class OutputStateMessage(_Message):
    """An output changed state: ``connecting``, ``live``, ``reconnecting`` (``reason``, the
    ``attempt``), ``failed`` (``reason``), ``stopped``."""

    type: Literal["output.state"] = "output.state"
    output_id: str
    output_type: Literal["rtmp", "whip"]
    state: Literal["connecting", "live", "reconnecting", "failed", "stopped"]
    url: str
    reason: str | None = None
    attempt: int = 0


ServerMessage = (
    OutputStarted
    | OutputStateMessage
    | SessionReady
    | SessionResumed
    | WebRTCAnswer
    | State
    | SpeakStarted
    | SpeakEnded
    | Interrupted
    | Stats
    | ErrorMessage
    | RecordStarted
    | RecordStopped
    | SessionEnded
)

# Error types raised by the validators above; they are the error frame's code as they are.
_CUSTOM_CODES = frozenset({"image_too_large", "image_invalid", "prompt_too_long", "text_too_long"})

_CLIENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(ClientMessage)

_ERROR_CODES = {
    "json_invalid": "bad_json",
    "union_tag_invalid": "unknown_type",
    "union_tag_not_found": "missing_type",
    "model_attributes_type": "bad_message",
    "model_type": "bad_message",
}


def parse_client_message(raw: str | bytes, limits: Limits) -> AnyClientMessage | ErrorMessage:
    """Validate one client frame; returns the message or the :class:`ErrorMessage` to send back
    (its ``in_reply_to`` is the frame's ``id`` when the frame is an object with a string ``id``)."""
    try:
        return _CLIENT_ADAPTER.validate_json(raw, context={"limits": limits})
    except ValidationError as exc:
        error = error_from_validation(exc)
    message_id = _message_id(raw)
    return error if message_id is None else error.model_copy(update={"in_reply_to": message_id})


def _message_id(raw: str | bytes) -> str | None:
    """The ``id`` of a frame that failed validation, if it is a JSON object with a short string ``id``."""
    try:
        value = pydantic_core.from_json(raw, cache_strings=False)
    except ValueError:
        return None
    message_id = value.get("id") if isinstance(value, dict) else None
    return message_id if isinstance(message_id, str) and len(message_id) <= MESSAGE_ID_MAX_CHARS else None


def error_from_validation(exc: ValidationError) -> ErrorMessage:
    """The error frame for the first validation error, its code specific to the failure."""
    first = exc.errors(include_url=False)[0]
    kind = first["type"]
    loc = [str(part) for part in first.get("loc", ())]
    # The first element of loc is the union tag (e.g. "speak"); the rest names the field.
    field = ".".join(loc[1:]) if len(loc) > 1 else None
    if kind == "union_tag_invalid":
        tag = str((first.get("ctx") or {}).get("tag", "?"))[:64]  # never echo a huge tag back
        message = f"type: unknown message type {tag!r}; expected one of {', '.join(CLIENT_MESSAGE_TYPES)}"
        return ErrorMessage(code="unknown_type", message=message, field="type")
    if kind == "union_tag_not_found":
        return ErrorMessage(code="missing_type", message="type: every message needs a 'type' field", field="type")
    if kind == "json_invalid":
        return ErrorMessage(code="bad_json", message=f"message is not valid JSON: {first['msg']}")
    code = kind if kind in _CUSTOM_CODES else _ERROR_CODES.get(kind, "invalid_field")
    if not loc:  # the frame itself is not an object
        return ErrorMessage(code="bad_message", message="message: must be a JSON object with a 'type' field")
    message = first["msg"]
    if code == "invalid_field" and field:
        message = f"{field}: {message}"
    setting = (first.get("ctx") or {}).get("setting")
    return ErrorMessage(code=code, message=message, field=field, limit=setting)
