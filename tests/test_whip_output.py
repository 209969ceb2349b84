"""WHIP output (RFC 9725) against a WHIP endpoint run by the test: an aiortc peer behind a small
Starlette handler (POST application/sdp -> 201 + Location + answer; DELETE ends it; Bearer
token checked). The endpoint's peer must receive decodable audio and video from the session
at about 25 fps; a wrong token is refused (401) and reported without the token in any event.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import pytest
import uvicorn
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from avatar_server.webrtc import use_host_addresses
from streaming.fanout import MediaFanout
from streaming.outputs.base import Backoff, OutputState
from streaming.outputs.whip import WhipOutput
from tests.test_rtmp_output import wait_for_state
from tests.test_streaming_session import make_runner

TOKEN = "whip-bearer-Zt8qSECRET"


class WhipEndpoint:
    """A WHIP endpoint: one aiortc receiver per POST; counts the media it receives."""

    def __init__(self) -> None:
        self.peers: dict[str, RTCPeerConnection] = {}
        self.frames: dict[str, int] = {"video": 0, "audio": 0}
        self.video_pts_s: list[float] = []  # media time of each received video frame
        self.first_frame_s: dict[str, float] = {}
        self.shape: tuple | None = None
        self.audio_rms: list[float] = []
        self.deleted: list[str] = []
        self.offers: list[str] = []
        self.posts = 0
        self.tasks: list[asyncio.Task] = []
        self.app = Starlette(
            routes=[
                Route("/whip/endpoint", self.post, methods=["POST"]),
                Route("/whip/resource/{rid}", self.delete, methods=["DELETE"]),
            ]
        )

    async def consume(self, track) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.first_frame_s.setdefault(track.kind, time.monotonic())
            self.frames[track.kind] += 1
            if track.kind == "video":
                self.shape = frame.to_ndarray(format="rgb24").shape
                self.video_pts_s.append(float(frame.pts * frame.time_base))
            else:
                self.audio_rms.append(float(np.sqrt(np.mean(frame.to_ndarray().astype(np.float64) ** 2))))

    async def post(self, request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return Response(status_code=401)
        if request.headers.get("content-type") != "application/sdp":
            return Response(status_code=415)
        offer = (await request.body()).decode()
        self.offers.append(offer)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.on("track", lambda track: self.tasks.append(asyncio.ensure_future(self.consume(track))))
        await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        self.posts += 1
        rid = str(self.posts)
        self.peers[rid] = pc
        return Response(
            pc.localDescription.sdp,
            status_code=201,
            media_type="application/sdp",
            headers={"Location": f"/whip/resource/{rid}"},
        )

    async def delete(self, request: Request) -> Response:
        rid = request.path_params["rid"]
        pc = self.peers.pop(rid, None)
        if pc is None:
            return Response(status_code=404)
        self.deleted.append(rid)
        await pc.close()
        return Response(status_code=200)


@pytest.fixture
async def whip_endpoint():
    use_host_addresses(["127.0.0.1"])
    endpoint = WhipEndpoint()
    server = uvicorn.Server(uvicorn.Config(endpoint.app, host="127.0.0.1", port=0, log_level="warning"))
    task = asyncio.ensure_future(server.serve())
    for _ in range(500):  # 10 s at most
        if server.started:
            break
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    endpoint.url = f"http://127.0.0.1:{port}/whip/endpoint"
    try:
        yield endpoint
    finally:
        for pc in endpoint.peers.values():
            await pc.close()
        server.should_exit = True
        await task
        use_host_addresses(None)


@pytest.mark.slow
async def test_whip_push_carries_audio_and_video(whip_endpoint, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    runner, _engine, _log = await make_runner(playout_target_ms=1000.0)
    runner.start()
    fanout = MediaFanout(runner.video_track(), runner.audio_track())
    fanout.start()
    states: list[OutputState] = []
    output = WhipOutput("w1", whip_endpoint.url, fanout, bearer_token=TOKEN, on_state=states.append)
    output.start()
    try:
        await wait_for_state(states, "live", 30)
        counted = dict(whip_endpoint.frames)
        began = time.monotonic()
        await asyncio.sleep(3.0)
        wall_s = time.monotonic() - began
        received = {k: whip_endpoint.frames[k] - counted[k] for k in counted}
        pts = whip_endpoint.video_pts_s[counted["video"] :]
    finally:
        await output.stop()
        await fanout.close()
        await runner.close()
    assert [s.state for s in states] == ["connecting", "live", "stopped"]
    assert whip_endpoint.deleted == ["1"]  # the resource was DELETEd on stop
    assert "a=sendonly" in whip_endpoint.offers[0]
    assert whip_endpoint.shape == (runner.height, runner.width, 3)
    # Every frame of the 25 fps video arrived (frames per second of media time), and live: about
    # 25 per wall second (generous: a busy machine delivers in bursts); audio 50 chunks/s.
    assert abs((len(pts) - 1) / (pts[-1] - pts[0]) / 25 - 1) < 0.1, (len(pts), pts[0], pts[-1])
    assert 15 < received["video"] / wall_s < 40, received
    assert received["audio"] / wall_s > 40, received
    assert max(whip_endpoint.audio_rms) > 100  # the pattern's clicks came through
    assert TOKEN not in repr(states) + caplog.text


@pytest.mark.slow
async def test_whip_with_a_wrong_token_is_refused_and_the_token_not_shown(whip_endpoint, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    runner, _engine, _log = await make_runner(playout_target_ms=1000.0)
    runner.start()
    fanout = MediaFanout(runner.video_track(), runner.audio_track())
    fanout.start()
    states: list[OutputState] = []
    wrong = TOKEN + "-wrong"
    output = WhipOutput(
        "w1", whip_endpoint.url, fanout, bearer_token=wrong, on_state=states.append,
        backoff=Backoff(initial_s=0.05, max_attempts=1),
    )
    output.start()
    try:
        await wait_for_state(states, "failed", 30)
    finally:
        await output.stop()
        await fanout.close()
        await runner.close()
    assert [s.state for s in states] == ["connecting", "reconnecting", "failed"]
    assert "401" in states[-1].reason and not whip_endpoint.peers
    assert wrong not in repr(states) + caplog.text


@pytest.mark.slow
async def test_whip_reconnects_when_the_endpoint_drops_the_connection(whip_endpoint) -> None:
    runner, _engine, _log = await make_runner(playout_target_ms=1000.0)
    runner.start()
    fanout = MediaFanout(runner.video_track(), runner.audio_track())
    fanout.start()
    states: list[OutputState] = []
    output = WhipOutput(
        "w1", whip_endpoint.url, fanout, bearer_token=TOKEN, on_state=states.append,
        backoff=Backoff(initial_s=0.2, max_s=1.0), report_timeout_s=3.0,
    )
    output.start()
    try:
        live = await wait_for_state(states, "live", 30)
        first = whip_endpoint.peers["1"]
        await first.close()  # the ingest drops the session (e.g. a media server restart)
        reconnecting = await wait_for_state(states, "reconnecting", 30, after=live)
        await wait_for_state(states, "live", 30, after=reconnecting)
        counted = whip_endpoint.frames["video"]
        await asyncio.sleep(1.0)
        flowing = whip_endpoint.frames["video"] - counted
    finally:
        await output.stop()
        await fanout.close()
        await runner.close()
    # told by DTLS (close_notify) or, when that is lost, by the receiver reports stopping
    reason = states[reconnecting].reason
    assert ("closed" in reason or "receiver report" in reason) and states[reconnecting].attempt == 1, reason
    # the first resource was DELETEd when the connection failed, the second on stop
    assert output.connects == 2 and whip_endpoint.deleted == ["1", "2"]
    assert flowing >= 15, flowing  # media flows again on the new connection
