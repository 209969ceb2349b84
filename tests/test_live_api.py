"""Sessions on air over HTTP only: create, speak, record, stream, watch and end a session
with no browser peer, on the real server (``build_app`` + uvicorn, test-pattern engine, api key).

* headless: created, spoken to (chunks, ``final``), recorded and ended over HTTP; the MP4 has
  the speech (frames with the SPEAK background); the events arrive as server-sent events;
* tokens: the session token controls; a viewer token may watch (WHEP) but not speak (403);
* RTMP over the API: ``output.state`` events live -> stopped with the key redacted, the stream
  pulled back from nginx-rtmp is H.264 + AAC;
* WHEP over HTTP: five aiortc viewers and one headless Chromium on ``/watch`` decode at 25 fps.
"""

from __future__ import annotations

import asyncio
import json
import time

import av
import httpx
import numpy as np
import pytest

from avatar_server.app import build_app
from avatar_server.settings import AuthSettings, Settings
from engine.testpattern import TestPatternEngine
from ops.rtmp_server import NginxRtmp, rtmp_server_available
from ops.whep_viewer import Viewer
from tests.browser_support import CHROMIUM, CHROMIUM_ARGS
from tests.test_fanout import SPEAK_SHADE
from tests.test_rtmp_output import pull
from tests.test_server_app import portrait_b64

API_KEY = "test-api-key-0123456789abcdef"
STREAM_KEY = "sk_live_TOPSECRET42"
pytestmark = pytest.mark.slow


@pytest.fixture
async def server(tmp_path):
    settings = Settings(
        engine="testpattern", port=0, api_key=API_KEY, recordings_dir=tmp_path / "recordings", max_sessions=2,
        playout_target_ms=1000.0, auth=AuthSettings(admin_from_loopback=False),
    )
    app = build_app(settings, TestPatternEngine(width=224, height=128))
    await app.start(warm_up=False)
    try:
        yield app
    finally:
        await app.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class EventReader:
    """Reads a session's server-sent events into ``events`` (a background task)."""

    def __init__(self, client: httpx.AsyncClient, url: str, token: str) -> None:
        self.events: list[dict] = []
        self.task = asyncio.ensure_future(self._read(client, url, token))

    async def _read(self, client, url, token) -> None:
        async with client.stream("GET", url, headers=bearer(token), timeout=None) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            kind = None
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    assert data["type"] == kind
                    self.events.append(data)
                    if kind == "session.ended":
                        return

    async def wait_for(self, predicate, timeout_s: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for event in self.events:
                if predicate(event):
                    return event
            await asyncio.sleep(0.05)
        raise AssertionError(f"no such event within {timeout_s} s: {self.events}")


async def create(client: httpx.AsyncClient, media_dir, **extra) -> dict:
    response = await client.post(
        "/v1/sessions", json={"image": portrait_b64(media_dir), "prompt": "A calm person.", **extra},
        headers=bearer(API_KEY),
    )
    assert response.status_code == 201, response.text
    return response.json()


async def test_headless_session_over_http_speaks_records_and_ends(server, media_dir) -> None:
    async with httpx.AsyncClient(base_url=server.url.rstrip("/")) as client:
        # Only the api key (or loopback without a key) creates; bad input names its field.
        assert (await client.post("/v1/sessions", json={"image": "x"}, headers=bearer("nope"))).status_code == 403
        bad = await client.post("/v1/sessions", json={"image": "not base64!"}, headers=bearer(API_KEY))
        assert bad.status_code == 400 and bad.json()["code"] == "image_invalid"
        created = await create(client, media_dir)
        sid, token, viewer = created["session_id"], created["token"], created["viewer_token"]
        assert (created["width"], created["height"], created["fps"]) == (224, 128, 25)
        assert server.sessions_active == 1
        reader = EventReader(client, f"/v1/sessions/{sid}/events", token)
        base = f"/v1/sessions/{sid}"
        # A viewer token may not control the session; no token is 401.
        speak = {"utterance_id": "u1", "text": "Hello there, ", "final": False}
        assert (await client.post(f"{base}/speak", json=speak, headers=bearer(viewer))).status_code == 403
        assert (await client.post(f"{base}/speak", json=speak)).status_code == 401
        assert (await client.post(f"{base}/recording", headers=bearer(viewer))).status_code == 403
        started = await client.post(f"{base}/recording", headers=bearer(token))
        assert started.status_code == 201, started.text
        response = await client.post(f"{base}/speak", json=speak, headers=bearer(token))
        assert response.status_code == 200, response.text
        last = {"utterance_id": "u1", "text": "this session has no browser at all.", "final": True}
        assert (await client.post(f"{base}/speak", json=last, headers=bearer(token))).status_code == 200
        again = await client.post(f"{base}/speak", json=last, headers=bearer(token))
        assert again.status_code == 409 and again.json()["code"] == "utterance_ended"
        ended = await reader.wait_for(lambda e: e["type"] == "speak.ended", 40)
        await reader.wait_for(lambda e: e["type"] == "speak.started")
        await asyncio.sleep(0.3)
        stats = (await client.get(f"{base}/stats", headers=bearer(token))).json()
        stopped = await client.delete(f"{base}/recording", headers=bearer(token))
        assert stopped.status_code == 200, stopped.text
        result = stopped.json()
        deleted = await client.delete(base, headers=bearer(token))
        assert deleted.status_code == 200 and deleted.json()["session_id"] == sid
        await asyncio.wait_for(reader.task, 10)
        assert (await client.delete(base, headers=bearer(API_KEY))).status_code == 404
    assert reader.events[-1]["type"] == "session.ended" and server.sessions_active == 0
    assert stats["frames_pumped"] > 0 and stats["recording"] is True
    # The MP4 has the speech: SPEAK frames for (nearly) all of what speak.ended says was played.
    assert result["error"] is None and result["duration_ms"] > ended["played_ms"]
    with av.open(str(server.settings.recordings_dir / result["path"])) as container:  # a name under recordings_dir
        assert {s.codec_context.name for s in container.streams} == {"h264", "aac"}
        shades = [f.to_ndarray(format="rgb24")[60:100, 150:200].reshape(-1, 3).mean(axis=0)
                  for f in container.decode(video=0)]
    speak_frames = sum(1 for s in shades if np.abs(s - SPEAK_SHADE).max() < 8)
    assert speak_frames >= 0.8 * ended["played_ms"] / 40, (speak_frames, ended)


@pytest.mark.skipif(not rtmp_server_available(), reason="nginx with libnginx-mod-rtmp is not installed (.ci/run)")
async def test_rtmp_output_started_and_stopped_over_http(server, media_dir, tmp_path, caplog) -> None:
    with NginxRtmp(tmp_path / "nginx") as nginx:
        async with httpx.AsyncClient(base_url=server.url.rstrip("/")) as client:
            created = await create(client, media_dir)
            sid, token = created["session_id"], created["token"]
            reader = EventReader(client, f"/v1/sessions/{sid}/events", token)
            await asyncio.sleep(0.2)
            bad = await client.post(f"/v1/sessions/{sid}/outputs", json={"type": "rtmp", "url": "http://x/y/z"},
                                    headers=bearer(token))
            assert bad.status_code == 400 and bad.json()["code"] == "invalid_field"
            response = await client.post(
                f"/v1/sessions/{sid}/outputs", json={"type": "rtmp", "url": nginx.url(STREAM_KEY), "gop_s": 1.0},
                headers=bearer(token),
            )
            assert response.status_code == 201, response.text
            output_id = response.json()["output_id"]
            live = await reader.wait_for(lambda e: e["type"] == "output.state" and e["state"] == "live", 30)
            pulled = await asyncio.to_thread(pull, nginx.url(STREAM_KEY), 2.0)
            listed = (await client.get(f"/v1/sessions/{sid}/outputs", headers=bearer(token))).json()
            metrics = (await client.get("/metrics", headers=bearer(API_KEY))).text
            removed = await client.delete(f"/v1/sessions/{sid}/outputs/{output_id}", headers=bearer(token))
            assert removed.status_code == 200 and removed.json()["state"] == "stopped"
            await reader.wait_for(lambda e: e["type"] == "output.state" and e["state"] == "stopped")
            assert (await client.delete(f"/v1/sessions/{sid}", headers=bearer(API_KEY))).status_code == 200
            await asyncio.wait_for(reader.task, 10)
    assert pulled["codecs"] == {"video": "h264", "audio": "aac"} and len(pulled["video"]) >= 40
    assert live["output_id"] == output_id and live["url"].endswith("/live/***") and live["output_type"] == "rtmp"
    assert "avatar_server_live_outputs_live 1.0" in metrics and "avatar_server_live_outputs_active 1.0" in metrics
    everything = json.dumps(reader.events) + json.dumps(listed) + removed.text + metrics + caplog.text
    assert STREAM_KEY not in everything


async def test_whep_viewers_over_http_and_the_watch_page(server, media_dir) -> None:
    from playwright.async_api import async_playwright

    async with httpx.AsyncClient(base_url=server.url.rstrip("/")) as client:
        created = await create(client, media_dir)
        sid, token, viewer_token = created["session_id"], created["token"], created["viewer_token"]
        whep = f"/v1/sessions/{sid}/whep"
        viewers = [Viewer() for _ in range(5)]
        locations = []
        try:
            wrong = await client.post(whep, content=await Viewer().offer(), headers=bearer(viewer_token))
            assert wrong.status_code == 415
            for viewer in viewers:
                response = await client.post(
                    whep, content=await viewer.offer(),
                    headers={**bearer(viewer_token), "Content-Type": "application/sdp"},
                )
                assert response.status_code == 201, response.text
                assert response.headers["content-type"].startswith("application/sdp")
                locations.append(response.headers["location"])
                await viewer.answer(response.text)
            async with async_playwright() as p:
                browser = await p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
                page = await browser.new_page()
                await page.goto(f"{server.url}watch?session={sid}&token={viewer_token}")
                deadline = time.monotonic() + 40
                while True:
                    page_stats = await page.evaluate("window.watchStats")
                    if page_stats["framesDecoded"] > 50 or page_stats["error"] or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.5)
                began = time.monotonic()
                first = await page.evaluate("window.watchStats.framesDecoded")
                await asyncio.sleep(3.0)
                page_stats = await page.evaluate("window.watchStats")
                ended = time.monotonic()
                await page.click("#leave")
                await asyncio.sleep(0.5)
                await browser.close()
            rates = [v.media_rate(began, ended) for v in viewers]  # every frame decoded: 25 per media second
            wall_rates = [v.rate("video", began, ended) for v in viewers]  # and live: frames keep coming
            left = await client.delete(locations[0], headers=bearer(viewer_token))
            assert left.status_code == 200
            assert (await client.delete(locations[0], headers=bearer(viewer_token))).status_code == 404
            stats = (await client.get(f"/v1/sessions/{sid}/stats", headers=bearer(token))).json()
        finally:
            for viewer in viewers:
                await viewer.close()
    page_fps = (page_stats["framesDecoded"] - first) / (ended - began)
    print(f"\naiortc viewers fps {[round(r, 1) for r in rates]}; chromium {page_fps:.1f} fps ({page_stats['codec']})")
    assert page_stats["error"] is None and page_stats["state"] == "connected"
    assert all(abs(r / 25 - 1) < 0.1 for r in rates), rates
    assert all(r > 15 for r in wall_rates), wall_rates
    assert abs(page_fps / 25 - 1) < 0.1, page_stats
    assert page_stats["audioPackets"] > 0
    assert stats["viewers"] == 4 and stats["viewers_total"] == 6  # the page left, one viewer DELETEd


async def test_a_headless_session_ends_at_its_max_duration(tmp_path, media_dir) -> None:
    settings = Settings(
        engine="testpattern", port=0, api_key=API_KEY, recordings_dir=tmp_path / "recordings",
        session_max_duration_s=2.0, auth=AuthSettings(admin_from_loopback=False),
    )
    app = build_app(settings, TestPatternEngine(width=224, height=128))
    await app.start(warm_up=False)
    try:
        async with httpx.AsyncClient(base_url=app.url.rstrip("/")) as client:
            began = time.monotonic()
            created = await create(client, media_dir)
            reader = EventReader(client, f"/v1/sessions/{created['session_id']}/events", created["token"])
            await asyncio.wait_for(reader.task, 15)
            lasted_s = time.monotonic() - began
    finally:
        await app.close()
    assert reader.events[-1]["type"] == "session.ended" and app.sessions_active == 0
    assert 2.0 <= lasted_s < 6.0, lasted_s


@pytest.mark.skipif(not rtmp_server_available(), reason="nginx with libnginx-mod-rtmp is not installed (.ci/run)")
async def test_outputs_over_the_websocket_control_channel(server, media_dir, tmp_path, caplog) -> None:
    from websockets.asyncio.client import connect

    with NginxRtmp(tmp_path / "nginx") as nginx:
        async with httpx.AsyncClient(base_url=server.url.rstrip("/")) as client:
            minted = (await client.post("/v1/tokens", json={}, headers=bearer(API_KEY))).json()
        ws_url = server.url.replace("http", "ws", 1) + f"ws?token={minted['token']}"
        async with connect(ws_url, max_size=None) as ws:

            async def reply(predicate, timeout_s: float = 30.0) -> dict:
                async with asyncio.timeout(timeout_s):
                    while True:
                        message = json.loads(await ws.recv())
                        if predicate(message):
                            return message

            await ws.send(json.dumps({"type": "output.stop", "output_id": "out1"}))
            assert (await reply(lambda m: m["type"] == "error"))["code"] == "no_session"
            await ws.send(json.dumps({"type": "session.start", "image": portrait_b64(media_dir)}))
            await reply(lambda m: m["type"] == "session.ready")
            # No WebRTC peer at all: the outputs' pump plays the session on the server's clock.
            start = {"type": "output.start", "output": {"type": "rtmp", "url": nginx.url(STREAM_KEY), "gop_s": 1}}
            await ws.send(json.dumps(start))
            started = await reply(lambda m: m["type"] == "output.started")
            live = await reply(lambda m: m["type"] == "output.state" and m["state"] == "live")
            pulled = await asyncio.to_thread(pull, nginx.url(STREAM_KEY), 2.0)
            await ws.send(json.dumps({"type": "output.stop", "output_id": started["output_id"]}))
            stopped = await reply(lambda m: m["type"] == "output.state" and m["state"] == "stopped")
            await ws.send(json.dumps({"type": "output.stop", "output_id": started["output_id"]}))
            unknown = await reply(lambda m: m["type"] == "error")
            await ws.send(json.dumps({"type": "output.start", "output": {"type": "rtmp", "url": "ftp://x/y/z"}}))
            invalid = await reply(lambda m: m["type"] == "error")
    assert started["output_type"] == "rtmp" and started["url"].endswith("/live/***")
    assert live["output_id"] == stopped["output_id"] == started["output_id"]
    assert pulled["codecs"] == {"video": "h264", "audio": "aac"} and len(pulled["video"]) >= 40
    assert unknown["code"] == "unknown_output" and invalid["code"] == "invalid_field"
    assert STREAM_KEY not in json.dumps([started, live, stopped]) + caplog.text
