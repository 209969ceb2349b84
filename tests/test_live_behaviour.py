"""Live behaviour of a session (issue 4).

* joins between segments are cross-faded: no click where two segments' audio meet, after an
  underrun, or at an interrupt's cut (the largest sample-to-sample step stays small);
* an interrupt cuts at the next frame, and the next segment continues from the frame on
  screen; speech starts inside the idle segment on screen instead of after it;
* barge-in, conversation (listening) and lip-sync modes, and switching between them, with the
  picture and sound never stopping;
* idle super-resolution: buffered segments upgraded in the engine's spare time, the output size
  fixed, and an upgrade never delaying a segment;
* session lifetime: idle timeout, maximum duration, and a graceful drain on SIGTERM of an
  ``avatar-server serve`` process;
* interrupt-to-silence measured at the Python client over real WebRTC on loopback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import signal
import sys
import threading
import time

import numpy as np
import pytest
from websockets.asyncio.client import connect

from avatar_server.server import build_app
from avatar_server.settings import Settings
from engine.api import CancelledError, SegmentKind
from engine.testpattern import TestPatternEngine, decode_counter
from ops.measure_live import MarkedEngine, first_silence_arrival, first_speech_arrival
from ops.soak import http_status
from streaming import events
from streaming.engine_client import EngineWorker
from streaming.playout import PlayoutBuffer
from streaming.session import LoopConfig, SessionRunner
from tests.test_server_app import portrait_b64
from tests.test_streaming_session import (
    FakeMicrophone,
    RecordingEngine,
    make_runner,
    of_type,
    play,
    play_until,
    wait_until,
)

W, H = 32, 16


def pull_all(buf: PlayoutBuffer, first: int, count: int) -> np.ndarray:
    chunks = []
    for index in range(first, first + count):
        chunks.append(buf.pull_audio_chunk(2 * index))
        buf.pull_video_frame(index)
        chunks.append(buf.pull_audio_chunk(2 * index + 1))
    return np.concatenate(chunks)


def dc(frames: int, level: float) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((frames, H, W, 3), np.uint8), np.full(frames * 1920, level, np.float32)


async def play_realtime(runner: SessionRunner, seconds: float) -> list[np.ndarray]:
    """Pull frames (and their audio) when the media clock says they are due, as the tracks do."""
    runner.clock.start()
    frames = []
    end_s = time.monotonic() + seconds
    next_index = runner.buffer.head_frame
    while time.monotonic() < end_s:
        due = runner.clock.index_at(0.04)
        while next_index <= due:
            runner.buffer.pull_audio_chunk(2 * next_index)
            frames.append(runner.buffer.pull_video_frame(next_index))
            runner.buffer.pull_audio_chunk(2 * next_index + 1)
            next_index += 1
        await asyncio.sleep(0.01)
    return frames


# ------------------------------------------------------------------------------- joins
def test_joins_are_cross_faded_without_a_click() -> None:
    buf = PlayoutBuffer(width=W, height=H)
    buf.append(*dc(10, 0.5), 48_000, kind=SegmentKind.IDLE)
    buf.append(*dc(10, -0.5), 48_000, kind=SegmentKind.SPEAK)
    audio = pull_all(buf, 0, 20)
    join = 10 * 1920
    assert np.abs(np.diff(audio)).max() < 0.005  # a hard join would step by 1.0
    # 10 ms around the join, and only there
    np.testing.assert_allclose(audio[480 : join - 240], 0.5)  # after the fade-in from silence
    np.testing.assert_allclose(audio[join + 240 : 20 * 1920], -0.5)


def test_joins_that_cannot_be_prepared_are_declicked() -> None:
    buf = PlayoutBuffer(width=W, height=H)
    buf.append(*dc(10, 0.5), 48_000, kind=SegmentKind.IDLE)
    audio = [pull_all(buf, 0, 10)]  # all of it pulled: nothing left to fade
    buf.append(*dc(10, -0.5), 48_000, kind=SegmentKind.SPEAK)
    audio.append(pull_all(buf, 10, 5))
    buf.clear()  # interrupt mid-segment: the rest is silence
    audio.append(pull_all(buf, 15, 5))
    buf.append(*dc(5, 0.8), 48_000, kind=SegmentKind.IDLE)  # after the gap: fades in
    audio.append(pull_all(buf, 20, 5))
    joined = np.concatenate(audio)
    steps = np.abs(np.diff(joined))
    print(f"\nlargest step: {steps.max():.4f} (a hard join: 1.0); declicks: {buf.declicks}")
    assert steps.max() < 0.01 and buf.declicks == 4  # the start, the join, the cut, the end of the gap
    assert buf.underruns == 0  # the silence after an interrupt is not an underrun
    np.testing.assert_allclose(joined[-1920:], 0.8)


def test_a_dropped_segment_leaves_no_trace_in_the_join() -> None:
    buf = PlayoutBuffer(width=W, height=H)
    buf.append(*dc(10, 0.5), 48_000, kind=SegmentKind.SPEAK)
    buf.append(*dc(10, -0.5), 48_000, kind=SegmentKind.IDLE)
    pull_all(buf, 0, 1)
    assert len(buf.drop_unstarted_tail(lambda seg: seg.kind is SegmentKind.IDLE)) == 1
    buf.append(*dc(10, 0.2), 48_000, kind=SegmentKind.SPEAK)
    audio = np.concatenate([np.full(3840, 0.5, np.float32), pull_all(buf, 1, 19)])
    assert audio.min() >= 0.2 - 1e-6 and np.abs(np.diff(audio)).max() < 0.005


# ------------------------------------------------------------------------------- interrupts
async def test_interrupt_continues_from_the_frame_on_screen() -> None:
    runner, engine, log = await make_runner()
    runner.start()
    try:
        runner.speak("u1", "This is a long utterance that will be cut off in the middle by an interrupt. " * 3)
        runner.speak_end("u1")
        await play_until(runner, log, lambda e: isinstance(e, events.SpeakStarted))
        await play(runner, 12)
        on_screen = decode_counter(runner.buffer.last_frame)
        requests_before = len(engine.requests)
        [interrupted] = runner.interrupt()
        assert interrupted.utterance_id == "u1" and interrupted.played_ms > 0
        frames = []
        for _ in range(40):
            await play(runner, 1)
            frames.append(runner.buffer.last_frame)
        stats = runner.stats()
    finally:
        await runner.close()
    after = [r for r in engine.requests[requests_before:] if r.kind is SegmentKind.IDLE]
    first = after[0]
    assert first.continue_from is not None and first.continue_from.last_frame_latent is None
    assert decode_counter(first.continue_from.last_frame) == on_screen
    assert decode_counter(frames[0]) == on_screen + 1  # the picture goes on from where it stopped
    assert first.seconds == 1.0  # an empty buffer is refilled with a short segment first
    assert runner.buffer.underruns == 0 and stats["interrupt_ms"] is not None
    assert of_type(log, events.InterruptSilenced)


async def test_speech_starts_inside_the_idle_segment_on_screen() -> None:
    runner, engine, log = await make_runner(RecordingEngine(generate_delay_s=0.05), idle_segment_seconds=4.0)
    runner.start()
    try:
        await play_realtime(runner, 1.6)  # past the short first segment, into a 4 s one
        idle = next(s for s in runner.buffer.segments() if s.started and not s.ended)
        assert idle.kind is SegmentKind.IDLE and idle.num_frames > 90
        runner.speak("u1", "Short and sweet.")
        runner.speak_end("u1")
        spoken_s = time.monotonic()
        await play_realtime(runner, 1.0)
        started = next(e for e in log if isinstance(e, events.SpeakStarted))
        held = list(runner.buffer.segments())
    finally:
        await runner.close()
    speak = next(s for s in held if s.kind is SegmentKind.SPEAK)
    assert idle.cut and idle.end_frame == speak.start_frame < idle.start_frame + 40  # not after its 4 s
    request = next(r for r in engine.requests if r.kind is SegmentKind.SPEAK)
    assert decode_counter(request.continue_from.last_frame) == decode_counter(idle.frames[-1])
    assert runner.late_cuts == 0 and runner.buffer.underruns == 0
    assert started.latency_s < 0.6, started  # generation (0.05 s) + the planned lead, not 2 s on average
    assert time.monotonic() - spoken_s > started.latency_s


# ------------------------------------------------------------------------------- modes
async def test_barge_in_interrupts_and_keeps_the_users_voice() -> None:
    for barge_in in (True, False):
        mic = FakeMicrophone()
        runner, engine, log = await make_runner(barge_in=barge_in, microphone=mic)
        runner.start()
        try:
            runner.speak("u1", "I am talking and talking about many things for quite a long while now. " * 2)
            runner.speak_end("u1")
            await play_until(runner, log, lambda e: isinstance(e, events.SpeakStarted))
            mic.voice_starts(np.full(48_000, 0.1, np.float32))
            await play(runner, 5)
        finally:
            await runner.close()
        interrupted = of_type(log, events.Interrupted)
        if barge_in:
            assert [e.utterance_id for e in interrupted] == ["u1"]
            assert mic.audio.size > 0 or mic.taken  # the voice that barged in is kept
        else:
            assert not interrupted


async def test_conversation_mode_listens_and_switching_modes_never_stops_the_stream() -> None:
    mic = FakeMicrophone()
    runner, engine, log = await make_runner(RecordingEngine(generate_delay_s=0.02), mode="conversation", microphone=mic)
    runner.start()
    t = np.arange(6 * 48_000) / 48_000
    try:
        await play(runner, 10)
        mic.voice_starts((0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32))
        await play(runner, 75)
        kinds_conversation = {r.kind for r in engine.requests}
        state_while_talking = runner.state
        runner.set_mode(mode="lipsync")
        mic.audio = (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
        mic.speaking = mic.run_active = True
        await play_until(runner, log, lambda e: isinstance(e, events.SegmentGenerated) and e.kind is SegmentKind.LIPSYNC)
        runner.speak("u1", "And now some words.")
        runner.speak_end("u1")
        runner.interrupt()
        runner.set_mode(mode="conversation")
        await play(runner, 60)
        with pytest.raises(Exception) as info:
            runner.set_mode(mode="karaoke")
        assert info.value.code == "invalid_field"
    finally:
        await runner.close()
    assert SegmentKind.LIPSYNC not in kinds_conversation and SegmentKind.LISTEN in kinds_conversation
    assert state_while_talking == "listening"
    assert runner.buffer.underruns == 0  # the picture and the sound never stopped
    assert runner.config.mode == "conversation"


# ------------------------------------------------------------------------------- super-resolution
class SrEngine(TestPatternEngine):
    """Test pattern with a stand-in SR model: ``super_resolve`` doubles the size (pixel repeat)
    after ``upgrade_delay_s`` of simulated work, cut short by its cancel event."""

    can_super_resolve = True

    def __init__(self, upgrade_delay_s: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sr_width, self.sr_height = 2 * self.width, 2 * self.height
        self.upgrade_delay_s = upgrade_delay_s
        self.upgrades = 0

    def super_resolve(self, segment, cancel=None):
        if cancel is not None and cancel.wait(self.upgrade_delay_s):
            raise CancelledError("upgrade cancelled")
        self.upgrades += 1
        frames = segment.frames.repeat(2, axis=1).repeat(2, axis=2)
        return dataclasses.replace(segment, frames=frames, super_resolved=True)


async def sr_runner(upgrade_delay_s: float):
    engine = SrEngine(upgrade_delay_s, generate_delay_s=0.05)
    worker = EngineWorker(engine)
    identity = await worker.prepare_identity(np.full((64, 64, 3), 90, np.uint8), "")
    log: list = []
    config = LoopConfig(playout_target_ms=3000.0, super_resolution=True)
    return SessionRunner(worker=worker, identity=identity, on_event=log.append, config=config), engine, log


async def test_idle_super_resolution_upgrades_buffered_segments_at_a_fixed_size() -> None:
    runner, engine, log = await sr_runner(upgrade_delay_s=0.1)
    assert (runner.width, runner.height) == (448, 256)
    runner.start()
    try:
        await play(runner, 1)  # the first frame: the reference image, at the output size
        frames = await play_realtime(runner, 5.0)
        stats = runner.stats()
    finally:
        await runner.close()
        runner.worker.close()
    assert {f.shape for f in frames} == {(256, 448, 3)}
    assert runner.super_resolver.counts["done"] >= 1 and stats["upgraded"] >= 1
    upgraded = [e for e in of_type(log, events.SegmentSuperResolved) if e.result == "done"]
    assert upgraded and runner.buffer.underruns == 0
    assert (stats["width"], stats["height"]) == (448, 256)


async def test_an_upgrade_that_would_delay_its_segment_is_cancelled() -> None:
    runner, engine, log = await sr_runner(upgrade_delay_s=30.0)  # never finishes in time
    runner.start()
    try:
        frames = await play_realtime(runner, 4.0)
    finally:
        await runner.close()
        runner.worker.close()
    assert engine.upgrades == 0 and runner.super_resolver.counts["cancelled"] >= 1
    assert runner.buffer.underruns == 0  # generation never waited for the upgrade
    assert {f.shape for f in frames} == {(256, 448, 3)}  # not upgraded: resized at playout


# ------------------------------------------------------------------------------- lifetime
async def _messages_until_closed(ws, timeout_s: float = 10.0) -> list[dict]:
    out = []
    async with asyncio.timeout(timeout_s):
        try:
            async for raw in ws:
                out.append(json.loads(raw))
        except Exception:
            pass
    return out


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"session_idle_timeout_s": 0.6}, "idle_timeout"),
        ({"session_idle_timeout_s": 100, "session_max_duration_s": 0.8}, "max_duration"),
    ],
)
async def test_session_lifetime_limits_end_the_session(settings, reason, media_dir) -> None:
    app = build_app(Settings(engine="testpattern", port=0, **settings), TestPatternEngine())
    await app.start(warm_up=False)
    try:
        async with connect(f"ws://127.0.0.1:{app.port}/ws", max_size=None) as ws:
            await ws.send(json.dumps({"type": "session.start", "image": portrait_b64(media_dir)}))
            started = time.monotonic()
            messages = await _messages_until_closed(ws)
            lasted = time.monotonic() - started
            close_code, close_reason = ws.close_code, ws.close_reason
        for _ in range(100):
            if app.sessions_active == 0:
                break
            await asyncio.sleep(0.02)
        metrics = app.metrics.render().decode()
    finally:
        await app.close()
    types = [m["type"] for m in messages]
    assert types[0] == "session.ready"
    error = next(m for m in messages if m["type"] == "error")
    ended = next(m for m in messages if m["type"] == "session.ended")
    assert error["code"] == reason and ended["reason"] == reason and types.index("error") < types.index("session.ended")
    assert close_code == 1000 and close_reason.startswith(reason)
    assert lasted < 5.0 and app.sessions_active == 0
    assert f'avatar_server_sessions_ended_total{{reason="{reason}"}} 1.0' in metrics


async def test_sigterm_drains_a_serve_process_and_exits_cleanly(media_dir) -> None:
    from clients.client import AvatarClient, split_chunks

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "avatar_server.cli", "serve", "--engine", "testpattern", "--port", "0",
        "--testpattern-delay-s", "0.1", "--drain-timeout-s", "20", "--log-level", "WARNING",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(60):
            line = (await proc.stdout.readline()).decode()
        url = re.search(r"(http://\S+)", line).group(1)
        for _ in range(200):  # /readyz: warmed up
            status = await asyncio.to_thread(http_status, url + "readyz")
            if status == 200:
                break
            await asyncio.sleep(0.1)
        client = AvatarClient(url)
        await client.connect()
        await client.start_session((media_dir / "portrait.png").read_bytes())
        await client.start_media()
        await client.speak("bye", split_chunks("One more sentence before the server goes away, please.", 3))
        await client.wait_for("speak.started", timeout_s=20)
        proc.send_signal(signal.SIGTERM)
        ended = await client.wait_for("session.ended", timeout_s=30)
        returncode = await asyncio.wait_for(proc.wait(), 30)
        await client.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    types = [m.type for _, m in client.received.messages]
    assert ended.reason == "shutdown"
    assert "speak.ended" in types and types.index("speak.ended") < types.index("session.ended")  # finished first
    assert returncode == 0, (await proc.stderr.read()).decode()[-2000:]


async def test_health_readiness_and_refusals_report_drain_capacity_and_a_dead_worker(media_dir) -> None:
    app = build_app(Settings(engine="testpattern", port=0, max_sessions=1), TestPatternEngine())
    await app.start(warm_up=False)
    try:
        base = f"http://127.0.0.1:{app.port}/"
        assert await asyncio.to_thread(http_status, base + "healthz") == 200
        async with connect(f"ws://127.0.0.1:{app.port}/ws") as a, connect(f"ws://127.0.0.1:{app.port}/ws") as b:
            for ws in (a, b):
                await ws.send(json.dumps({"type": "session.start", "image": portrait_b64(media_dir)}))
            replies = [json.loads(await ws.recv()) for ws in (a, b)]
        assert [r["type"] for r in replies] == ["session.ready", "error"] and replies[1]["code"] == "capacity"
        app.draining = True
        assert app.readiness() == (False, "draining: the server is shutting down")
        app.worker.close()
        await asyncio.sleep(0.05)
        assert await asyncio.to_thread(http_status, base + "healthz") == 503
        metrics = app.metrics.render().decode()
    finally:
        await app.close()
    assert 'avatar_server_sessions_refused_total{reason="capacity"} 1.0' in metrics


async def test_a_stalled_engine_job_fails_health_and_readiness_until_it_ends() -> None:
    app = build_app(Settings(engine="testpattern", port=0, engine_stall_s=0.3), TestPatternEngine())
    await app.start()
    gate = threading.Event()
    try:
        await wait_until(lambda: app.readiness()[0])
        base = f"http://127.0.0.1:{app.port}/"
        future, _ = app.worker.jobs.submit(gate.wait, 30.0, deadline_s=time.monotonic())
        assert await asyncio.to_thread(http_status, base + "healthz") == 200  # running, not yet stalled
        await asyncio.sleep(0.45)
        assert await asyncio.to_thread(http_status, base + "healthz") == 503
        ok, reason = app.readiness()
        assert not ok and reason.startswith("engine stalled: a job has run") and "engine_stall_s = 0.3" in reason
        running = float(next(line.split()[1] for line in app.metrics.render().decode().splitlines()
                              if line.startswith("avatar_server_engine_job_running_seconds ")))
        assert running >= 0.45
        gate.set()
        assert await asyncio.wrap_future(future) is True
        await wait_until(lambda: not app.worker.jobs.busy)
        assert await asyncio.to_thread(http_status, base + "healthz") == 200
        assert app.readiness() == (True, "ready")
    finally:
        gate.set()
        await app.close()


async def test_a_session_the_engine_could_not_keep_up_with_is_refused(media_dir) -> None:
    """Load-based admission: with one session, an engine busy ~70 % of the window projects to
    ~140 % with two, above max_engine_utilization (0.9): the second session.start is refused
    (and /readyz says why); once the load is gone the same request is admitted."""
    settings = Settings(engine="testpattern", port=0, max_sessions=4, engine_utilization_window_s=1.0)
    app = build_app(settings, TestPatternEngine())
    await app.start()
    gate = threading.Event()
    start = json.dumps({"type": "session.start", "image": portrait_b64(media_dir)})
    try:
        await wait_until(lambda: app.readiness()[0])
        url = f"ws://127.0.0.1:{app.port}/ws"
        async with connect(url) as first, connect(url) as second:
            await first.send(start)
            assert json.loads(await first.recv())["type"] == "session.ready"
            await asyncio.sleep(1.0)  # the window forgets the warm-up and the identity
            assert app.engine_overload() is None
            future, _ = app.worker.jobs.submit(gate.wait, 30.0, deadline_s=time.monotonic())
            await asyncio.sleep(0.7)
            busy = app.worker.jobs.foreground_utilization(1.0)
            assert 0.6 <= busy <= 1.0, busy
            await second.send(start)
            refused = json.loads(await second.recv())
            assert refused["type"] == "error" and refused["code"] == "capacity", refused
            assert "with 1 session; one more would need about" in refused["message"], refused
            assert "max_engine_utilization = 0.9" in refused["message"], refused
            ok, reason = app.readiness()
            assert not ok and reason.startswith("at capacity: engine busy"), reason
            gate.set()
            await asyncio.wrap_future(future)
            await asyncio.sleep(1.1)  # the blocked second leaves the window
            assert app.engine_overload() is None
            await second.send(start)
            assert json.loads(await second.recv())["type"] == "session.ready"
            assert app.sessions_active == 2
        metrics = app.metrics.render().decode()
    finally:
        gate.set()
        await app.close()
    assert 'avatar_server_sessions_refused_total{reason="capacity"} 1.0' in metrics


# ------------------------------------------------------------------------------- over WebRTC
@pytest.mark.slow
async def test_interrupt_to_silence_at_the_client_over_webrtc(media_dir) -> None:
    """The client hears a continuous tone while the avatar speaks; after ``interrupt`` the
    received audio must be silent within 200 ms plus transport (aiortc's receiver holds about
    four 20 ms packets). Through two interrupts and a mode switch, the audio and video
    timelines stay gapless."""
    from clients.client import AvatarClient, split_chunks

    engine = MarkedEngine(TestPatternEngine(generate_delay_s=0.2))
    app = build_app(Settings(engine="testpattern", port=0, max_sessions=2), engine)
    await app.start()
    try:
        await wait_until(lambda: app.readiness()[0])
        client = AvatarClient(f"http://127.0.0.1:{app.port}/")
        await client.connect()
        ready = await client.start_session((media_dir / "portrait.png").read_bytes(), "A person.")
        assert ready.mode == "lipsync" and ready.sr is False
        await client.start_media()
        await asyncio.sleep(1.5)
        latencies_ms = []
        for number in range(2):
            sent_s = time.monotonic()
            await client.speak(f"long{number}", split_chunks("This goes on and on without an end in sight. " * 4, 3))
            while first_speech_arrival(client.received.audio, sent_s) is None:
                assert time.monotonic() - sent_s < 15, "no speech heard"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.6)
            interrupted_s = time.monotonic()
            await client.interrupt()
            reply = await client.wait_for("interrupted", timeout_s=5)
            assert reply.utterance_id == f"long{number}" and reply.played_ms > 0
            await asyncio.sleep(0.8)
            quiet_s = first_silence_arrival(client.received.audio, interrupted_s)
            latencies_ms.append(1000 * (quiet_s - interrupted_s))
            await client.update_session(mode="conversation" if number == 0 else "lipsync")
        stats = (await client.wait_for("stats", lambda m: m.mode == "lipsync", timeout_s=5)).model_dump()
        await client.close()
        metrics = app.metrics.render().decode()
    finally:
        await app.close()
    audio, video = client.received.audio, client.received.video
    print(
        f"\ninterrupt -> silence at the client: {[round(ms) for ms in latencies_ms]} ms "
        f"(server side: {stats['interrupt_ms']} ms); stats: {stats}"
    )
    assert all(ms <= 250 for ms in latencies_ms), latencies_ms  # 200 ms + loopback transport and noise
    assert set(np.round(np.diff([a.pts_s for a in audio]) * 1000).astype(int)) == {20}
    assert set(np.round(np.diff([v.pts_s for v in video]) * 1000).astype(int)) == {40}
    assert max(np.diff([a.arrival_s for a in audio])) < 0.25 and min(v.mean_luma for v in video) > 5
    assert stats["underruns"] == 0 and stats["mode"] == "lipsync"
    for field in ("frames_dropped", "gen_ms", "encode_ms", "av_offset_ms", "interrupt_ms", "queue", "upgraded"):
        assert field in stats, field
    assert stats["frames_dropped"] > 0 and abs(stats["av_offset_ms"]) < 40
    for name in (
        "avatar_server_interrupt_to_silence_seconds_count 2.0",
        "avatar_server_video_encode_seconds_count",
        "avatar_server_playout_buffer_seconds_count",
        "avatar_server_av_offset_seconds_count",
        "avatar_server_video_frames_dropped_total",
        "avatar_server_generation_queue_length",
    ):
        assert name in metrics, name


def test_a_planned_cut_then_a_join_uses_the_cut_segments_own_tail() -> None:
    buf = PlayoutBuffer(width=W, height=H)
    buf.append(*dc(10, 0.5), 48_000, kind=SegmentKind.IDLE)
    buf.append(*dc(10, -0.9), 48_000, kind=SegmentKind.IDLE)  # faded into the first, then cut away
    audio = [pull_all(buf, 0, 2)]
    buf.clear(5)  # speech cuts into the first idle segment at frame 5
    buf.append(*dc(10, 0.2), 48_000, kind=SegmentKind.SPEAK)
    audio.append(pull_all(buf, 2, 13))
    joined = np.concatenate(audio)
    assert joined[480:].min() >= 0.2 - 1e-6 and joined.max() <= 0.5 + 1e-6  # nothing of -0.9
    assert np.abs(np.diff(joined)).max() < 0.005


@pytest.mark.slow
async def test_a_client_closing_its_peer_connection_is_not_a_media_failure(media_dir) -> None:
    """The client closes its RTCPeerConnection but keeps the WebSocket (as a page does before a
    renegotiation, or a client leaving in that order): the server's senders stop while the
    peer connection still reads ``connected`` for a moment. That is the peer leaving, not an
    encoder/transport failure: no ``media_failed``; the session waits for a new offer."""
    from clients.client import AvatarClient

    app = build_app(Settings(engine="testpattern", port=0), TestPatternEngine(generate_delay_s=0.05))
    await app.start()
    try:
        await wait_until(lambda: app.readiness()[0])
        client = AvatarClient(f"http://127.0.0.1:{app.port}/")
        await client.connect()
        await client.start_session((media_dir / "portrait.png").read_bytes(), "A person.")
        await client.start_media()
        await wait_until(lambda: len(client.received.video) > 10, timeout_s=15)
        await client.pc.close()
        await asyncio.sleep(2.0)
        errors = [m for _, m in client.received.messages if m.type in ("error", "session.ended")]
        assert errors == [], errors
        assert app.sessions_active == 1
        assert 'avatar_server_sessions_ended_total{reason="media_failed"}' not in app.metrics.render().decode()
        await client.close()
    finally:
        await app.close()
