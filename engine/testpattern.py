"""A deterministic :class:`~engine.api.SegmentEngine` for tests, demos and CPU-only machines.

Every segment is a plain dark background (its shade tells the segment kind) with a small
thumbnail of the identity image in the top-left corner and a frame-counter strip along the
bottom edge. Two markers sit at known media times so that a receiver can measure A/V offset:

* video: every frame whose index within the segment is a multiple of ``fps`` (the start of
  each second of the segment's timeline) is a full-white *flash* frame (the counter strip is
  still drawn on it);
* audio: at the very same media time a *click* starts: ``click_ms`` of a 1 kHz sine at
  amplitude ``click_amplitude``, silence elsewhere.

Frame ``i`` and audio sample ``round(i / fps * sample_rate)`` therefore describe the same
instant. In ``LIPSYNC`` mode the audio is the request's audio, resampled to ``sample_rate``
and trimmed or zero-padded to the segment duration, and no click is added.

The counter strip encodes a running frame number in ``COUNTER_BITS`` black/white blocks
(most significant bit first). The number continues across segments through the continuation
(it is read back from ``Continuation.last_frame``), so a receiver can tell frames apart and a
test can check that each segment was continued from the previous one.

**Streaming.** With ``on_chunk``, ``generate`` hands the segment out in chunks of ``chunk_frames``
frames (:class:`~engine.api.SegmentChunk`, as a windowed decoder does), ``chunk_delay_s`` apart, so
the streaming path of the session runs in the fast tests without a model.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import soxr
from PIL import Image

from engine.api import (
    TESTPATTERN_NOTICE,
    VIDEO_FPS,
    CancelledError,
    ChunkCallback,
    Continuation,
    EngineInputError,
    Identity,
    Segment,
    SegmentKind,
    SegmentRequest,
    segment_frame_count,
    split_segment,
)

COUNTER_BITS = 16
COUNTER_STRIP_PX = 8
FLASH_VALUE = 255
CANCEL_POLL_S = 0.01

# Background shade per kind: dark enough that a flash frame is unmistakable.
_BACKGROUND_RGB: dict[SegmentKind, tuple[int, int, int]] = {
    SegmentKind.IDLE: (24, 24, 32),
    SegmentKind.LISTEN: (24, 40, 24),
    SegmentKind.SPEAK: (40, 24, 56),
    SegmentKind.LIPSYNC: (56, 32, 24),
}


def decode_counter(frame: np.ndarray) -> int:
    """Read the frame number from a test-pattern frame's counter strip (uint8 ``[H, W, 3]``)."""
    height, width = frame.shape[:2]
    block_px = width // COUNTER_BITS
    strip = frame[height - COUNTER_STRIP_PX :, : block_px * COUNTER_BITS].astype(np.float32).mean(axis=2)
    value = 0
    for bit in range(COUNTER_BITS):
        block = strip[:, bit * block_px + 2 : (bit + 1) * block_px - 2]
        value = (value << 1) | int(block.mean() > 128)
    return value


def is_flash_frame(frame: np.ndarray) -> bool:
    """Whether a (possibly lossy-coded) frame is a flash frame: mean above the strip > 128."""
    height = frame.shape[0]
    return bool(frame[: height - COUNTER_STRIP_PX].mean() > 128)


class TestPatternEngine:
    """Test-pattern :class:`~engine.api.SegmentEngine` (see the module docstring).

    Args:
        width, height: output frame size in pixels (width at least ``4 * COUNTER_BITS``).
        sample_rate: sample rate of the generated audio in Hz.
        generate_delay_s: wall-clock seconds that each ``generate`` call takes, to simulate
            generation time; the wait is cut short when the cancel event is set.
        max_segment_seconds: longest segment accepted.
        click_ms: length of the audio click in milliseconds.
        click_amplitude: peak amplitude of the click in [0, 1].
        chunk_frames: frames per :class:`~engine.api.SegmentChunk` handed to ``on_chunk`` (>= 1).
        chunk_delay_s: wall-clock seconds between two chunks (after ``generate_delay_s``, before
            the first one), to simulate a windowed decoder; cut short when the cancel event is set.
    """

    __test__ = False  # not a pytest test class despite the name

    fps = VIDEO_FPS
    name = "testpattern"
    notice: str | None = TESTPATTERN_NOTICE

    def __init__(
        self,
        width: int = 224,
        height: int = 128,
        sample_rate: int = 48_000,
        generate_delay_s: float = 0.0,
        *,
        max_segment_seconds: float = 10.0,
        click_ms: float = 5.0,
        click_amplitude: float = 0.9,
        chunk_frames: int = 10,
        chunk_delay_s: float = 0.0,
    ) -> None:
        if width < 4 * COUNTER_BITS or height < 4 * COUNTER_STRIP_PX:
            raise ValueError(f"test pattern needs at least {4 * COUNTER_BITS}x{4 * COUNTER_STRIP_PX} pixels")
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames {chunk_frames} must be >= 1")
        self.width = width
        self.height = height
        self.sample_rate = sample_rate
        self.generate_delay_s = generate_delay_s
        self.max_segment_seconds = max_segment_seconds
        self.click_ms = click_ms
        self.click_amplitude = click_amplitude
        self.chunk_frames = chunk_frames
        self.chunk_delay_s = chunk_delay_s
        self._frames_generated = 0

    max_text_tokens = 640
    """The released model's text limit (PIPELINE.md §5); this engine ignores the text."""

    def count_text_tokens(self, text: str) -> int:
        """UTF-8 bytes + 1, as the preview's byte tokenizer counts (no model, no tokenizer here).

        Raises:
            EngineInputError: ``text`` is not a string.
        """
        if not isinstance(text, str):
            raise EngineInputError(f"prompt must be a str, got {type(text).__name__}")
        return len(text.encode("utf-8")) + 1

    def prepare_identity(self, image: np.ndarray, appearance: str) -> Identity:
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
            raise EngineInputError(f"image: expected a non-empty [H, W, 3] array, got shape {image.shape}")
        resized = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).resize(
            (self.width, self.height), Image.Resampling.LANCZOS
        )
        return Identity(image=np.asarray(resized, dtype=np.uint8), latent=None, appearance=appearance)

    def generate(self, request: SegmentRequest, cancel: Any = None, on_chunk: ChunkCallback | None = None) -> Segment:
        """:meth:`engine.api.SegmentEngine.generate`: the pattern after ``generate_delay_s``; with
        ``on_chunk``, handed out in chunks of ``chunk_frames`` frames ``chunk_delay_s`` apart.

        Raises:
            EngineInputError: ``seconds`` out of range, or a lip-sync request without mono audio.
            CancelledError: ``cancel`` was set (during the delays).
        """
        started = time.perf_counter()
        self._check_request(request)
        self._wait(cancel, self.generate_delay_s)

        num_frames = segment_frame_count(request.seconds, self.fps)
        first_number = 0
        if request.continue_from is not None:
            first_number = decode_counter(request.continue_from.last_frame) + 1
        frames = self._frames(request, num_frames, first_number)
        num_samples = round(num_frames / self.fps * self.sample_rate)
        if request.kind is SegmentKind.LIPSYNC:
            audio = self._lipsync_audio(request, num_samples)
        else:
            audio = self._click_track(num_frames, num_samples)
        if on_chunk is not None:
            bounds = list(range(self.chunk_frames, num_frames, self.chunk_frames))
            for index, chunk in enumerate(split_segment(frames, audio, self.sample_rate, self.fps, bounds)):
                if index:
                    self._wait(cancel, self.chunk_delay_s)
                on_chunk(chunk)
        self._frames_generated += num_frames
        total_s = time.perf_counter() - started
        return Segment(
            frames=frames,
            audio=audio,
            sample_rate=self.sample_rate,
            fps=self.fps,
            continuation=Continuation(last_frame=frames[-1].copy()),
            timings_s={"total": total_s},
        )

    def _check_request(self, request: SegmentRequest) -> None:
        if not 0 < request.seconds <= self.max_segment_seconds:
            raise EngineInputError(
                f"seconds: {request.seconds} is outside (0, {self.max_segment_seconds}]"
            )
        if request.kind is SegmentKind.LIPSYNC:
            if request.audio is None or request.audio.ndim != 1:
                raise EngineInputError("audio: LIPSYNC needs a mono float32 [N] waveform")
            if request.audio_sample_rate <= 0:
                raise EngineInputError(f"audio_sample_rate: {request.audio_sample_rate} must be > 0")

    def _wait(self, cancel: Any, delay_s: float) -> None:
        deadline = time.monotonic() + delay_s
        while True:
            if cancel is not None and cancel.is_set():
                raise CancelledError("segment generation cancelled")
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                return
            if isinstance(cancel, threading.Event):
                cancel.wait(min(CANCEL_POLL_S, left_s))
            else:
                time.sleep(min(CANCEL_POLL_S, left_s))

    def _frames(self, request: SegmentRequest, num_frames: int, first_number: int) -> np.ndarray:
        height, width = self.height, self.width
        base = np.empty((height, width, 3), dtype=np.uint8)
        base[:] = _BACKGROUND_RGB[request.kind]
        thumb_h, thumb_w = height // 3, width // 3
        thumb = Image.fromarray(request.identity.image).resize((thumb_w, thumb_h), Image.Resampling.BILINEAR)
        base[2 : 2 + thumb_h, 2 : 2 + thumb_w] = np.asarray(thumb)

        frames = np.repeat(base[None], num_frames, axis=0)
        frames[:: self.fps] = FLASH_VALUE
        block_px = width // COUNTER_BITS
        strip = frames[:, height - COUNTER_STRIP_PX :, :]
        strip[:] = 0
        numbers = (first_number + np.arange(num_frames)) % (1 << COUNTER_BITS)
        for bit in range(COUNTER_BITS):
            on = ((numbers >> (COUNTER_BITS - 1 - bit)) & 1).astype(bool)
            strip[on, :, bit * block_px : (bit + 1) * block_px] = 255
        return frames

    def _click_track(self, num_frames: int, num_samples: int) -> np.ndarray:
        audio = np.zeros(num_samples, dtype=np.float32)
        click_len = max(1, round(self.click_ms / 1000 * self.sample_rate))
        t = np.arange(click_len, dtype=np.float64) / self.sample_rate
        click = (self.click_amplitude * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)
        for frame_index in range(0, num_frames, self.fps):
            start = round(frame_index / self.fps * self.sample_rate)
            stop = min(num_samples, start + click_len)
            audio[start:stop] = click[: stop - start]
        return audio

    def _lipsync_audio(self, request: SegmentRequest, num_samples: int) -> np.ndarray:
        audio = np.asarray(request.audio, dtype=np.float32)
        if request.audio_sample_rate != self.sample_rate and audio.size:
            audio = soxr.resample(audio, request.audio_sample_rate, self.sample_rate).astype(np.float32)
        out = np.zeros(num_samples, dtype=np.float32)
        count = min(num_samples, audio.size)
        out[:count] = audio[:count]
        return np.clip(out, -1.0, 1.0)
