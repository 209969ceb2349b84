"""Fault injection on a live loopback server with WebRTC clients.

* An engine error in one session (a RuntimeError subclass standing in for
  ``torch.cuda.OutOfMemoryError``) is retried with an ``engine_failed`` error to that client;
  ``max_engine_failures`` in a row end that session; the other session keeps playing.
* A crash in an outgoing track, or in the video encoder, ends that session (``media_failed``)
  and nothing else.
* Engine stalls mid-segment, clients that vanish mid-utterance (TCP reset, no goodbye), engine
  exceptions and 50 connections opened and dropped at once leave nothing behind: asyncio tasks
  and Python threads are compared exactly after a settle period, file descriptors and native
  threads too, RSS within a small slack.

The faulty engine tells sessions apart by the colour of their reference image.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import io
import threading
import time
from collections.abc import Callable

import aiortc.codecs.vpx
import numpy as np
import pytest
from aiortc import RTCSessionDescription
from PIL import Image
from websockets.asyncio.client import connect

from avatar_server.webrtc import close_peer_connection, make_peer_connection
from clients.client import AvatarClient
from engine.api import SegmentKind, SegmentRequest
from engine.testpattern import TestPatternEngine
from tests.security_support import Resources, server, settle, snapshot

pytestmark = pytest.mark.slow

COLORS = {"red": (220, 30, 30), "green": (30, 220, 30), "blue": (30, 30, 220)}
RSS_SLACK_BYTES = 32 << 20
EXECUTOR_THREADS = 6


class FakeCudaOOM(RuntimeError):
    """Stands in for ``torch.cuda.OutOfMemoryError`` (also a ``RuntimeError`` subclass)."""


Fault = Callable[[SegmentRequest], None]


class FaultyEngine(TestPatternEngine):
    """Test pattern whose ``generate`` runs a fault hook per session (told apart by colour)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.faults: dict[str, Fault] = {}
        self.calls: dict[str, int] = {}

    @staticmethod
    def tag_of(request: SegmentRequest) -> str:
        means = request.identity.image[2:40, 2:70].reshape(-1, 3).mean(axis=0)
        return ("red", "green", "blue")[int(np.argmax(means))]

    def generate(self, request, cancel=None):
        tag = self.tag_of(request)
        self.calls[tag] = self.calls.get(tag, 0) + 1
        fault = self.faults.get(tag)
        if fault is not None:
            fault(request)
        return super().generate(request, cancel)


def raise_oom(times: int | None) -> Fault:
    left = [times]

    def fault(request: SegmentRequest) -> None:
        if left[0] is None or left[0] > 0:
            if left[0] is not None:
                left[0] -= 1
            raise FakeCudaOOM("CUDA out of memory. Tried to allocate 2.00 GiB")

    return fault


def stall_on_speech(seconds: float, started: threading.Event) -> Fault:
    """Sleep (ignoring the cancel event, like a stuck kernel) in the first SPEAK segment."""
    done = [False]

    def fault(request: SegmentRequest) -> None:
        if request.kind is SegmentKind.SPEAK and not done[0]:
            done[0] = True
            started.set()
            time.sleep(seconds)

    return fault


def crashing_encode(original):
    """A VP8 ``encode`` that raises on frames of the red session (its thumbnail is red)."""

    def encode(self, frame, force_keyframe=False):
        pixel = frame.to_ndarray(format="rgb24")[10, 10]
        if pixel[0] > 150 and pixel[2] < 100:
            raise RuntimeError("encoder exploded")
        return original(self, frame, force_keyframe)

    return encode


def png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (96, 64), COLORS[color]).save(buf, format="PNG")
    return buf.getvalue()


async def client(app, color: str) -> AvatarClient:
    c = AvatarClient(f"http://127.0.0.1:{app.port}/", keep_audio=False)
    await c.connect()
    await c.start_session(png(color))
    await c.start_media()
    return c


async def frames_in(c: AvatarClient, seconds: float) -> int:
    before = len(c.received.video)
    await asyncio.sleep(seconds)
    return len(c.received.video) - before


def errors(c: AvatarClient) -> list:
    return c.messages("error")


def vanish(c: AvatarClient) -> None:
    """The client disappears without a goodbye: its TCP connection is reset (no close
    handshake) and its UDP sockets go silent (no RTCP BYE, no DTLS close_notify)."""
    c.websocket.transport.abort()
    for transceiver in c.pc.getTransceivers():
        dtls = transceiver.receiver.transport
        if dtls is not None:
            # Fault injection into aiortc/aioice (a library, not our objects): its ICE
            # connection's UDP protocols have no public handle, and closing them is the fault.
            for protocol in dtls.transport._connection._protocols:
                protocol.transport.abort()


def connection_of(app, session_id: str):
    return next(conn for conn in app.connections if conn.session_id == session_id)


# ------------------------------------------------------------------------------------ behaviour
async def test_engine_errors_retry_then_end_only_their_own_session() -> None:
    engine = FaultyEngine(generate_delay_s=0.02)
    async with server(engine, max_sessions=4, limits={"max_engine_failures": 3}) as app:
        a, b = await client(app, "red"), await client(app, "blue")
        try:
            assert await frames_in(a, 1.0) >= 15 and await frames_in(b, 0.1) >= 0
            # one failure: retried, the session goes on
            engine.faults["red"] = raise_oom(1)
            assert await settle(lambda: errors(a), 10)
            assert errors(a)[0].code == "engine_failed"
            engine.calls.clear()
            assert await settle(lambda: engine.calls.get("red", 0) >= 3, 15)  # generating again
            assert a.session.session_id in {conn.session_id for conn in app.connections}
            # failures in a row: the session ends; the other one plays on
            engine.faults["red"] = raise_oom(None)
            watch = asyncio.ensure_future(frames_in(b, 4.0))
            assert await settle(lambda: any("max_engine_failures = 3" in e.message for e in errors(a)), 15)
            assert await settle(lambda: a.websocket.close_code is not None, 5)
            assert a.websocket.close_code == 1011
            assert await watch >= 0.6 * 25 * 4.0
            assert not errors(b)
            assert await settle(lambda: app.sessions_active == 1)
        finally:
            await a.close()
            await b.close()


async def test_track_and_encoder_crashes_end_only_their_own_session(monkeypatch) -> None:
    async with server(FaultyEngine(generate_delay_s=0.02), max_sessions=4) as app:
        b = await client(app, "blue")
        try:
            # an outgoing track crashes
            a = await client(app, "red")
            session = connection_of(app, a.session.session_id).session
            session.buffer.pull_video_frame = lambda index: 1 / 0
            assert await settle(lambda: errors(a), 10)
            assert errors(a)[0].code == "media_failed" and "video track failed" in errors(a)[0].message
            assert await settle(lambda: app.sessions_active == 1)
            await a.close()
            # the video encoder crashes (only on the red session's frames)
            a = await client(app, "red")
            monkeypatch.setattr(aiortc.codecs.vpx.Vp8Encoder, "encode", crashing_encode(aiortc.codecs.vpx.Vp8Encoder.encode))
            assert await settle(lambda: errors(a), 10)
            assert errors(a)[0].code == "media_failed" and "sender stopped" in errors(a)[0].message
            await a.close()
            assert await frames_in(b, 1.0) >= 15 and not errors(b)
            assert await settle(lambda: app.sessions_active == 1)
        finally:
            await b.close()


async def test_a_peer_connection_aiortc_cannot_close_is_closed_anyway() -> None:
    """Found by the fuzz test: an offer whose BUNDLE names a missing mid is half-applied;
    aiortc's close() then raises, and every later close() waits forever."""
    offerer = make_peer_connection([])
    offerer.addTransceiver("video", direction="recvonly")
    offerer.addTransceiver("audio", direction="recvonly")
    await offerer.setLocalDescription(await offerer.createOffer())
    lines = offerer.localDescription.sdp.split("\r\n")
    await offerer.close()
    del lines[next(i for i, line in enumerate(lines) if line.startswith("m=audio"))]
    pc = make_peer_connection([])
    await pc.setRemoteDescription(RTCSessionDescription(sdp="\r\n".join(lines), type="offer"))
    with pytest.raises(AttributeError):
        await pc.createAnswer()
    await close_peer_connection(pc)
    async with asyncio.timeout(2):
        await pc.close()  # returns now instead of hanging


# ------------------------------------------------------------------------------------ leaks
async def test_nothing_is_left_behind_after_faults(monkeypatch) -> None:
    loop = asyncio.get_running_loop()
    executor = concurrent.futures.ThreadPoolExecutor(EXECUTOR_THREADS, thread_name_prefix="default-executor")
    barrier = threading.Barrier(EXECUTOR_THREADS + 1)
    futures = [executor.submit(barrier.wait) for _ in range(EXECUTOR_THREADS)]
    barrier.wait()  # all executor threads exist from here on: the pool cannot grow
    concurrent.futures.wait(futures)
    loop.set_default_executor(executor)

    engine = FaultyEngine(generate_delay_s=0.02)
    settings = {
        "max_sessions": 6,
        "limits": {"max_connections_per_address": 64, "max_sessions_per_address": 6},
        "session_resume_grace_s": 0.3,  # vanished clients' sessions are parked, then released
    }
    async with server(engine, **settings) as app:
        url = f"ws://127.0.0.1:{app.port}/ws"

        async def burst(count: int = 50) -> None:
            """50 connections at once, half start a session; all dropped without goodbye."""
            sockets = await asyncio.gather(*(connect(url, max_size=None) for _ in range(count)))
            image = base64.b64encode(png("blue")).decode()
            await asyncio.gather(
                *(ws.send(f'{{"type": "session.start", "image": "{image}"}}') for ws in sockets[::2])
            )
            await asyncio.sleep(0.3)
            for ws in sockets:
                ws.transport.abort()
            for ws in sockets:
                with contextlib.suppress(Exception):
                    await ws.close()

        async def idle() -> bool:
            return await settle(lambda: not app.connections and app.sessions_active == 0, 20)

        async def fault_cycle() -> None:
            # 1. the engine stalls mid-segment and the client vanishes mid-utterance
            survivor = await client(app, "blue")
            victim = await client(app, "green")
            stalled = threading.Event()
            engine.faults["green"] = stall_on_speech(2.0, stalled)
            await victim.speak("u1", ["Hello there, ", "this sentence will never be finished."])
            assert await settle(stalled.is_set, 10)
            vanish(victim)
            # released (after the resume grace) while the engine is stuck
            assert await settle(lambda: len(app.connections) == 1 and app.sessions_active == 1, 10)
            await victim.close()
            # 2. an engine exception mid-segment, then the client vanishes
            victim = await client(app, "red")
            engine.faults["red"] = raise_oom(None)
            await victim.speak("u1", ["Words that fail to render."])
            assert await settle(lambda: errors(victim), 10)
            vanish(victim)
            await victim.close()
            del engine.faults["red"]
            # 3. an outgoing track crashes
            victim = await client(app, "green")
            connection_of(app, victim.session.session_id).session.buffer.pull_video_frame = lambda index: 1 / 0
            assert await settle(lambda: errors(victim), 10)
            await victim.close()
            # 4. the video encoder crashes
            victim = await client(app, "red")
            with monkeypatch.context() as patch:
                patch.setattr(aiortc.codecs.vpx.Vp8Encoder, "encode", crashing_encode(aiortc.codecs.vpx.Vp8Encoder.encode))
                assert await settle(lambda: errors(victim), 10)
                await victim.close()
            # 5. 50 connections opened and dropped at once
            await burst()
            assert await frames_in(survivor, 1.0) >= 15 and not errors(survivor)
            await survivor.close()
            assert await idle()

        await fault_cycle()  # warm-up: codecs, pools and caches now exist
        await asyncio.sleep(1.0)
        before = snapshot()
        await fault_cycle()

        def same() -> bool:
            now = snapshot()
            # fds may only go down: one opened before this test (an earlier test's socket, a
            # library's file) may close meanwhile in a full-suite run; what faults leave behind
            # shows as more.
            return now.tasks == before.tasks and now.threads == before.threads and now.fds <= before.fds

        settled = await settle(same, 20, 0.5)
        after = snapshot()
        print(f"\nresources before: {before.summary()}\nresources after:  {after.summary()}")
        report(before, after)
        assert settled, report(before, after)
        assert after.native_threads <= before.native_threads
        assert after.rss_bytes - before.rss_bytes < RSS_SLACK_BYTES
    executor.shutdown(wait=True)


def report(before: Resources, after: Resources) -> str:
    extra_tasks = sorted(set(after.tasks) - set(before.tasks))
    gone_tasks = sorted(set(before.tasks) - set(after.tasks))
    extra_threads = sorted(set(after.threads) - set(before.threads))
    return f"tasks +{extra_tasks} -{gone_tasks}; threads +{extra_threads}; fds {before.fds}->{after.fds}"
