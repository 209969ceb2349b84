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

**Limits** (:class:`RecordingLimits`, set by the owner): a recording ends by itself when its
media reaches ``max_seconds`` (code ``max_duration``), when the file on disk reaches
``max_bytes`` (``max_size``; checked on the size of the output file after every frame, which
grows in steps of PyAV's I/O buffer, 256 KiB, behind the encoder's few delayed frames, so the
finished file may exceed it by about that much plus the MP4 index), or when the free
space of its volume falls below ``min_free_bytes`` (``disk_full``; checked every
``disk_check_interval_s`` of media). The cut is a frame boundary: both streams are written up
to it (a stream that stays more than a second behind the other is padded, as on stop), the
file is finished there and is a complete MP4, and the owner is told through ``on_end`` so that
it can :meth:`~SessionRecorder.stop` the recorder and report the result, whose ``limit`` names
the code. Media after the cut is not recorded; nothing before it is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import shutil
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
_GRACE_S = 1.0  # how far one stream may run past the cut before the other is given up on

LIMIT_DURATION = "max_duration"
LIMIT_SIZE = "max_size"
LIMIT_DISK = "disk_full"


def disk_free_bytes(path: str | Path) -> int:
    """Free bytes (for an unprivileged user) on the volume of ``path``, or of its nearest
    existing parent when it does not exist yet.

    Raises:
        OSError: the volume cannot be queried.
    """
    path = Path(path).absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return shutil.disk_usage(path).free


@dataclass(frozen=True)
class RecordingLimits:
    """Bounds of one recording (``None``: unbounded). See the module docstring.

    Attributes:
        max_seconds: longest recording, seconds of media (cut at a whole frame, at least one).
        max_bytes: largest output file in bytes (checked as it grows).
        min_free_bytes: free space in bytes to keep on the output's volume.
        disk_check_interval_s: media seconds between free-space checks.
        free_bytes: ``path -> free bytes of its volume`` (tests inject a fake disk).
    """

    max_seconds: float | None = None
    max_bytes: int | None = None
    min_free_bytes: int | None = None
    disk_check_interval_s: float = 1.0
    free_bytes: Callable[[Path], int] = disk_free_bytes


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
        limit: the limit that ended the recording (``max_duration``, ``max_size``,
            ``disk_full``), or ``None`` when it was stopped or failed.
        size_bytes: size of the finished file in bytes (0 when it could not be read).
        free_bytes: free bytes of the volume seen when ``disk_full`` ended it, else ``None``.
    """

    path: Path
    duration_ms: int
    video_frames: int
    dropped_video_frames: int
    dropped_audio_chunks: int
    error: str | None = None
    limit: str | None = None
    size_bytes: int = 0
    free_bytes: int | None = None


class SessionRecorder:
    """Records what a :class:`PlayoutBuffer` plays out (see the module docstring).

    Args:
        path: output file (its directory is created).
        buffer: the session's playout buffer (frames at its ``width x height``).
        max_queue_s: media the writer may fall behind by before items are dropped.
        writer_factory: ``(path, width, height, fps, sample_rate, channels) -> Mp4Writer``.
        limits: bounds of the recording (default: none); see :meth:`set_limits`.
        on_end: called on the event loop once the recording ended by itself (a limit, or a
            write error) and its file is finished; the owner then calls :meth:`stop`.
    """

    def __init__(
        self,
        path: str | Path,
        buffer: PlayoutBuffer,
        *,
        max_queue_s: float = 2.0,
        writer_factory: Callable[..., Any] = Mp4Writer,
        limits: RecordingLimits | None = None,
        on_end: Callable[[], None] | None = None,
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
        self._finished = False  # the writer thread is done with media (stopped, limit or error)
        self._result: RecordingResult | None = None
        self._limits = RecordingLimits()
        self._on_end: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._limit: str | None = None  # set by the writer thread when a limit ends the recording
        # Frames the recording keeps once a limit is known (taps queue nothing past it), and the
        # furthest positions tapped, which the writer reads to give up on a stream that lags.
        self._cut_frame: int | None = None
        self._seen_frame = -1
        self._seen_chunk = -1
        if limits is not None or on_end is not None:
            self.set_limits(limits or RecordingLimits(), on_end=on_end)
        self._thread = threading.Thread(target=self._write, name="recorder", daemon=True)
        self._thread.start()
        buffer.video_taps.append(self._on_video)
        buffer.audio_taps.append(self._on_audio)

    @property
    def active(self) -> bool:
        return not self._stopped

    @property
    def queued_items(self) -> int:
        """Video frames and audio chunks handed over and not yet taken by the writer thread."""
        return self._queue.qsize()

    def set_limits(self, limits: RecordingLimits, *, on_end: Callable[[], None] | None = None) -> None:
        """Bound this recording and name who is told when it ends by itself.

        Call it on the event loop right after construction, before the loop runs anything else
        (no frame can have been tapped yet). ``on_end`` runs on that event loop (it is called
        directly from the writer thread when there is no running loop).
        """
        self._limits = limits
        self._on_end = on_end
        if limits.max_seconds is not None:
            self._cut_frame = max(1, round(limits.max_seconds * self.fps))
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None

    # ----------------------------------------------------------------------------- taps (event loop)
    def _on_video(self, index: int, frame: np.ndarray) -> None:
        if index < self.first_frame or self._finished:
            return
        position = index - self.first_frame
        self._seen_frame = max(self._seen_frame, position)
        cut = self._cut_frame
        if cut is not None and position >= cut:
            return  # past the end: not recorded, not lost
        try:
            self._queue.put_nowait(("v", index, frame))
        except queue.Full:
            self.dropped_video_frames += 1

    def _on_audio(self, index: int, chunk: np.ndarray) -> None:
        first_chunk = self.first_frame * self.chunks_per_frame
        if index < first_chunk or self._finished:
            return
        position = index - first_chunk
        self._seen_chunk = max(self._seen_chunk, position)
        cut = self._cut_frame
        if cut is not None and position >= cut * self.chunks_per_frame:
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
    def _output_bytes(self) -> int:
        try:
            return os.stat(self.path).st_size
        except OSError:
            return 0

    def _write(self) -> None:
        writer = None
        frames_written = 0
        chunks_written = 0
        last_frame: np.ndarray | None = None
        silence = np.zeros(self.chunk_samples, dtype=np.float32)
        cpf = self.chunks_per_frame
        first_chunk = self.first_frame * cpf
        grace_frames = max(1, round(_GRACE_S * self.fps))
        cut: int | None = None  # frames the recording keeps, once a limit is known
        cut_reason: str | None = None
        next_disk_check = 0  # frames written at the next free-space check
        free_seen: int | None = None
        got_stop = False
        error: str | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            buffer = self.buffer
            writer = self._writer_factory(self.path, buffer.width, buffer.height, self.fps, buffer.sample_rate_hz, 1)
            while True:
                if cut is None and self._cut_frame is not None:  # the length limit, known up front
                    cut, cut_reason = self._cut_frame, LIMIT_DURATION
                try:  # with a cut, wake up to notice a stream that stopped coming
                    item = self._queue.get(timeout=None if cut is None else 0.1)
                except queue.Empty:
                    item = None
                if item is _STOP:
                    got_stop = True
                    break
                kind, index, data = item if item is not None else ("", 0, None)
                limits = self._limits
                began_s = time.perf_counter()
                if kind == "v":
                    position = index - self.first_frame
                    if position >= frames_written and (cut is None or position < cut):
                        while frames_written < position and last_frame is not None:  # a gap: hold
                            writer.write_video(last_frame)
                            frames_written += 1
                        writer.write_video(data)
                        frames_written += 1
                        last_frame = data
                        # Growth limits: cut at the frame boundary reached by either stream.
                        reached = max(frames_written, -(-chunks_written // cpf))
                        if limits.max_bytes is not None and self._output_bytes() >= limits.max_bytes:
                            if cut is None or reached < cut:
                                cut, cut_reason = reached, LIMIT_SIZE
                        if limits.min_free_bytes is not None and frames_written >= next_disk_check:
                            next_disk_check = frames_written + max(1, round(limits.disk_check_interval_s * self.fps))
                            try:
                                free = limits.free_bytes(self.path.parent)
                            except OSError as exc:
                                logger.debug("free space of %s unknown: %s", self.path.parent, exc)
                            else:
                                if free < limits.min_free_bytes and (cut is None or reached < cut):
                                    cut, cut_reason, free_seen = reached, LIMIT_DISK, free
                        if cut is not None and cut_reason != LIMIT_DURATION:
                            self._cut_frame = cut
                elif kind == "a":
                    position = index - first_chunk
                    if position >= chunks_written and (cut is None or position < cut * cpf):
                        gap = position - chunks_written
                        if gap:
                            writer.write_audio(np.zeros(gap * self.chunk_samples, dtype=np.float32))
                        writer.write_audio(data)
                        chunks_written = position + 1
                self.encode_s += time.perf_counter() - began_s
                if cut is not None:
                    video_done = frames_written >= cut
                    audio_done = chunks_written >= cut * cpf
                    if (
                        (video_done and audio_done)
                        or (video_done and self._seen_frame >= cut + grace_frames)  # no audio is coming
                        or (audio_done and self._seen_chunk >= (cut + grace_frames) * cpf)  # no video is coming
                    ):
                        self._limit = cut_reason
                        break
            self._finished = True
            # Pad the shorter stream: both end on the same frame boundary.
            frames_needed = max(frames_written, -(-chunks_written // cpf))
            if last_frame is not None:
                while frames_written < frames_needed:
                    writer.write_video(last_frame)
                    frames_written += 1
            while chunks_written < frames_written * cpf:
                writer.write_audio(silence)
                chunks_written += 1
        except Exception as exc:
            logger.exception("recording to %s failed", self.path)
            error = f"{type(exc).__name__}: {exc}"
        finally:
            self._finished = True
            if writer is not None:
                try:
                    writer.close()
                except Exception as exc:
                    logger.exception("closing recording %s failed", self.path)
                    error = error or f"{type(exc).__name__}: {exc}"
            limit = None if error is not None else self._limit
            self._result = RecordingResult(
                path=self.path,
                duration_ms=round(1000 * frames_written / self.fps),
                video_frames=frames_written,
                dropped_video_frames=self.dropped_video_frames,
                dropped_audio_chunks=self.dropped_audio_chunks,
                error=error,
                limit=limit,
                size_bytes=self._output_bytes(),
                free_bytes=free_seen if limit == LIMIT_DISK else None,
            )
        if not got_stop:
            if not self._stopped:
                self._notify_end()
            while True:  # keep draining so that stop() never blocks on a full queue
                try:
                    if self._queue.get(timeout=1.0) is _STOP:
                        break
                except queue.Empty:
                    if self._stopped:
                        break

    def _notify_end(self) -> None:
        """Tell the owner (on its event loop) that the recording ended by itself."""
        on_end, loop = self._on_end, self._loop
        if on_end is None:
            return
        if loop is None:
            on_end()
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
            loop.call_soon_threadsafe(on_end)
