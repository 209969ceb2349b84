"""MediaFanout: a session with no WebRTC peer plays, speaks and records in real time; a stalled
consumer is dropped without slowing the pump or the other consumers.

Real SessionRunner on the test-pattern engine; rates are checked as ratios of wall time
(generous bounds: the machine is shared), sync from the pattern's flash/click markers.
"""

from __future__ import annotations

import asyncio
import time

import av
import numpy as np

from streaming import events
from streaming.fanout import MediaFanout, SinkTrack
from tests.test_recorder import flash_and_click_offsets_ms, read_mp4
from tests.test_streaming_session import make_runner

SPEAK_SHADE = (40, 24, 56)  # the test pattern's SPEAK background (engine/testpattern.py)


async def test_a_session_without_a_peer_plays_speaks_and_records(tmp_path) -> None:
    runner, _engine, log = await make_runner(playout_target_ms=1000.0)
    runner.start()
    fanout = MediaFanout(runner.video_track(), runner.audio_track())
    fanout.start()
    path = tmp_path / "headless.mp4"
    try:
        await asyncio.sleep(0.5)
        runner.start_recording(path)
        began = time.monotonic()
        runner.speak("u1", "Hello there, this is a headless session speaking to nobody at all.")
        runner.speak_end("u1")
        for _ in range(600):  # 30 s at most
            if any(isinstance(e, events.SpeakEnded) for e in log):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        wall_s = time.monotonic() - began
        result = await runner.stop_recording()
    finally:
        await fanout.close()
        await runner.close()
    assert result.error is None and result.dropped_video_frames == 0
    # Real time: the recording is as long as the wall time it covered (+-10 %).
    assert abs(result.duration_ms / 1000 / wall_s - 1) < 0.1, (result.duration_ms, wall_s)
    video, audio, video_s, audio_s = read_mp4(path)
    assert abs(video_s - audio_s) <= 0.05
    offsets = flash_and_click_offsets_ms(video, audio)
    assert all(abs(ms) <= 40 for ms in offsets), offsets
    # The speech is in the file: frames with the SPEAK background, and its SpeakStarted came first.
    with av.open(str(path)) as container:
        shades = [frame.to_ndarray(format="rgb24")[60:100, 150:200].reshape(-1, 3).mean(axis=0)
                  for frame in container.decode(video=0)]
    speak = [s for s in shades if np.abs(s - SPEAK_SHADE).max() < 8]
    ended = next(e for e in log if isinstance(e, events.SpeakEnded))
    assert len(speak) >= 0.8 * ended.played_ms / 40, (len(speak), ended.played_ms)
    assert fanout.frames_pumped["video"] > 0


async def test_a_stalled_consumer_is_dropped_and_the_others_go_on() -> None:
    runner, _engine, _log = await make_runner(playout_target_ms=1000.0)
    runner.start()
    fanout = MediaFanout(runner.video_track(), runner.audio_track())
    stalls: list[str] = []
    reader = SinkTrack(fanout, "video")
    stalled = SinkTrack(fanout, "video", stall_s=1.0, on_stall=lambda: stalls.append("stalled"))
    fanout.start()
    received = 0
    try:
        began = time.monotonic()
        async with asyncio.timeout(10):
            while time.monotonic() - began < 3.0:
                await reader.recv()
                received += 1
        wall_s = time.monotonic() - began
        sinks = fanout.sinks
    finally:
        await fanout.close()
        await runner.close()
    assert reader in sinks and stalled not in sinks
    assert stalls == ["stalled"] and stalled.stalled and stalled.readyState == "ended"
    assert reader.dropped == 0
    # The reader got every frame at 25 fps (+-10 %) while the other one stalled.
    assert abs(received / wall_s / 25 - 1) < 0.1, (received, wall_s)
