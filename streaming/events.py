"""Events a session emits to its transport, and its live figures (all cross-layer message
types of ``streaming``).

The server turns them into protocol frames and metrics; ``streaming`` knows nothing of either.
Times are media milliseconds played (``played_ms``) or wall-clock seconds (``*_s``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from engine.api import SegmentKind

AvatarState = Literal["idle", "speaking", "listening"]


@dataclass(frozen=True)
class StateChanged:
    """What the avatar is doing now (from the segment playing and the microphone)."""

    state: AvatarState


@dataclass(frozen=True)
class SpeakStarted:
    """The first frame of an utterance left; ``latency_s`` is from its first text chunk."""

    utterance_id: str
    latency_s: float


@dataclass(frozen=True)
class SpeakEnded:
    """The last frame of a finished utterance left."""

    utterance_id: str
    played_ms: int


@dataclass(frozen=True)
class Interrupted:
    """An utterance was cut by an interrupt after ``played_ms`` of it had played."""

    utterance_id: str | None
    played_ms: int


@dataclass(frozen=True)
class SegmentGenerated:
    """The engine produced a segment (for metrics)."""

    kind: SegmentKind
    generate_s: float
    duration_s: float


@dataclass(frozen=True)
class FirstFrame:
    """The session's first generated frame left, ``seconds`` after the session was created."""

    seconds: float


@dataclass(frozen=True)
class Underrun:
    """The playout buffer ran dry: the picture holds and the audio is silent until refilled."""


@dataclass(frozen=True)
class SessionError:
    """Something went wrong that the client should hear about; the session continues."""

    code: str
    message: str


@dataclass(frozen=True)
class InterruptSilenced:
    """The first audio after an interrupt's cut left the server, ``seconds`` after the interrupt."""

    seconds: float


@dataclass(frozen=True)
class SegmentSuperResolved:
    """An idle super-resolution attempt ended: ``result`` is ``done``, ``cancelled``, ``late`` or
    ``failed``; ``seconds`` from its submission to its end, ``media_s`` the segment's length."""

    result: str
    seconds: float
    media_s: float


SessionEvent = (
    StateChanged
    | SpeakStarted
    | SpeakEnded
    | Interrupted
    | SegmentGenerated
    | FirstFrame
    | Underrun
    | SessionError
    | InterruptSilenced
    | SegmentSuperResolved
)


@dataclass(frozen=True)
class SessionStats(Mapping[str, Any]):
    """Live figures of one session for the client overlay (``stats`` in docs/PROTOCOL.md).

    Reads as a mapping too (``stats["buffer_ms"]``, ``**stats``, :meth:`as_dict`), field
    name -> value, in the order below.

    Attributes:
        buffer_ms: media queued ahead of playback, ms (rounded).
        underruns: times the playout buffer ran dry.
        segments: segments generated.
        rtf: last segment's generation time / media time (3 decimals), or ``None``.
        ttff_ms: session creation to its first frame leaving, ms, or ``None``.
        frames_sent: video frames pulled by the video track(s).
        frames_dropped: queued frames removed before they played (interrupts, overtaking).
        gen_ms: last segment's generation time, ms, or ``None``.
        encode_ms: the newest video track's last frame encode time, ms (2 decimals), or ``None``.
        av_offset_ms: audio minus video lateness of the newest tracks, ms (1 decimal), or ``None``.
        interrupt_ms: last interrupt to the first audio after its cut leaving, ms, or ``None``.
        queue: engine jobs waiting (all sessions).
        upgraded: segments re-rendered by idle super-resolution (the wire name).
        width, height: output video size, pixels.
        mode: ``lipsync`` or ``conversation``.
        barge_in: the user's voice interrupts the avatar.
        recording: a recording is running.
    """

    buffer_ms: int
    underruns: int
    segments: int
    rtf: float | None
    ttff_ms: int | None
    frames_sent: int
    frames_dropped: int
    gen_ms: int | None
    encode_ms: float | None
    av_offset_ms: float | None
    interrupt_ms: int | None
    queue: int
    upgraded: int
    width: int
    height: int
    mode: str
    barge_in: bool
    recording: bool

    def as_dict(self) -> dict[str, Any]:
        """Field name -> value (what the server serialises)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __getitem__(self, name: str) -> Any:
        if name not in _STATS_FIELDS:
            raise KeyError(name)
        return getattr(self, name)

    def __iter__(self) -> Iterator[str]:
        return iter(_STATS_FIELDS)

    def __len__(self) -> int:
        return len(_STATS_FIELDS)


_STATS_FIELDS = tuple(f.name for f in dataclasses.fields(SessionStats))
