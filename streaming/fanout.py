"""Server-side media pump: one consumer of a session's outgoing tracks, fanned out to sinks.

A :class:`MediaFanout` reads the session's video and audio tracks
(:class:`~streaming.tracks.AvatarVideoTrack` / :class:`~streaming.tracks.AvatarAudioTrack`)
continuously, each in its own task. The tracks pace themselves on the session's
:class:`~streaming.clock.MediaClock` (``start + pts / clock_rate``), so the pump runs in real
time whether or not anybody watches: a session with no WebRTC peer still plays out, so its
recorder (a tap on the playout buffer), its utterance events and its idle loop all run.

Every frame read goes to every sink (:class:`FrameSink`): WebRTC viewers (through
:class:`SinkTrack`, an aiortc track fed by the pump), live outputs (RTMP, WHIP), a shared
encoder. ``put`` must return at once; a sink keeps a bounded queue of its own and drops (and
counts) what it cannot take, so a sink that stalls never stalls the pump nor the other sinks.
A sink whose ``put`` raises is removed.

**Frames are shared, and only the event loop may touch them.** The same
:class:`av.VideoFrame` / :class:`av.AudioFrame` object goes to every sink. PyAV keeps a
scaler (``SwsContext``) on each frame for ``reformat``, so two threads converting one frame
at once crash the process. A sink that hands frames to another thread (an encoder thread,
aiortc's encoder executor) gives it its own copy made on the loop: :func:`copy_frame`.

Frames: video ``rgb24`` at the session's size, ``pts`` in 90 kHz units; audio ``s16`` mono
20 ms chunks (960 samples at 48 kHz), ``pts`` in samples. Both share media time 0.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import Literal, Protocol

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

logger = logging.getLogger(__name__)

MediaKind = Literal["video", "audio"]


def copy_frame(frame: av.VideoFrame | av.AudioFrame) -> av.VideoFrame | av.AudioFrame:
    """A new frame with the same pixels or samples, ``pts`` and ``time_base`` (call on the
    event loop; the copy may then go to any one thread). Video ``rgb24``, audio as is."""
    if isinstance(frame, av.VideoFrame):
        out = av.VideoFrame.from_ndarray(frame.to_ndarray(format="rgb24"), format="rgb24")
    else:
        out = av.AudioFrame.from_ndarray(frame.to_ndarray(), format=frame.format.name, layout=frame.layout.name)
        out.sample_rate = frame.sample_rate
    out.pts = frame.pts
    out.time_base = frame.time_base
    return out


class FrameSink(Protocol):
    """Anything the pump feeds. ``put`` must not block: queue (bounded) or drop."""

    def put(self, kind: MediaKind, frame: av.VideoFrame | av.AudioFrame) -> None: ...


class MediaFanout:
    """Pulls one session's video and audio tracks in real time and hands each frame to all sinks.

    Args:
        video: the session's video track (``SessionRunner.video_track()``).
        audio: the session's audio track (``SessionRunner.audio_track()``), or ``None``.

    The pump owns both tracks: :meth:`close` stops them.
    """

    def __init__(self, video: MediaStreamTrack, audio: MediaStreamTrack | None) -> None:
        self._tracks: dict[MediaKind, MediaStreamTrack] = {"video": video}
        if audio is not None:
            self._tracks["audio"] = audio
        self._sinks: list[FrameSink] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.frames_pumped: dict[MediaKind, int] = {"video": 0, "audio": 0}
        self.sink_errors = 0
        self.last_frame: dict[MediaKind, av.VideoFrame | av.AudioFrame | None] = {"video": None, "audio": None}
        self.fanout_s = 0.0  # wall seconds spent handing frames to sinks (all kinds)
        self._closed = False

    @property
    def sinks(self) -> tuple[FrameSink, ...]:
        return tuple(self._sinks)

    def add_sink(self, sink: FrameSink) -> None:
        """Feed ``sink`` from the next frame on."""
        if sink not in self._sinks:
            self._sinks.append(sink)

    def remove_sink(self, sink: FrameSink) -> None:
        """Stop feeding ``sink`` (no-op when it is not fed)."""
        if sink in self._sinks:
            self._sinks.remove(sink)

    def start(self) -> None:
        """Start pulling (idempotent). Starts the session's media clock on the first read."""
        if self._tasks or self._closed:
            return
        loop = asyncio.get_running_loop()
        for kind in self._tracks:
            self._tasks.append(loop.create_task(self._pump(kind), name=f"fanout-{kind}"))

    async def close(self) -> None:
        """Stop pulling, stop the tracks; sinks are not told (their owners close them)."""
        if self._closed:
            return
        self._closed = True
        for task in reversed(self._tasks):
            task.cancel()
        for task in reversed(self._tasks):
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks.clear()
        for track in self._tracks.values():
            track.stop()
        self._sinks.clear()

    async def _pump(self, kind: MediaKind) -> None:
        track = self._tracks[kind]
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                logger.debug("fanout: %s track ended", kind)
                return
            self.frames_pumped[kind] += 1
            self.last_frame[kind] = frame
            began_s = time.perf_counter()
            for sink in tuple(self._sinks):
                try:
                    sink.put(kind, frame)
                except Exception:
                    logger.exception("fanout: a sink failed; it is removed")
                    self.sink_errors += 1
                    self.remove_sink(sink)
            self.fanout_s += time.perf_counter() - began_s


class SinkTrack(MediaStreamTrack):
    """An aiortc track of one kind fed by a :class:`MediaFanout` (one per consumer).

    It queues at most ``max_queue`` frames; when full the oldest is dropped and counted
    (``dropped``). A consumer that has not read for ``stall_s`` while frames kept coming is
    stalled: the track ends (its ``recv`` raises :class:`MediaStreamError`), leaves the pump,
    and ``on_stall`` is called once, so the owner can drop that consumer.

    Args:
        fanout: the pump to subscribe to.
        kind: ``"video"`` or ``"audio"``.
        max_queue: frames queued at most (25 video frames, 50 audio chunks: 1 s).
        stall_s: seconds without a read (while frames arrive) that make the consumer stalled.
        on_stall: called once on the event loop when the consumer stalls.
    """

    def __init__(
        self,
        fanout: MediaFanout,
        kind: MediaKind,
        *,
        max_queue: int | None = None,
        stall_s: float = 5.0,
        on_stall: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self.kind = kind
        self._fanout = fanout
        self._queue: collections.deque[av.VideoFrame | av.AudioFrame] = collections.deque()
        self._max_queue = max_queue if max_queue is not None else (25 if kind == "video" else 50)
        self._ready = asyncio.Event()
        self._stall_s = stall_s
        self._on_stall = on_stall
        self._last_read_s = time.monotonic()
        self.dropped = 0
        self.delivered = 0
        self.stalled = False
        fanout.add_sink(self)

    def put(self, kind: MediaKind, frame: av.VideoFrame | av.AudioFrame) -> None:
        if kind != self.kind or self.readyState != "live":
            return
        if len(self._queue) >= self._max_queue:
            self._queue.popleft()
            self.dropped += 1
            if time.monotonic() - self._last_read_s > self._stall_s:
                self._stall()
                return
        self._queue.append(frame)
        self._ready.set()

    def _stall(self) -> None:
        self.stalled = True
        logger.info("fanout: a %s consumer stalled (no read for %.1f s); dropped", self.kind, self._stall_s)
        self.stop()
        if self._on_stall is not None:
            try:
                self._on_stall()
            except Exception:
                logger.exception("fanout: on_stall failed")

    def stop(self) -> None:
        self._fanout.remove_sink(self)
        self._queue.clear()
        self._ready.set()  # wake a waiting recv, which then raises
        super().stop()

    async def recv(self) -> av.VideoFrame | av.AudioFrame:
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            self._last_read_s = time.monotonic()
            if self._queue:
                self.delivered += 1
                return copy_frame(self._queue.popleft())  # aiortc encodes it in another thread
            self._ready.clear()
            await self._ready.wait()
