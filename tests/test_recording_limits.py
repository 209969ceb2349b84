"""Recording limits: length, file size and free-disk floor of one recording (the recorder stops
by itself at a frame boundary and the file is a complete MP4), and record.start refused per
session, server-wide and on a full disk, each error naming its limit.

The recorder tests pull frames by hand from a playout buffer (no engine, no WebRTC); the disk is
a fake whose free space the test sets, so nothing sleeps or fills a real disk. The server tests
run the test-pattern engine on loopback and pull frames as the tracks would.
"""

from __future__ import annotations

import asyncio
import json

import av
import numpy as np
import pytest
from pydantic import ValidationError
from websockets.asyncio.client import connect

from avatar_server.settings import Limits, Settings
from engine.api import SegmentKind
from engine.media import Mp4Writer
from streaming.playout import PlayoutBuffer
from streaming.recorder import RecordingLimits, SessionRecorder
from tests.security_support import png_b64, recv_json, server, settle
from tests.test_recorder import read_mp4
from tests.test_streaming_session import play

FPS = 25
FRAME_SAMPLES = 1920  # 48 kHz / 25 fps
CHUNK_SAMPLES = 960  # 20 ms


def ramp_buffer(frames: int = 100, width: int = 64, height: int = 48) -> PlayoutBuffer:
    """A buffer of ``frames`` frames whose luma rises 2 per frame, with a 440 Hz tone at 0.5."""
    buffer = PlayoutBuffer(width=width, height=height)
    video = np.stack([np.full((height, width, 3), 20 + 2 * k, np.uint8) for k in range(frames)])
    t = np.arange(frames * FRAME_SAMPLES) / 48_000
    audio = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    buffer.append(video, audio, 48_000, kind=SegmentKind.IDLE)
    return buffer


def pull(buffer: PlayoutBuffer, count: int, *, audio: bool = True) -> None:
    """Pull ``count`` frames from the head, with their two audio chunks, as the tracks do."""
    for _ in range(count):
        index = buffer.head_frame
        if audio:
            buffer.pull_audio_chunk(2 * index)
        buffer.pull_video_frame(index)
        if audio:
            buffer.pull_audio_chunk(2 * index + 1)


class ByteWriter:
    """Stands in for Mp4Writer: appends 1000 bytes per video frame and 10 per audio chunk to the
    file, unbuffered, so the output size is exact; counts frames and samples."""

    def __init__(self, path, width, height, fps, sample_rate, channels) -> None:
        self.file = open(path, "wb", buffering=0)  # noqa: SIM115 - closed in close()
        self.frames = 0
        self.samples = 0

    def write_video(self, frame) -> None:
        self.file.write(b"v" * 1000)
        self.frames += 1

    def write_audio(self, samples) -> None:
        self.file.write(b"a" * (10 * len(samples) // CHUNK_SAMPLES))
        self.samples += len(samples)

    def close(self) -> None:
        self.file.close()


class Ended:
    """The recorder's ``on_end`` callback: counts its calls, can be awaited."""

    def __init__(self) -> None:
        self.calls = 0
        self.event = asyncio.Event()

    def __call__(self) -> None:
        self.calls += 1
        self.event.set()

    async def wait(self, timeout_s: float = 10.0) -> None:
        async with asyncio.timeout(timeout_s):
            await self.event.wait()


async def test_max_duration_ends_a_recording_at_a_frame_boundary_with_a_complete_file(tmp_path) -> None:
    buffer = ramp_buffer()
    pull(buffer, 5)  # the recording starts at frame 5
    ended = Ended()
    recorder = SessionRecorder(
        tmp_path / "d.mp4", buffer, limits=RecordingLimits(max_seconds=1.0), on_end=ended, writer_factory=Mp4Writer
    )
    pull(buffer, 60)  # 2.4 s of media offered
    await ended.wait()
    pull(buffer, 20)  # after the end: neither recorded nor counted as dropped
    result = await recorder.stop()
    assert ended.calls == 1
    assert result.limit == "max_duration" and result.error is None
    assert result.video_frames == 25 and result.duration_ms == 1000
    assert result.dropped_video_frames == 0 and result.dropped_audio_chunks == 0
    assert result.size_bytes == (tmp_path / "d.mp4").stat().st_size > 0
    assert not buffer.video_taps and not buffer.audio_taps
    video, audio, video_s, audio_s = read_mp4(result.path)
    # every frame up to the cut, in order (frames 5..29 of the ramp), none held or repeated
    assert len(video) == 25
    lumas = np.array([luma for _, luma in video])
    expected = 20 + 2 * np.arange(5, 30)
    assert np.abs(lumas - expected).max() <= 3, lumas
    assert abs(video_s - audio_s) <= 0.04 + 1e-6, (video_s, audio_s)
    # the tone runs to the cut: the audio was recorded, not padded with silence
    tail = audio[int(0.9 * 48_000) : int(0.98 * 48_000)]
    assert np.sqrt(np.mean(tail**2)) > 0.25


async def test_max_duration_without_audio_waits_one_second_then_pads_silence(tmp_path) -> None:
    """A session whose offer has no audio track: the video reaches the cut, the recorder waits one
    second of video for audio that never comes, then pads the audio as on stop."""
    buffer = ramp_buffer()
    writers: list[ByteWriter] = []
    ended = Ended()

    def factory(*args):
        writers.append(ByteWriter(*args))
        return writers[-1]

    recorder = SessionRecorder(
        tmp_path / "v.mp4", buffer, limits=RecordingLimits(max_seconds=1.0), on_end=ended, writer_factory=factory
    )
    pull(buffer, 50, audio=False)  # positions 0..49: the cut (25) plus 25 frames of grace not yet passed
    assert await settle(lambda: recorder.queued_items == 0 and writers and writers[0].frames == 25, 10)
    await asyncio.sleep(0.05)
    assert ended.calls == 0
    pull(buffer, 1, audio=False)  # position 50: one second past the cut
    await ended.wait()
    result = await recorder.stop()
    assert result.limit == "max_duration" and result.video_frames == 25
    assert writers[0].frames == 25 and writers[0].samples == 25 * FRAME_SAMPLES


async def test_max_bytes_cuts_where_the_output_reached_the_limit(tmp_path) -> None:
    """With 1000 bytes a frame and 10 an audio chunk, the output reaches 20,000 bytes when frame 19
    is written (20,390 bytes); its second audio chunk completes the frame and the file ends."""
    buffer = ramp_buffer()
    writers: list[ByteWriter] = []
    ended = Ended()

    def factory(*args):
        writers.append(ByteWriter(*args))
        return writers[-1]

    recorder = SessionRecorder(
        tmp_path / "b.mp4", buffer, limits=RecordingLimits(max_bytes=20_000), on_end=ended, writer_factory=factory
    )
    pull(buffer, 40)
    await ended.wait()
    result = await recorder.stop()
    assert result.limit == "max_size" and result.error is None
    assert result.video_frames == 20 and result.duration_ms == 800
    assert writers[0].samples == 40 * CHUNK_SAMPLES
    assert result.size_bytes == 20 * 1000 + 40 * 10 == (tmp_path / "b.mp4").stat().st_size


async def test_max_bytes_on_a_real_mp4_stays_playable_and_near_the_limit(tmp_path) -> None:
    rng = np.random.default_rng(0)
    buffer = PlayoutBuffer(width=128, height=96)
    frames = 250
    noise = rng.integers(0, 256, (frames, 96, 128, 3), dtype=np.uint8)  # ~9 KB a frame in H.264
    buffer.append(noise, np.zeros(frames * FRAME_SAMPLES, np.float32), 48_000, kind=SegmentKind.IDLE)
    ended = Ended()
    limit = 1024 * 1024
    recorder = SessionRecorder(
        tmp_path / "n.mp4", buffer, limits=RecordingLimits(max_bytes=limit), on_end=ended, max_queue_s=12.0
    )
    pull(buffer, frames)
    await ended.wait(30)
    result = await recorder.stop()
    assert result.limit == "max_size" and result.error is None
    assert 25 < result.video_frames < frames
    # the size is read from the file, which grows in 256 KiB steps of PyAV's I/O buffer
    assert limit <= result.size_bytes <= limit + 512 * 1024, result.size_bytes
    with av.open(str(result.path)) as container:
        assert sum(1 for _ in container.decode(video=0)) == result.video_frames
    with av.open(str(result.path)) as container:
        audio_samples = sum(frame.samples for frame in container.decode(audio=0))
    assert abs(audio_samples / 48_000 - result.video_frames / FPS) <= 0.05


async def test_free_disk_floor_stops_a_running_recording(tmp_path) -> None:
    """Free space is checked every 0.2 s of media (5 frames): at frames 1, 6, ..., 26 the fake disk
    has room, at frame 31 (the 7th check) it has 100 bytes, below the 1,000-byte floor."""
    buffer = ramp_buffer()
    answers = iter([10**12] * 6 + [100] * 100)
    asked: list = []

    def free_bytes(path) -> int:
        asked.append(path)
        return next(answers)

    ended = Ended()
    limits = RecordingLimits(min_free_bytes=1000, disk_check_interval_s=0.2, free_bytes=free_bytes)
    recorder = SessionRecorder(tmp_path / "rec" / "f.mp4", buffer, limits=limits, on_end=ended)
    pull(buffer, 60)
    await ended.wait()
    result = await recorder.stop()
    assert result.limit == "disk_full" and result.free_bytes == 100
    assert result.video_frames == 31 and len(asked) == 7 and asked[0] == tmp_path / "rec"
    video, _, video_s, audio_s = read_mp4(result.path)
    assert len(video) == 31 and abs(video_s - audio_s) <= 0.04 + 1e-6


async def test_a_recording_stopped_before_its_limit_reports_no_limit(tmp_path) -> None:
    buffer = ramp_buffer()
    ended = Ended()
    recorder = SessionRecorder(tmp_path / "s.mp4", buffer, limits=RecordingLimits(max_seconds=2.0), on_end=ended)
    pull(buffer, 10)
    result = await recorder.stop()
    assert result.limit is None and result.video_frames == 10 and ended.calls == 0


# ------------------------------------------------------------------------------------------- server
class FakeDisk:
    """``free_bytes`` of the server's admission registry: answers ``queued`` first, one per call,
    then ``free`` (so that the writer thread's checks see a value that does not race the test)."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.queued: list[int] = []
        self.calls = 0

    def __call__(self, path) -> int:
        self.calls += 1
        return self.queued.pop(0) if self.queued else self.free


async def reply(ws, *types: str) -> dict:
    while True:
        message = await recv_json(ws)
        if message["type"] in types:
            return message


async def start_session(ws) -> dict:
    await ws.send(json.dumps({"type": "session.start", "image": png_b64()}))
    return await reply(ws, "session.ready")


def metric(app, name: str, labels: str = "") -> float:
    for line in app.metrics.render().decode().splitlines():
        if line.startswith(f"{name}{labels} "):
            return float(line.split()[-1])
    return 0.0


async def test_record_limits_over_the_control_channel(tmp_path) -> None:
    limits = {"max_recording_s": 0.4, "max_recordings_per_session": 2}
    async with server(recordings_dir=tmp_path / "rec", limits=limits) as app:
        async with connect(f"ws://127.0.0.1:{app.port}/ws", max_size=None) as ws:
            await start_session(ws)
            session = next(iter(app.connections)).session
            await ws.send(json.dumps({"type": "record.start"}))
            started = await reply(ws, "record.started")
            await play(session, 30)  # 1.2 s pulled; the recording keeps 0.4 s
            stopped = await reply(ws, "record.stopped")
            assert stopped["reason"] == "max_duration" and stopped["duration_ms"] == 400
            assert stopped["path"] == started["path"] and stopped["error"] is None
            assert "the limit is max_recording_s = 0.4" in stopped["message"]
            assert stopped["size_bytes"] > 0
            assert session.recorder is None
            assert metric(app, "avatar_server_recordings_stopped_total", '{reason="max_duration"}') == 1
            assert metric(app, "avatar_server_recordings_active") == 0
            with av.open(tmp_path / "rec" / started["path"]) as container:  # a name under recordings_dir
                assert sum(1 for _ in container.decode(video=0)) == 10
            # a second recording, stopped by the client
            await ws.send(json.dumps({"type": "record.start"}))
            await reply(ws, "record.started")
            await play(session, 3)
            await ws.send(json.dumps({"type": "record.stop"}))
            stopped = await reply(ws, "record.stopped")
            assert stopped["reason"] == "stopped" and stopped["duration_ms"] == 120
            # the third is over max_recordings_per_session
            await ws.send(json.dumps({"type": "record.start"}))
            error = await reply(ws, "error")
            assert error["code"] == "too_many_recordings"
            assert error["message"] == (
                "record.start: this session made 2 recordings; the limit is max_recordings_per_session = 2"
            )
            assert app.admission.recordings_running == 0


async def test_concurrent_recordings_and_the_free_disk_floor(tmp_path) -> None:
    limits = {"max_concurrent_recordings": 1, "min_recording_free_bytes": 5000}
    async with server(recordings_dir=tmp_path / "rec", limits=limits) as app:
        disk = FakeDisk(10**12)
        app.admission.free_bytes = disk
        url = f"ws://127.0.0.1:{app.port}/ws"
        async with connect(url, max_size=None) as first, connect(url, max_size=None) as second:
            await start_session(first)
            await start_session(second)
            await first.send(json.dumps({"type": "record.start"}))
            await reply(first, "record.started")
            await second.send(json.dumps({"type": "record.start"}))
            error = await reply(second, "error")
            assert error["code"] == "too_many_recordings"
            assert error["message"].endswith("the limit is max_concurrent_recordings = 1")
            await first.send(json.dumps({"type": "record.stop"}))
            assert (await reply(first, "record.stopped"))["reason"] == "stopped"
            # the slot is free again, but the disk is now below the floor
            disk.free = 4999
            await second.send(json.dumps({"type": "record.start"}))
            error = await reply(second, "error")
            assert error["code"] == "disk_full"
            assert error["message"] == (
                "record.start: 4999 bytes free on the recordings volume; the limit is min_recording_free_bytes = 5000"
            )
            assert metric(app, "avatar_server_recordings_refused_total", '{reason="disk_full"}') == 1
            assert metric(app, "avatar_server_recordings_refused_total", '{reason="too_many_recordings"}') == 1
            # room again: it starts; the disk fills while it runs: it stops. Free space is asked at
            # record.start, then every second of media (frames 1, 26, ...): the third answer is 100.
            disk.free, disk.queued, disk.calls = 100, [10**12, 10**12], 0
            await second.send(json.dumps({"type": "record.start"}))
            await reply(second, "record.started")
            conn = next(c for c in app.connections if c.session is not None and c.session.recorder is not None)
            await play(conn.session, 45)
            stopped = await reply(second, "record.stopped")
            assert disk.calls == 3
            assert stopped["reason"] == "disk_full" and stopped["duration_ms"] == 1040
            assert stopped["message"].endswith(
                "100 bytes free on the recordings volume; the limit is min_recording_free_bytes = 5000"
            )
            with av.open(tmp_path / "rec" / stopped["path"]) as container:
                assert sum(1 for _ in container.decode(video=0)) == 26
            assert app.admission.recordings_running == 0


def test_recording_limits_are_settings(monkeypatch) -> None:
    monkeypatch.setenv("AVATAR_SERVER_LIMITS__MAX_RECORDING_S", "90")
    monkeypatch.setenv("AVATAR_SERVER_LIMITS__MAX_CONCURRENT_RECORDINGS", "3")
    settings = Settings()
    assert settings.limits.max_recording_s == 90 and settings.limits.max_concurrent_recordings == 3
    defaults = Limits()
    assert defaults.max_recording_bytes == 2 * 1024**3 and defaults.min_recording_free_bytes == 1024**3
    assert defaults.max_recordings_per_session == 256 and defaults.max_concurrent_recordings == 8
    assert defaults.max_recording_s == 1800
    with pytest.raises(ValidationError, match="max_recording_bytes"):
        Limits(max_recording_bytes=1000)
