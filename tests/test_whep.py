"""WHEP relay: many viewers of one session through one shared H.264 encode, limits, and a
stalled viewer dropped without touching the session or the other viewers.

Real aiortc viewers on loopback (one in a subprocess that the test freezes with SIGSTOP).
Rates are frames decoded per second of wall time (+-10 %, machine shared).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from avatar_server.webrtc import use_host_addresses
from ops.whep_viewer import Viewer
from streaming.fanout import MediaFanout
from streaming.whep import ViewerBudget, WhepError, WhepRelay
from tests.test_streaming_session import make_runner


@pytest.fixture
async def session():
    use_host_addresses(["127.0.0.1"])
    runner, _engine, _log = await make_runner(playout_target_ms=1000.0)
    runner.start()
    fanout = MediaFanout(runner.video_track(), runner.audio_track())
    fanout.start()
    try:
        yield runner, fanout
    finally:
        await fanout.close()
        await runner.close()
        use_host_addresses(None)


async def join(relay: WhepRelay, viewer: Viewer) -> str:
    viewer_id, answer = await relay.add_viewer(await viewer.offer())
    await viewer.answer(answer)
    return viewer_id


async def wait_until(predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_five_viewers_decode_at_25_fps_from_one_encode(session) -> None:
    runner, fanout = session
    relay = WhepRelay(fanout, width=runner.width, height=runner.height, max_viewers=5)
    viewers = [Viewer() for _ in range(5)]
    try:
        ids = [await join(relay, viewer) for viewer in viewers]
        await wait_until(lambda: all(len(v.frames["video"]) > 10 for v in viewers), 30)
        encoded_before = relay.encoder.frames_encoded
        began = time.monotonic()
        await asyncio.sleep(3.0)
        ended = time.monotonic()
        encoded = relay.encoder.frames_encoded - encoded_before
        with pytest.raises(WhepError) as full:
            await relay.add_viewer(await Viewer().offer())
        assert await relay.remove_viewer(ids[0]) and not await relay.remove_viewer(ids[0])
        assert len(relay.viewers) == 4
    finally:
        for viewer in viewers:
            await viewer.close()
        await relay.close()
    assert full.value.code == "viewer_limit" and full.value.status == 503
    assert all(v.shapes == {(runner.height, runner.width)} for v in viewers)
    rates = [v.media_rate(began, ended) for v in viewers]  # every frame decoded: 25 per media second
    wall_rates = [v.rate("video", began, ended) for v in viewers]  # and live: frames keep coming
    print(f"\nvideo fps per viewer: {[round(r, 1) for r in rates]}; shared encodes: {encoded / (ended - began):.1f}/s")
    assert all(abs(r / 25 - 1) < 0.1 for r in rates), rates
    assert all(r > 15 for r in wall_rates), wall_rates
    assert all(v.rate("audio", began, ended) > 40 for v in viewers)
    # One encode per frame for all five viewers, not one per viewer.
    assert abs(encoded / (ended - began) / 25 - 1) < 0.1, encoded


@pytest.mark.slow
async def test_a_viewer_without_h264_gets_its_own_encoder_and_the_server_limit_holds(session) -> None:
    runner, fanout = session
    budget = ViewerBudget(2)
    relay_a = WhepRelay(fanout, width=runner.width, height=runner.height, budget=budget)
    relay_b = WhepRelay(fanout, width=runner.width, height=runner.height, budget=budget)
    vp8 = Viewer(video_codec="video/vp8")
    other = Viewer()
    try:
        vp8_id = await join(relay_a, vp8)
        await join(relay_b, other)
        with pytest.raises(WhepError) as full:
            await relay_b.add_viewer(await Viewer().offer())
        with pytest.raises(WhepError) as bad:
            await relay_a.add_viewer("v=0\r\nnot an offer")
        await wait_until(lambda: len(vp8.frames["video"]) > 25, 30)
        assert not relay_a.viewers[vp8_id].shared and relay_a.encoder.subscribers == 0
    finally:
        await vp8.close()
        await other.close()
        await relay_a.close()
        await relay_b.close()
    assert full.value.code == "server_viewer_limit" and bad.value.code == "bad_sdp" and bad.value.status == 400
    assert budget.in_use == 0


@pytest.mark.slow
async def test_a_frozen_viewer_is_dropped_and_the_others_go_on(session) -> None:
    runner, fanout = session
    left: list[tuple[str, str]] = []
    relay = WhepRelay(
        fanout, width=runner.width, height=runner.height, stall_s=3.0,
        on_viewer_left=lambda vid, reason: left.append((vid, reason)),
    )
    healthy = Viewer()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ops.whep_viewer", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    try:
        await join(relay, healthy)
        offer = json.loads(await proc.stdout.readline())["offer"]
        frozen_id, answer = await relay.add_viewer(offer)
        proc.stdin.write((json.dumps({"answer": answer}) + "\n").encode())
        await proc.stdin.drain()
        for _ in range(60):  # the subprocess viewer decodes
            if json.loads(await proc.stdout.readline())["video"] > 25:
                break
        else:
            raise AssertionError("the subprocess viewer never decoded")
        pumped = fanout.frames_pumped["video"]
        began = time.monotonic()
        os.kill(proc.pid, signal.SIGSTOP)  # stops reading, stops RTCP
        await wait_until(lambda: frozen_id not in relay.viewers, 20)
        dropped_after_s = time.monotonic() - began
        await asyncio.sleep(1.0)
        ended = time.monotonic()
        rate = healthy.rate("video", began, ended)
        pump_rate = (fanout.frames_pumped["video"] - pumped) / (ended - began)
    finally:
        proc.kill()
        await proc.wait()
        await healthy.close()
        await relay.close()
    print(f"\nfrozen viewer dropped after {dropped_after_s:.1f} s ({left[0][1]}); healthy viewer {rate:.1f} fps")
    assert left[0][0] == frozen_id and left[0][1].startswith("stalled")
    # stall_s after its last receiver report, which came up to ~1.5 s (aiortc's RR interval) before the freeze
    assert 1.5 <= dropped_after_s < 10.0
    assert abs(rate / 25 - 1) < 0.1 and abs(pump_rate / 25 - 1) < 0.1, (rate, pump_rate)
