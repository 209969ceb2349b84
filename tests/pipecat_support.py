"""Harness of the Pipecat tests: a Pipecat pipeline whose output transport is Pipecat's
WebRTC transport (``SmallWebRTCTransport``, aiortc; by default as
:class:`clients.pipecat_avatar.BufferedSmallWebRTCTransport`) to a headless aiortc viewer in
this process, with a recorder of the frames that leave the transport; what the viewer hears
(:func:`heard_audio`) and the silence the transport's track sent (:class:`TrackReads`).

Import only after ``pytest.importorskip("pipecat")``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from pipecat.frames.frames import Frame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pipecat.workers.runner import WorkerRunner

from avatar_server.webrtc import use_host_addresses
from clients.media import AudioRecord, VideoRecord, audio_frame_to_mono
from clients.pipecat_avatar import BufferedSmallWebRTCTransport

SAMPLE_RATE_HZ = 48_000


class Recorder(FrameProcessor):
    """Passes every frame on and keeps the downstream ones with their time (monotonic s)."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[tuple[float, Frame]] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            self.frames.append((time.monotonic(), frame))
        await self.push_frame(frame, direction)

    def of(self, *types: type) -> list[tuple[float, Frame]]:
        return [(t, f) for t, f in self.frames if isinstance(f, types)]


@dataclass
class Viewer:
    """The headless WebRTC peer on the other side of Pipecat's transport: what it received."""

    pc: RTCPeerConnection
    video: list[VideoRecord] = field(default_factory=list)
    audio: list[AudioRecord] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def consume(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            arrival_s = time.monotonic()
            pts_s = float(frame.pts * frame.time_base)
            if track.kind == "video":
                luma = frame.to_ndarray(format="gray")
                self.video.append(
                    VideoRecord(arrival_s, pts_s, frame.width, frame.height, float(luma.mean()))
                )
            else:
                self.audio.append(
                    AudioRecord(arrival_s, pts_s, frame.sample_rate, audio_frame_to_mono(frame))
                )


@dataclass
class Bot:
    worker: PipelineWorker
    viewer: Viewer
    recorder: Recorder
    transport: SmallWebRTCTransport


@contextlib.asynccontextmanager
async def pipecat_bot(
    processors: Sequence[FrameProcessor],
    *,
    width: int = 224,
    height: int = 128,
    audio_out_10ms_chunks: int = 4,
    transport_class: type[SmallWebRTCTransport] = BufferedSmallWebRTCTransport,
) -> AsyncIterator[Bot]:
    """``transport.input() -> *processors -> transport.output() -> Recorder`` running, its
    transport (``transport_class``: the buffered one that docs/PIPECAT.md recommends, or
    Pipecat's own ``SmallWebRTCTransport``) connected to a headless viewer (loopback ICE)."""
    use_host_addresses(["127.0.0.1"])
    viewer = Viewer(RTCPeerConnection())
    viewer.pc.addTransceiver("audio", direction="recvonly")
    viewer.pc.addTransceiver("video", direction="recvonly")

    @viewer.pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        viewer.tasks.append(asyncio.get_running_loop().create_task(viewer.consume(track)))

    await viewer.pc.setLocalDescription(await viewer.pc.createOffer())
    connection = SmallWebRTCConnection()
    await connection.initialize(sdp=viewer.pc.localDescription.sdp, type="offer")
    answer = connection.get_answer()
    await viewer.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
    params = TransportParams(
        audio_out_enabled=True,
        audio_out_sample_rate=SAMPLE_RATE_HZ,
        audio_out_10ms_chunks=audio_out_10ms_chunks,
        video_out_enabled=True,
        video_out_is_live=True,
        video_out_width=width,
        video_out_height=height,
        video_out_framerate=25,
    )
    transport = transport_class(webrtc_connection=connection, params=params)
    recorder = Recorder()
    pipeline = Pipeline([transport.input(), *processors, transport.output(), recorder])
    worker = PipelineWorker(
        pipeline,
        params=PipelineParams(audio_out_sample_rate=SAMPLE_RATE_HZ),
        idle_timeout_secs=None,
        enable_rtvi=False,
    )
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    run = asyncio.get_running_loop().create_task(runner.run())
    try:
        yield Bot(worker, viewer, recorder, transport)
    finally:
        await worker.cancel()
        with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
            await asyncio.wait_for(run, 15)
        await viewer.pc.close()
        for task in viewer.tasks:
            task.cancel()
        await connection.disconnect()


class _CountingDeque(deque):
    """A deque that counts ``popleft`` calls."""

    pops = 0

    def popleft(self):
        self.pops += 1
        return super().popleft()


class TrackReads:
    """The reads of the transport's output audio track that took no audio from it (so the track
    sent 10 ms of silence), with the output transport's queue of chunks at that moment. A
    diagnosis of Pipecat 1.14's internals (``RawAudioTrack._chunk_queue``, the output's media
    sender), printed by the tests, never asserted; :meth:`install` returns ``False`` where they
    are not found."""

    def __init__(self) -> None:
        self.silent: list[tuple[float, int]] = []  # (monotonic s, chunks waiting upstream)

    def install(self, transport: SmallWebRTCTransport) -> bool:
        track = getattr(getattr(transport, "_client", None), "_audio_output_track", None)
        sender = getattr(transport.output(), "_media_senders", {}).get(None)
        if track is None or sender is None or not isinstance(getattr(track, "_chunk_queue", None), deque):
            return False
        queue = track._chunk_queue = _CountingDeque(track._chunk_queue)
        recv = track.recv

        async def counted_recv():
            pops = queue.pops
            frame = await recv()
            if queue.pops == pops:
                self.silent.append((time.monotonic(), sender._audio_queue.qsize()))
            return frame

        track.recv = counted_recv
        return True

    def between(self, start_s: float, end_s: float) -> tuple[int, int]:
        """Silent reads in ``[start_s, end_s]``, and how many of them had audio waiting upstream."""
        inside = [queued for t, queued in self.silent if start_s <= t <= end_s]
        return len(inside), sum(queued > 0 for queued in inside)


def heard_audio(audio: Sequence[AudioRecord]) -> tuple[np.ndarray, int]:
    """What a listener plays of ``audio`` (frames in arrival order): each frame's samples at
    its pts (RTP timestamp), the time of missing packets as silence, float32 mono; and the
    number of samples missing. Raises ``ValueError`` if the frames have mixed sample rates."""
    if not audio:
        return np.zeros(0, np.float32), 0
    rates = {a.sample_rate for a in audio}
    if len(rates) != 1:
        raise ValueError(f"audio: mixed sample rates {sorted(rates)}")
    rate = rates.pop()
    first = round(audio[0].pts_s * rate)
    starts = [round(a.pts_s * rate) - first for a in audio]
    end = max(s + a.samples.size for s, a in zip(starts, audio, strict=True))
    out = np.zeros(end, np.float32)
    covered = np.zeros(end, bool)
    for start, record in zip(starts, audio, strict=True):
        if start < 0:
            continue  # a late packet from before the first one: not played
        out[start : start + record.samples.size] = record.samples
        covered[start : start + record.samples.size] = True
    return out, int(end - np.count_nonzero(covered))


async def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(0.05)
