"""The server without WebRTC: HTTP routes on the WebSocket port, bad input over /ws, capacity."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import urllib.error
import urllib.request

import pytest
from PIL import Image
from websockets.asyncio.client import connect

from avatar_server.server import build_app
from avatar_server.settings import Settings
from engine.api import TESTPATTERN_NOTICE
from engine.testpattern import TestPatternEngine


@pytest.fixture
async def app():
    settings = Settings(engine="testpattern", port=0, max_sessions=2, limits={"max_text_chars": 100})
    server = build_app(settings, TestPatternEngine())
    await server.start()
    yield server
    await server.close()


def http_get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


async def get(app, path: str) -> tuple[int, str, bytes]:
    return await asyncio.to_thread(http_get, f"http://127.0.0.1:{app.port}{path}")


async def recv_json(ws, timeout_s: float = 10.0, skip=("stats", "state")) -> dict:
    async with asyncio.timeout(timeout_s):
        while True:
            message = json.loads(await ws.recv())
            if message["type"] not in skip:
                return message


def portrait_b64(media_dir) -> str:
    return base64.b64encode((media_dir / "portrait.png").read_bytes()).decode()


async def test_http_routes(app) -> None:
    status, ctype, body = await get(app, "/")
    assert status == 200 and ctype.startswith("text/html") and b"<video" in body
    status, ctype, body = await get(app, "/app.js")
    assert status == 200 and "javascript" in ctype and b"RTCPeerConnection" in body
    assert (await get(app, "/style.css"))[0] == 200
    assert await get(app, "/healthz") == (200, "text/plain; charset=utf-8", b"ok\n")
    for _ in range(100):  # warm-up runs in the background
        status, _, body = await get(app, "/readyz")
        if status == 200:
            break
        await asyncio.sleep(0.1)
    assert (status, body) == (200, b"ready\n")
    status, ctype, body = await get(app, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    for name in (
        "avatar_server_sessions_active",
        "avatar_server_segments_generated_total",
        "avatar_server_segment_generation_seconds",
        "avatar_server_segment_real_time_factor_ratio",
        "avatar_server_video_frames_sent_total",
        "avatar_server_playout_underruns_total",
        "avatar_server_time_to_first_frame_seconds",
    ):
        assert name.encode() in body, name
    assert (await get(app, "/../etc/passwd"))[0] == 404
    assert (await get(app, "/nope"))[0] == 404


async def test_bad_input_gets_error_frames_and_the_connection_still_serves(app, media_dir) -> None:
    async with connect(f"ws://127.0.0.1:{app.port}/ws", max_size=None) as ws:
        cases = [
            ('{"type": "dance"}', "unknown_type"),
            ("{oops", "bad_json"),
            ('{"type": "speak", "utterance_id": "u1", "text": "hi"}', "no_session"),
            ('{"type": "webrtc.offer", "sdp": "v=0"}', "no_session"),
            ('{"type": "interrupt"}', "no_session"),
            (json.dumps({"type": "session.start", "image": base64.b64encode(b"hello").decode()}), "image_invalid"),
            (json.dumps({"type": "session.start", "image": "A" * (12 * 1024 * 1024)}), "image_too_large"),
        ]
        for raw, code in cases:
            await ws.send(raw)
            reply = await recv_json(ws)
            assert reply["type"] == "error" and reply["code"] == code, (raw[:60], reply)
        # pixel limit, decoded from the header of a small PNG
        big = io.BytesIO()
        Image.new("1", (5000, 4000)).save(big, format="PNG")
        await ws.send(json.dumps({"type": "session.start", "image": base64.b64encode(big.getvalue()).decode()}))
        reply = await recv_json(ws)
        assert reply["code"] == "image_too_large" and "max_image_pixels" in reply["message"]

        await ws.send(json.dumps({"type": "session.start", "image": portrait_b64(media_dir), "prompt": "A man."}))
        ready = await recv_json(ws)
        assert ready["type"] == "session.ready"
        assert (ready["width"], ready["height"], ready["fps"], ready["sample_rate"]) == (224, 128, 25, 48_000)
        assert ready["notice"] == TESTPATTERN_NOTICE  # what the picture is, for the page to say

        await ws.send(json.dumps({"type": "speak", "utterance_id": "u1", "text": "x" * 101}))
        reply = await recv_json(ws)
        assert reply["code"] == "text_too_long" and "max_text_chars = 100" in reply["message"]
        await ws.send(json.dumps({"type": "session.start", "image": portrait_b64(media_dir)}))
        assert (await recv_json(ws))["code"] == "session_exists"
        await ws.send(json.dumps({"type": "speak.end", "utterance_id": "never"}))
        assert (await recv_json(ws))["code"] == "unknown_utterance"
        await ws.send(json.dumps({"type": "webrtc.offer", "sdp": "this is not sdp"}))
        assert (await recv_json(ws))["code"] == "bad_sdp"
        await ws.send(json.dumps({"type": "interrupt"}))
        reply = await recv_json(ws)
        assert reply == {"type": "interrupted", "utterance_id": None, "played_ms": 0}
        # stats arrive periodically once a session runs
        stats = await recv_json(ws, skip=("state",))
        assert stats["type"] == "stats" and stats["buffer_ms"] >= 0
    assert app.sessions_active == 0 or await _eventually(lambda: app.sessions_active == 0)


async def _eventually(predicate, timeout_s: float = 5.0) -> bool:
    for _ in range(int(timeout_s / 0.05)):
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


async def test_capacity_is_enforced_and_readyz_reports_it(app, media_dir) -> None:
    image = portrait_b64(media_dir)
    url = f"ws://127.0.0.1:{app.port}/ws"
    async with connect(url, max_size=None) as a, connect(url, max_size=None) as b, connect(url, max_size=None) as c:
        for ws in (a, b):
            await ws.send(json.dumps({"type": "session.start", "image": image}))
            assert (await recv_json(ws))["type"] == "session.ready"
        status, _, body = await get(app, "/readyz")
        assert status == 503 and b"max_sessions = 2" in body
        await c.send(json.dumps({"type": "session.start", "image": image}))
        reply = await recv_json(c)
        assert reply["code"] == "capacity" and "max_sessions = 2" in reply["message"]
    assert await _eventually(lambda: app.sessions_active == 0)
    assert (await get(app, "/readyz"))[0] == 200


async def test_stats_confirm_a_session_update(app, media_dir) -> None:
    """``session.update`` has no reply of its own: the next ``stats`` carry the new mode and barge-in."""
    async with connect(f"ws://127.0.0.1:{app.port}/ws") as ws:
        await ws.send(json.dumps({"type": "session.start", "image": portrait_b64(media_dir)}))
        assert (await recv_json(ws))["type"] == "session.ready"
        first = await recv_json(ws, skip=("state",))
        assert first["type"] == "stats" and (first["mode"], first["barge_in"]) == ("lipsync", False), first
        await ws.send(json.dumps({"type": "session.update", "mode": "conversation", "barge_in": True}))
        async with asyncio.timeout(10):
            while True:
                stats = await recv_json(ws, skip=("state",))
                if stats["type"] == "stats" and stats["mode"] == "conversation":
                    break
        assert stats["barge_in"] is True, stats

