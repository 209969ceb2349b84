"""RTMP output against a real RTMP server (nginx + libnginx-mod-rtmp started by the test).

The session (test-pattern engine, no peer) is pushed through MediaFanout -> RtmpOutput, then
pulled back from nginx with PyAV: H.264 + AAC, 25 fps (+-10 %) from the pulled timestamps,
the duration pulled, and the A/V offset of the pulled stream from the pattern's flash (video)
and click (audio) markers within +-40 ms. Killing nginx mid-stream and starting it again on
the same port: the output goes reconnecting -> live, and the session's pump never stalls.
Stream keys appear in no event, stats or log line. Redaction helpers are checked on their own.
"""

from __future__ import annotations

import asyncio
import logging
import time

import av
import numpy as np
import pytest

from ops.rtmp_server import NginxRtmp, free_port, rtmp_server_available, rtmps_server_available
from streaming.fanout import MediaFanout
from streaming.outputs.base import Backoff, OutputState, redact_text, redact_url, url_secrets
from streaming.outputs.rtmp import EncoderSettings, RtmpOutput
from tests.test_streaming_session import make_runner
from tests.test_tls import certificate  # noqa: F401 - a module fixture: a self-signed localhost certificate

needs_rtmp = pytest.mark.skipif(
    not rtmp_server_available(), reason="nginx with libnginx-mod-rtmp is not installed (.ci/run installs it)"
)
KEY = "live_8d3Kq9SECRETkey"


def test_redact_url_hides_keys_credentials_and_queries() -> None:
    assert redact_url("rtmp://a.example/live2/abc123") == "rtmp://a.example/live2/***"
    assert redact_url("rtmps://a.example:443/app/k1/k2?token=zz") == "rtmps://a.example:443/app/***?***"
    assert redact_url("rtmp://a.example/app") == "rtmp://a.example/app"
    assert redact_url("https://user:pw@cdn.example/whip/ep?tok=abc#x") == "https://***@cdn.example/whip/ep?***#***"
    assert redact_url("https://cdn.example/whip") == "https://cdn.example/whip"
    assert url_secrets("rtmp://h/app/key1/key2") == ["key1/key2", "key1", "key2"]
    assert url_secrets("rtmp://h/app/streamkey") == ["streamkey"]
    text = "Error: rtmp://h/app/streamkey refused; Authorization: Bearer tok.abc.def"
    assert redact_text(text, url_secrets("rtmp://h/app/streamkey")) == (
        "Error: rtmp://h/app/*** refused; Authorization: Bearer ***"
    )
    with pytest.raises(ValueError, match="url: scheme 'http' is not rtmp or rtmps") as info:
        RtmpOutput("o", "http://h/app/streamkey", encoder=EncoderSettings(448, 256))
    assert "streamkey" not in str(info.value)
    with pytest.raises(ValueError, match="gop_frames"):
        EncoderSettings(448, 256, gop_frames=0)


def pull(url: str, media_s: float, timeout_s: float = 20.0) -> dict:
    """Read ``media_s`` seconds of video (by pts) from ``url``: codecs, video ``[(pts_s, luma)]``,
    audio samples (mono float32, 48 kHz) and the pts of the first audio sample."""
    video: list[tuple[float, float]] = []
    audio: list[np.ndarray] = []
    audio_start_s = None
    began = time.monotonic()
    with av.open(url, timeout=5) as container:
        codecs = {s.type: s.codec_context.name for s in container.streams}
        for packet in container.demux():
            if time.monotonic() - began > timeout_s:
                break
            for frame in packet.decode():
                if frame.pts is None:
                    continue
                pts_s = float(frame.pts * frame.time_base)
                if packet.stream.type == "video":
                    video.append((pts_s, float(frame.to_ndarray(format="gray").mean())))
                elif video:  # audio from the first video frame on
                    if audio_start_s is None:
                        audio_start_s = pts_s
                    audio.append(frame.to_ndarray().mean(axis=0).astype(np.float32))
            if video and video[-1][0] - video[0][0] >= media_s:
                break
    return {
        "codecs": codecs,
        "video": video,
        "audio": np.concatenate(audio) if audio else np.zeros(0, np.float32),
        "audio_start_s": audio_start_s,
        "sample_rate": 48_000,
    }


def av_offsets_ms(pulled: dict) -> list[float]:
    """Click onset minus flash time for every flash (ms), on the pulled timestamps."""
    video = pulled["video"]
    flashes = [pts for i, (pts, luma) in enumerate(video) if luma > 128 and i > 0 and video[i - 1][1] <= 128]
    audio = pulled["audio"]
    loud = np.flatnonzero(np.abs(audio) > 0.3)
    onsets = ([loud[0]] + [b for a, b in zip(loud[:-1], loud[1:], strict=True) if b - a > 4_800]) if loud.size else []
    clicks = [pulled["audio_start_s"] + i / 48_000 for i in onsets]
    assert len(flashes) >= 3 and len(clicks) >= 3, (flashes, clicks)
    return [1000 * (min(clicks, key=lambda c, f=f: abs(c - f)) - f) for f in flashes]


async def wait_for_state(states: list[OutputState], state: str, timeout_s: float, after: int = 0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for i, event in enumerate(states[after:], after):
            if event.state == state:
                return i
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {state!r} within {timeout_s} s: {states}")


@needs_rtmp
@pytest.mark.slow
async def test_rtmp_push_is_pulled_back_with_h264_aac_at_25_fps_in_sync(tmp_path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    runner, _engine, _log = await make_runner(playout_target_ms=1000.0)
    runner.start()
    fanout = MediaFanout(runner.video_track(), runner.audio_track())
    states: list[OutputState] = []
    with NginxRtmp(tmp_path / "nginx") as nginx:
        output = RtmpOutput(
            "out1", nginx.url(KEY), encoder=EncoderSettings(runner.width, runner.height, gop_frames=25),
            on_state=states.append,
        )
        fanout.add_sink(output)
        fanout.start()
        output.start()
        try:
            await wait_for_state(states, "live", 20)
            pulled = await asyncio.to_thread(pull, nginx.url(KEY), 4.0)
            stats = output.stats()
        finally:
            await output.stop()
            await fanout.close()
            await runner.close()
    assert [s.state for s in states][:2] == ["connecting", "live"] and states[-1].state == "stopped"
    assert pulled["codecs"] == {"video": "h264", "audio": "aac"}
    video = pulled["video"]
    span_s = video[-1][0] - video[0][0]
    assert span_s >= 4.0 - 0.04
    assert abs((len(video) - 1) / span_s / 25 - 1) < 0.1, (len(video), span_s)
    audio_s = pulled["audio"].size / 48_000
    assert abs(audio_s - span_s) < 0.3, (audio_s, span_s)
    offsets = av_offsets_ms(pulled)
    print(f"\npulled {len(video)} frames over {span_s:.2f} s; click - flash {offsets} ms")
    assert all(abs(ms) <= 40 for ms in offsets), offsets
    # The key is in no event, stats or log line.
    everything = repr(states) + repr(stats) + caplog.text
    assert KEY not in everything and "live/***" in states[0].url


@needs_rtmp
@pytest.mark.slow
async def test_rtmp_reconnects_when_the_server_restarts_and_the_session_never_stalls(tmp_path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    runner, _engine, _log = await make_runner(playout_target_ms=1000.0)
    runner.start()
    fanout = MediaFanout(runner.video_track(), runner.audio_track())
    states: list[OutputState] = []
    nginx = NginxRtmp(tmp_path / "nginx")
    nginx.start()
    output = RtmpOutput(
        "out1", nginx.url(KEY), encoder=EncoderSettings(runner.width, runner.height, gop_frames=25),
        on_state=states.append, backoff=Backoff(initial_s=0.2, max_s=1.0),
        rw_timeout_s=2.0,
    )
    fanout.add_sink(output)
    fanout.start()
    output.start()
    try:
        live = await wait_for_state(states, "live", 20)
        began_s, pumped = time.monotonic(), fanout.frames_pumped["video"]
        await asyncio.sleep(1.0)
        nginx.stop()  # killed mid-stream
        reconnecting = await wait_for_state(states, "reconnecting", 15, after=live)
        await asyncio.sleep(1.0)
        nginx.start()
        await wait_for_state(states, "live", 20, after=reconnecting)
        pulled = await asyncio.to_thread(pull, nginx.url(KEY), 2.0)
        wall_s = time.monotonic() - began_s
        rate = (fanout.frames_pumped["video"] - pumped) / wall_s
    finally:
        await output.stop()
        await fanout.close()
        await runner.close()
        nginx.stop()
    assert states[reconnecting].reason and KEY not in states[reconnecting].reason
    assert output.connects >= 2
    assert pulled["codecs"] == {"video": "h264", "audio": "aac"} and len(pulled["video"]) >= 40
    # The pump ran in real time through the outage: the session never stalled.
    assert abs(rate / 25 - 1) < 0.1, rate
    assert KEY not in repr(states) + caplog.text


@pytest.mark.slow
async def test_rtmp_gives_up_after_its_attempts_with_the_reason(caplog) -> None:
    caplog.set_level(logging.DEBUG)
    states: list[OutputState] = []
    url = f"rtmp://127.0.0.1:{free_port()}/live/{KEY}"  # nobody listens
    output = RtmpOutput(
        "out1", url, encoder=EncoderSettings(448, 256), on_state=states.append,
        backoff=Backoff(initial_s=0.05, max_s=0.1, max_attempts=2), open_timeout_s=2.0,
    )
    output.start()
    try:
        await wait_for_state(states, "failed", 30)
    finally:
        await output.stop()
    assert [s.state for s in states] == ["connecting", "reconnecting", "reconnecting", "failed"]
    assert [s.attempt for s in states] == [0, 1, 2, 3]
    assert "after 2 attempts" in states[-1].reason and output.state == "failed"
    assert KEY not in repr(states) + caplog.text


@pytest.mark.skipif(
    not rtmps_server_available(), reason="nginx with libnginx-mod-rtmp and libnginx-mod-stream is not installed (.ci/run)"
)
@pytest.mark.slow
async def test_rtmps_push_through_tls_is_pulled_back(tmp_path, certificate) -> None:  # noqa: F811
    """RTMPS: the output speaks TLS (FFmpeg's tls protocol) to nginx's stream module, which
    terminates it in front of nginx-rtmp; the plain RTMP side gets H.264 + AAC."""
    cert, key = certificate
    runner, _engine, _log = await make_runner(playout_target_ms=1000.0)
    runner.start()
    fanout = MediaFanout(runner.video_track(), runner.audio_track())
    states: list[OutputState] = []
    with NginxRtmp(tmp_path / "nginx", tls_cert=cert, tls_key=key) as nginx:
        output = RtmpOutput(
            "out1", nginx.tls_url(KEY), encoder=EncoderSettings(runner.width, runner.height, gop_frames=25),
            on_state=states.append,
        )
        fanout.add_sink(output)
        fanout.start()
        output.start()
        try:
            await wait_for_state(states, "live", 20)
            pulled = await asyncio.to_thread(pull, nginx.url(KEY), 2.0)
        finally:
            await output.stop()
            await fanout.close()
            await runner.close()
    assert states[1].url == f"rtmps://127.0.0.1:{nginx.tls_port}/live/***"
    assert pulled["codecs"] == {"video": "h264", "audio": "aac"} and len(pulled["video"]) >= 40
