"""The engine's public interface: segment requests in, audio+video segments out.

This module holds the only types that cross from ``engine`` into ``streaming`` and
``avatar_server``. It is pure Python/NumPy/PyTorch: no asyncio, no I/O. Every engine
(the real MagiHuman pipeline at any preset, the test-pattern engine) implements
:class:`SegmentEngine`; callers run :meth:`SegmentEngine.generate` in a worker thread,
never on an event loop. ``generate`` may stream: it hands each decoded window of the segment to
an ``on_chunk`` callback as a :class:`SegmentChunk` (frames with their audio) before it returns
the whole :class:`Segment`, so playback can start before the segment is whole (issue 17).

Timeline conventions (PIPELINE.md §3):

* video runs at ``fps`` = 25 frames per second; a segment of ``seconds`` s has
  ``A = round(25 * seconds) + 1`` audio latents, ``T = (A - 1) // 4 + 1`` latent frames and
  ``F = 4 T - 3`` decoded frames;
* the segment's media duration is ``F / fps`` seconds, and its audio is trimmed or padded to
  exactly that duration so that audio and video of one segment start and end together.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

VIDEO_FPS = 25
"""Video frame rate and audio-latent rate of the model (PIPELINE.md §2.1)."""


class SegmentKind(str, enum.Enum):
    """What a segment shows.

    * ``SPEAK``: the avatar speaks ``SegmentRequest.text`` (text-to-audio-video).
    * ``IDLE``: the avatar waits, mouth closed, no speech (silence as audio).
    * ``LISTEN``: the avatar listens attentively to the user (silence as audio).
    * ``LIPSYNC``: audio-to-video; ``SegmentRequest.audio`` drives the lips and is the
      segment's audio (PIPELINE.md §13).
    """

    SPEAK = "speak"
    IDLE = "idle"
    LISTEN = "listen"
    LIPSYNC = "lipsync"


class EngineInputError(ValueError):
    """A request field is outside what the engine supports; the message names field and limit."""


@dataclass(frozen=True)
class Identity:
    """A session's identity: the reference image encoded once at session start.

    Attributes:
        image: uint8 ``[H, W, 3]`` RGB reference image at the engine's output size (after the
            centre crop and Lanczos resize of PIPELINE.md §7).
        latent: float32 ``[1, 48, 1, h, w]`` normalised Wan2.2 latent of ``image``
            (``h = H / 16``, ``w = W / 16``), or ``None`` for engines without a VAE.
        appearance: the appearance text (the body of the enhanced prompt) given at session start.
    """

    image: np.ndarray
    latent: Any
    appearance: str


@dataclass
class Continuation:
    """What the next segment needs to continue from this one.

    Attributes:
        last_frame: uint8 ``[H, W, 3]`` last decoded frame of the segment.
        last_frame_latent: float32 ``[1, 48, 1, h, w]`` latent of ``last_frame`` (image
            conditioning of the next segment, PIPELINE.md §7), or ``None``.
        video_latent: float32 ``[1, 48, T, h, w]`` final video latent of the segment, or ``None``.
        audio_latent: float32 ``[1, A, 64]`` final audio latent of the segment, or ``None``.
    """

    last_frame: np.ndarray
    last_frame_latent: Any = None
    video_latent: Any = None
    audio_latent: Any = None


@dataclass
class SegmentRequest:
    """One segment to generate.

    Attributes:
        identity: the session's :class:`Identity`.
        kind: what the segment shows (:class:`SegmentKind`).
        prompt: the full prompt given to the text encoder (enhanced-prompt format: appearance
            body, ``Dialogue:`` block, ``Background Sound:`` block). Built by the caller.
        text: the words spoken in this segment (``SPEAK`` only; informational for engines that
            read ``prompt``).
        seconds: requested segment length in seconds, ``> 0``; the engine's
            ``max_segment_seconds`` is the upper limit.
        seed: RNG seed for all noise drawn for this segment (PIPELINE.md §4).
        audio: float32 mono ``[N]`` waveform in [-1, 1] for ``LIPSYNC``, else ``None``.
        audio_sample_rate: sample rate of ``audio`` in Hz.
        continue_from: the previous segment's :class:`Continuation`, or ``None`` for the first
            segment of a session (conditioned on the identity image).
    """

    identity: Identity
    kind: SegmentKind = SegmentKind.IDLE
    prompt: str = ""
    text: str = ""
    seconds: float = 2.0
    seed: int = 42
    audio: np.ndarray | None = None
    audio_sample_rate: int = 48_000
    continue_from: Continuation | None = None


@dataclass
class Segment:
    """A generated audio+video segment.

    Attributes:
        frames: uint8 ``[F, H, W, 3]`` RGB frames at ``fps``.
        audio: float32 mono ``[N]`` waveform in [-1, 1] at ``sample_rate`` Hz, with
            ``N == round(F / fps * sample_rate)`` (same media duration as the video).
        sample_rate: audio sample rate in Hz.
        fps: video frame rate in frames per second.
        continuation: what the next segment continues from.
        timings_s: wall-clock seconds per stage (``text``, ``dit``, ``decode_video``,
            ``decode_audio``, ``total``, ...; ``first_chunk``: from the start to the first
            :class:`SegmentChunk` handed out, when streamed), for metrics.
        request: the request that produced the segment (needed to super-resolve it later).
        super_resolved: True once the frames come from the latent SR stage (PIPELINE.md §14).
    """

    frames: np.ndarray
    audio: np.ndarray
    sample_rate: int
    fps: int
    continuation: Continuation
    timings_s: dict[str, float] = field(default_factory=dict)
    request: SegmentRequest | None = None
    super_resolved: bool = False

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def duration_s(self) -> float:
        """Media duration of the segment in seconds (``F / fps``)."""
        return self.num_frames / self.fps


@dataclass(frozen=True)
class SegmentChunk:
    """A leading part of a segment, handed out while the rest is still being decoded (issue 17).

    An engine that streams calls ``on_chunk(chunk)`` from :meth:`SegmentEngine.generate`'s thread
    once per decoder window, in order; then ``generate`` returns the whole :class:`Segment` as usual.
    The chunks tile the segment exactly: concatenated in order, their ``frames`` equal
    ``Segment.frames`` and their ``audio`` equals ``Segment.audio`` (no frame or sample twice, none
    missing). Frames ``[start_frame, start_frame + n)`` own the samples
    ``[audio_sample_offset(start_frame), audio_sample_offset(start_frame + n))``, so a chunk's audio
    and video start and end together.

    Attributes:
        frames: uint8 ``[n, H, W, 3]`` RGB frames, ``n >= 1``.
        audio: float32 mono ``[m]`` in [-1, 1] at ``sample_rate`` Hz,
            ``m = audio_sample_offset(start_frame + n, fps, sample_rate) - audio_sample_offset(start_frame, ...)``.
        sample_rate: audio sample rate in Hz (the segment's).
        fps: video frame rate in frames per second.
        start_frame: index of ``frames[0]`` in the segment's frames.
        total_frames: ``F``, frames of the whole segment.
    """

    frames: np.ndarray
    audio: np.ndarray
    sample_rate: int
    fps: int
    start_frame: int
    total_frames: int

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def end_frame(self) -> int:
        """Index just after the chunk's last frame in the segment."""
        return self.start_frame + self.num_frames

    @property
    def last(self) -> bool:
        """The chunk ends the segment."""
        return self.end_frame >= self.total_frames


def audio_sample_offset(frame: int, fps: int, sample_rate: int) -> int:
    """First audio sample of frame ``frame`` on a segment's timeline: ``round(frame / fps * rate)``.

    At ``frame = F`` this is the segment's sample count ``N`` (:class:`Segment`), so chunks cut at
    these offsets tile the audio exactly.
    """
    return int(round(frame / fps * sample_rate))


def split_segment(frames: np.ndarray, audio: np.ndarray, sample_rate: int, fps: int,
                  bounds: list[int]) -> list[SegmentChunk]:
    """Cut a whole segment's ``frames`` (uint8 ``[F, H, W, 3]``) and ``audio`` (float32 ``[N]``)
    into :class:`SegmentChunk` at the frame indices ``bounds`` (increasing, ``0 < b < F``; others are
    ignored). The chunks are views, not copies.
    """
    total = int(frames.shape[0])
    cuts = [0, *sorted({b for b in bounds if 0 < b < total}), total]
    return [
        SegmentChunk(frames=frames[a:b],
                     audio=audio[audio_sample_offset(a, fps, sample_rate):audio_sample_offset(b, fps, sample_rate)],
                     sample_rate=sample_rate, fps=fps, start_frame=a, total_frames=total)
        for a, b in zip(cuts[:-1], cuts[1:], strict=True)
    ]


ChunkCallback = Callable[[SegmentChunk], None]
"""``on_chunk`` of :meth:`SegmentEngine.generate`: called in the engine's thread; must not block."""


class CancelledError(RuntimeError):
    """Raised inside :meth:`SegmentEngine.generate` when its cancel event was set."""


@runtime_checkable
class SegmentEngine(Protocol):
    """What streaming needs from an engine. Implementations are thread-compatible, not
    thread-safe: one worker thread calls ``generate`` at a time.

    Attributes:
        width, height: output frame size in pixels.
        fps: video frame rate (25).
        sample_rate: sample rate of generated (non-lipsync) audio in Hz.
        max_segment_seconds: longest segment the engine accepts.
        name: short engine name for logs and metrics (``preview``, ``full``, ``testpattern``).
        notice: one plain sentence for the user about what this engine shows when that is not a
            real person (the preview's untrained weights, the test pattern), or None. Clients show
            it (``session.ready.notice``).
        max_text_tokens: text tokens of a prompt the model uses at most (640 for the released
            model, PIPELINE.md §5; 256 for ``preview``). Longer prompts are truncated by the engine,
            never refused, so a segment's cost is bounded whatever the text (issue 18); a caller that
            wants to refuse them compares :meth:`count_text_tokens` with this limit.
    """

    width: int
    height: int
    fps: int
    sample_rate: int
    max_segment_seconds: float
    name: str
    notice: str | None
    max_text_tokens: int

    def count_text_tokens(self, text: str) -> int:
        """Tokens of ``text`` with the tokenizer the engine will use (BOS included), untruncated.

        Raises:
            EngineInputError: ``text`` is not a string.
        """
        ...

    def prepare_identity(self, image: np.ndarray, appearance: str) -> Identity:
        """Encode a session's reference image (uint8 ``[H, W, 3]`` RGB, any size).

        Raises:
            EngineInputError: the image is empty or not 3-channel.
        """
        ...

    def generate(self, request: SegmentRequest, cancel: Any = None,
                 on_chunk: ChunkCallback | None = None) -> Segment:
        """Generate one segment. Blocking; call from a worker thread.

        Engines that can super-resolve also offer ``sr_width``/``sr_height`` (pixels, or None when no
        SR model is loaded), ``can_super_resolve`` and ``super_resolve(segment, cancel) -> Segment``,
        which re-renders a generated segment through the latent SR stage at ``sr_width x sr_height``
        (same duration and audio).

        Args:
            request: the segment to generate.
            cancel: optional ``threading.Event``; when set, generation stops at the next
                denoising step and :class:`CancelledError` is raised.
            on_chunk: optional; called in this thread with each :class:`SegmentChunk` as soon as
                its frames are decoded (one per decoder window, in order), before ``generate``
                returns. The chunks tile the returned segment exactly. A cancelled call may have
                delivered some chunks (never all of them) before raising. Engines that cannot
                stream call it once with the whole segment. Callers must accept engines whose
                ``generate`` has no ``on_chunk`` parameter (they deliver whole segments only).

        Raises:
            EngineInputError: a request field is out of range (message names field and limit).
            CancelledError: ``cancel`` was set.
        """
        ...


PREVIEW_NOTICE = (
    "Preview engine: its weights are untrained (seeded random numbers), so its picture and sound are "
    "noise by design; the pipeline, timing and streaming are the real ones. To see a real face, load the "
    "released weights on a GPU: 'avatar-server download DIR', then 'avatar-server serve --engine full "
    "--checkpoint-dir DIR --device cuda' (README, Real weights)."
)
"""``notice`` of the ``preview`` preset's engine."""

TESTPATTERN_NOTICE = (
    "Test-pattern engine: synthetic colour bars and tones, no model. Start the server with "
    "'--engine preview' (CPU) or '--engine full' (GPU, released weights) for the generator."
)
"""``notice`` of the test-pattern engine."""


def segment_frame_count(seconds: float, fps: int = VIDEO_FPS) -> int:
    """Decoded frames ``F = 4 T - 3`` for a segment of ``seconds`` (PIPELINE.md §3).

    ``A = round(fps * seconds) + 1`` audio latents, ``T = (A - 1) // 4 + 1`` latent frames.
    Example: 5 s -> A 126, T 32, F 125; 2 s -> A 51, T 13, F 49.
    """
    audio_latents = round(fps * seconds) + 1
    latent_frames = (audio_latents - 1) // 4 + 1
    return 4 * latent_frames - 3
