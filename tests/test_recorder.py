"""Session recording: MP4 (H.264 + AAC) written from the playout path by a writer thread.

Checked on the file (PyAV): both streams, their durations within one frame of each other and
of what was played, and A/V sync from the test pattern's flash (video) and click (audio),
which the engine puts at the same media time: every click must start within one frame
(40 ms) of its flash. Over the control channel: record.start -> record.started,
record.stop -> record.stopped with the path and duration.
"""

from __future__ import annotations

import asyncio
import json
import threading

import av
import numpy as np
import pytest
from websockets.asyncio.client import connect

from engine.api import SegmentKind
from streaming.playout import PlayoutBuffer
from streaming.recorder import SessionRecorder
from tests.test_server_app import portrait_b64
from tests.test_streaming_session import make_runner, play


def read_mp4(path) -> tuple[list[tuple[float, float]], np.ndarray, float, float]:
    """``[(pts_s, mean_luma)]`` of the video, mono float32 audio at 48 kHz, video and audio duration."""
    video: list[tuple[float, float]] = []
    chunks = []
    with av.open(str(path)) as container:
        assert {s.type for s in container.streams} == {"video", "audio"}
        vstream, astream = container.streams.video[0], container.streams.audio[0]
        assert vstream.codec_context.name == "h264" and astream.codec_context.name == "aac"
        for frame in container.decode(video=0):
            video.append((float(frame.pts * frame.time_base), float(frame.to_ndarray(format="gray").mean())))
    with av.open(str(path)) as container:
        first_pts = None
        for frame in container.decode(audio=0):
            if first_pts is None:
                first_pts = float(frame.pts * frame.time_base)
            chunks.append(frame.to_ndarray().mean(axis=0))
        sample_rate = container.streams.audio[0].sample_rate
    audio = np.concatenate(chunks).astype(np.float32)
    assert sample_rate == 48_000 and abs(first_pts) < 1e-3, (sample_rate, first_pts)
    return video, audio, (len(video)) / 25, audio.size / 48_000


def flash_and_click_offsets_ms(video: list[tuple[float, float]], audio: np.ndarray) -> list[float]:
    flashes = [pts for i, (pts, luma) in enumerate(video) if luma > 128 and (i == 0 or video[i - 1][1] <= 128)]
    loud = np.flatnonzero(np.abs(audio) > 0.3)
    onsets = [loud[0]] + [b for a, b in zip(loud[:-1], loud[1:], strict=True) if b - a > 4_800] if loud.size else []
    clicks = [index / 48_000 for index in onsets]
    assert len(flashes) >= 4 and len(clicks) >= 4, (flashes, clicks)
    return [1000 * (min(clicks, key=lambda c, f=f: abs(c - f)) - f) for f in flashes]


async def test_recording_from_the_playout_path_is_in_sync(tmp_path) -> None:
    runner, engine, log = await make_runner()
    runner.start()
    path = tmp_path / "rec" / "session.mp4"
    try:
        await play(runner, 7)  # start mid-segment, on a frame boundary
        recorder = runner.start_recording(path)
        assert recorder.first_frame == 7
        with pytest.raises(Exception) as info:
            runner.start_recording(tmp_path / "other.mp4")
        assert info.value.code == "recording_active"
        for _ in range(120):  # 4.8 s over three segment joins, at twice real time
            await play(runner, 1)
            await asyncio.sleep(0.02)
        runner.buffer.pull_audio_chunk(2 * runner.buffer.head_frame)  # audio one chunk ahead: video padded
        result = await runner.stop_recording()
        assert runner.recorder is None
    finally:
        await runner.close()
    assert result.error is None and result.path == path and path.stat().st_size > 0
    assert result.video_frames == 121 and result.duration_ms == 4840
    assert result.dropped_video_frames == 0 and result.dropped_audio_chunks == 0
    video, audio, video_s, audio_s = read_mp4(path)
    assert len(video) == 121
    assert abs(video_s - audio_s) <= 0.04 + 1e-6, (video_s, audio_s)  # AAC pads the last packet
    offsets = flash_and_click_offsets_ms(video, audio)
    print(f"\nrecording: {video_s:.2f} s video, {audio_s:.3f} s audio; click - flash: {offsets} ms")
    assert all(abs(ms) <= 40 for ms in offsets), offsets


class SlowWriter:
    """Stands in for Mp4Writer: slow to take frames, records what it got."""

    def __init__(self, path, width, height, fps, sample_rate, channels) -> None:
        self.frames = 0
        self.samples = 0
        self.release = threading.Event()

    def write_video(self, frame) -> None:
        self.release.wait(0.05)
        self.frames += 1

    def write_audio(self, samples) -> None:
        self.samples += len(samples)

    def close(self) -> None:
        pass


async def test_a_writer_that_falls_behind_drops_counted_items_and_keeps_the_timeline(tmp_path) -> None:
    buffer = PlayoutBuffer(width=32, height=16)
    buffer.append(np.zeros((100, 16, 32, 3), np.uint8), np.zeros(100 * 1920, np.float32), 48_000, kind=SegmentKind.IDLE)
    writers: list[SlowWriter] = []

    def factory(*args):
        writers.append(SlowWriter(*args))
        return writers[-1]

    recorder = SessionRecorder(tmp_path / "x.mp4", buffer, max_queue_s=0.1, writer_factory=factory)
    for index in range(100):  # 4 s of media pulled at once: far faster than the writer takes it
        buffer.pull_audio_chunk(2 * index)
        buffer.pull_video_frame(index)
        buffer.pull_audio_chunk(2 * index + 1)
    result = await recorder.stop()
    assert result.dropped_video_frames > 0
    writer = writers[0]
    # gaps were filled: the file still covers every frame pulled, audio as long as video
    assert writer.frames == result.video_frames >= 100 - result.dropped_video_frames
    assert writer.samples == writer.frames * 1920
    assert not buffer.video_taps and not buffer.audio_taps


async def test_record_start_and_stop_over_the_control_channel(tmp_path, media_dir) -> None:
    from avatar_server.server import build_app
    from avatar_server.settings import Settings
    from engine.testpattern import TestPatternEngine

    settings = Settings(engine="testpattern", port=0, recordings_dir=tmp_path / "recordings")
    app = build_app(settings, TestPatternEngine())
    await app.start(warm_up=False)
    try:
        async with connect(f"ws://127.0.0.1:{app.port}/ws", max_size=None) as ws:

            async def reply(types: tuple[str, ...]) -> dict:
                async with asyncio.timeout(10):
                    while True:
                        message = json.loads(await ws.recv())
                        if message["type"] in types:
                            return message

            await ws.send(json.dumps({"type": "record.start"}))
            assert (await reply(("error",)))["code"] == "no_session"
            await ws.send(json.dumps({"type": "session.start", "image": portrait_b64(media_dir)}))
            ready = await reply(("session.ready",))
            await ws.send(json.dumps({"type": "record.stop"}))
            assert (await reply(("error",)))["code"] == "no_recording"
            await ws.send(json.dumps({"type": "record.start"}))
            started = await reply(("record.started",))
            assert started["recording_id"].startswith(ready["session_id"])
            # the file's name under recordings_dir: no directory of the server on the wire (issue 18)
            assert "/" not in started["path"] and str(tmp_path) not in started["path"]
            assert started["path"].endswith(".mp4")  # opened below, under recordings_dir
            # no WebRTC here: pull frames as the tracks would
            session = next(iter(app.connections)).session
            await play(session, 30)
            await ws.send(json.dumps({"type": "record.stop"}))
            stopped = await reply(("record.stopped",))
            assert stopped["path"] == started["path"] and stopped["duration_ms"] == 1200
            assert stopped["dropped_frames"] == 0 and stopped["error"] is None
            stats = await reply(("stats",))
            assert stats["recording"] is False
    finally:
        await app.close()
    with av.open(str(tmp_path / "recordings" / started["path"])) as container:
        assert sum(1 for _ in container.decode(video=0)) == 30


async def test_no_server_directory_reaches_the_client_in_any_recording_frame(tmp_path, media_dir) -> None:
    """Issue 18: ``record.started`` / ``record.stopped`` name the file relative to the server's
    ``recordings_dir``; no frame of a recording session carries an absolute path or a directory
    of the server (the old ``path`` was the absolute file path)."""
    from avatar_server.server import build_app
    from avatar_server.settings import Settings
    from engine.testpattern import TestPatternEngine

    recordings = tmp_path / "server-side" / "recordings"
    app = build_app(Settings(engine="testpattern", port=0, recordings_dir=recordings), TestPatternEngine())
    await app.start(warm_up=False)
    frames: list[str] = []
    try:
        async with connect(f"ws://127.0.0.1:{app.port}/ws", max_size=None) as ws:

            async def reply(wanted: str) -> dict:
                async with asyncio.timeout(10):
                    while True:
                        frames.append(await ws.recv())
                        message = json.loads(frames[-1])
                        if message["type"] == wanted:
                            return message

            await ws.send(json.dumps({"type": "session.start", "image": portrait_b64(media_dir)}))
            await reply("session.ready")
            await ws.send(json.dumps({"type": "record.start"}))
            started = await reply("record.started")
            await play(next(iter(app.connections)).session, 10)
            await ws.send(json.dumps({"type": "record.stop"}))
            stopped = await reply("record.stopped")
            await ws.send(json.dumps({"type": "interrupt"}))  # one more round trip: frames after the stop
            await reply("stats")
    finally:
        await app.close()
    assert started["path"] == stopped["path"] and started["path"].endswith(".mp4")
    assert started["path"] == next(recordings.iterdir()).name  # the file's name under recordings_dir
    for frame in frames:
        assert str(tmp_path) not in frame and str(recordings) not in frame and "server-side" not in frame, frame
