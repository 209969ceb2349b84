"""Events a session emits to its transport (all cross-layer message types of ``streaming``).

The server turns them into protocol frames and metrics; ``streaming`` knows nothing of either.
Times are media milliseconds played (``played_ms``) or wall-clock seconds (``*_s``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
class SegmentUpgraded:
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
    | SegmentUpgraded
)
