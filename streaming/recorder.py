"""Server-side recording of a session to MP4 (H.264 + AAC), from the playout path.

A :class:`SessionRecorder` taps the session's :class:`~streaming.playout.PlayoutBuffer`: it
sees every video frame and audio chunk exactly as the outgoing tracks pull them, i.e. what the
client sees and hears (at the output size, cross-faded, with held frames and silence during
underruns). The recording starts at the frame boundary at the head of the buffer: frame
``k0`` and audio chunk ``2 k0`` (25 fps, 20 ms chunks), so its audio and video share one
origin and stay in sync by construction: the writer places each frame and chunk by its
timeline index, not by arrival.

Encoding runs in a writer thread (:class:`engine.media.Mp4Writer`, PyAV in-process) fed by a
bounded queue, never on the event loop. If the writer falls behind and the queue is full, the
item is dropped and counted (``dropped_video_frames``, ``dropped_audio_chunks``); the writer
fills the gap (the previous frame again, silence), so the timeline and the sync survive.
On stop the shorter stream is padded to the longer one, so both last the same whole number of
frames.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.media import Mp4Writer
from streaming.playout import PlayoutBuffer

logger = logging.getLogger(__name__)

_STOP = object()


@dataclass(frozen=True)
class RecordingResult:
    """A finished recording.

    Attributes:
        path: the MP4 file.
        duration_ms: media duration written (both streams).
        video_frames: frames written (held or repeated ones included).
        dropped_video_frames, dropped_audio_chunks: items the writer could not keep up with
            (replaced by the previous frame / silence).
        error: why writing failed, or ``None``.
    """

    path: Path
    duration_ms: int
    video_frames: int
    dropped_video_frames: int
    dropped_audio_chunks: int
    error: str | None = None


class SessionRecorder:
    """Records what a :class:`PlayoutBuffer` plays out (see the module docstring).

    Args:
        path: output file (its directory is created).
        buffer: the session's playout buffer (frames at its ``width x height``).
        max_queue_s: media the writer may fall behind by before items are dropped.
        writer_factory: ``(path, width, height, fps, sample_rate, channels) -> Mp4Writer``.
    """

    def __init__(
        self,
        path: str | Path,
        buffer: PlayoutBuffer,
        *,
        max_queue_s: float = 2.0,
        writer_factory: Callable[..., Any] = Mp4Writer,
    ) -> None:
        self.path = Path(path)
        self.buffer = buffer
        self.fps = buffer.fps
        self.chunks_per_frame = buffer.chunks_per_frame
        self.chunk_samples = buffer.chunk_samples
        self.first_frame = buffer.head_frame
        self.started_s = time.monotonic()
        self.dropped_video_frames = 0
        self.dropped_audio_chunks = 0
        self.encode_s = 0.0
        self._writer_factory = writer_factory
        items = max(4, round(max_queue_s * self.fps * (1 + self.chunks_per_frame)))
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=items)
        self._stopped = False
        self._result: RecordingResult | None = None
        self._thread = threading.Thread(target=self._write, name="recorder", daemon=True)
        self._thread.start()
        buffer.video_taps.append(self._on_video)
        buffer.audio_taps.append(self._on_audio)

    @property
    def active(self) -> bool:
        return not self._stopped

    # ----------------------------------------------------------------------------- taps (event loop)
    def _on_video(self, index: int, frame: np.ndarray) -> None:
        if index < self.first_frame:
            return
        try:
            self._queue.put_nowait(("v", index, frame))
        except queue.Full:
            self.dropped_video_frames += 1

    def _on_audio(self, index: int, chunk: np.ndarray) -> None:
        if index < self.first_frame * self.chunks_per_frame:
            return
        try:
            self._queue.put_nowait(("a", index, np.array(chunk, dtype=np.float32)))
        except queue.Full:
            self.dropped_audio_chunks += 1

    # ----------------------------------------------------------------------------- control
    async def stop(self) -> RecordingResult:
        """Stop tapping, let the writer finish the file (off the event loop), return the result."""
        if not self._stopped:
            self._stopped = True
            for taps, tap in ((self.buffer.video_taps, self._on_video), (self.buffer.audio_taps, self._on_audio)):
                if tap in taps:
                    taps.remove(tap)
            await asyncio.to_thread(self._queue.put, _STOP)
        await asyncio.to_thread(self._thread.join)
        assert self._result is not None
        return self._result

    # ----------------------------------------------------------------------------- writer thread
    def _write(self) -> None:
        writer = None
        frames_written = 0
        chunks_written = 0
        last_frame: np.ndarray | None = None
        silence = np.zeros(self.chunk_samples, dtype=np.float32)
        first_chunk = self.first_frame * self.chunks_per_frame
        error: str | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            buffer = self.buffer
            writer = self._writer_factory(self.path, buffer.width, buffer.height, self.fps, buffer.sample_rate_hz, 1)
            while (item := self._queue.get()) is not _STOP:
                kind, index, data = item
                began_s = time.perf_counter()
                if kind == "v":
                    position = index - self.first_frame
                    if position < frames_written:
                        continue  # a repeated pull of a frame already written
                    while frames_written < position and last_frame is not None:  # a gap: hold
                        writer.write_video(last_frame)
                        frames_written += 1
                    writer.write_video(data)
                    frames_written += 1
                    last_frame = data
                else:
                    position = index - first_chunk
                    if position < chunks_written:
                        continue
                    gap = position - chunks_written
                    if gap:
                        writer.write_audio(np.zeros(gap * self.chunk_samples, dtype=np.float32))
                    writer.write_audio(data)
                    chunks_written = position + 1
                self.encode_s += time.perf_counter() - began_s
            # Pad the shorter stream: both end on the same frame boundary.
            frames_needed = max(frames_written, -(-chunks_written // self.chunks_per_frame))
            if last_frame is not None:
                while frames_written < frames_needed:
                    writer.write_video(last_frame)
                    frames_written += 1
            while chunks_written < frames_written * self.chunks_per_frame:
                writer.write_audio(silence)
                chunks_written += 1
        except Exception as exc:
            logger.exception("recording to %s failed", self.path)
            error = f"{type(exc).__name__}: {exc}"
            while True:  # keep draining so that stop() never blocks on a full queue
                try:
                    if self._queue.get(timeout=1.0) is _STOP:
                        break
                except queue.Empty:
                    if self._stopped:
                        break
        finally:
            if writer is not None:
                try:
                    writer.close()
                except Exception as exc:
                    logger.exception("closing recording %s failed", self.path)
                    error = error or f"{type(exc).__name__}: {exc}"
            self._result = RecordingResult(
                path=self.path,
                duration_ms=round(1000 * frames_written / self.fps),
                video_frames=frames_written,
                dropped_video_frames=self.dropped_video_frames,
                dropped_audio_chunks=self.dropped_audio_chunks,
                error=error,
            )
