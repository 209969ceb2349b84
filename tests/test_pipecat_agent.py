"""The example agent (``clients/examples/pipecat_agent.py``): what of it runs here.

* its configuration: required ``AGENT_*`` variables are named when missing or bad, the STT
  defaults to the LLM's base URL and key, keys stay out of the repr;
* its web app end to end without a model service: ``GET /`` serves the page; a headless
  aiortc peer posts an offer to ``POST /api/offer`` (Pipecat's request handler), gets an
  answer, and the example's whole pipeline (transport, STT, aggregators, LLM, our avatar
  service) starts: the avatar session opens on a real ``avatar-server serve --engine
  testpattern`` and its video reaches the peer through the example's transport at 25 fps
  (22.5-27.5). The peer's microphone stays silent, so the STT and LLM (pointed at a closed
  port) are never called.

Skipped when Pipecat is not installed (``pip install -e ".[pipecat]"``).
"""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("pipecat", reason='Pipecat is not installed: pip install -e ".[pipecat]"')

import httpx  # noqa: E402
from aiortc import RTCPeerConnection, RTCSessionDescription  # noqa: E402

from avatar_server.webrtc import use_host_addresses  # noqa: E402
from clients.examples.pipecat_agent import AgentConfig, ConfigError, create_app  # noqa: E402
from clients.media import PushAudioTrack  # noqa: E402
from tests.browser_support import server_process  # noqa: E402
from tests.pipecat_support import Viewer, wait_until  # noqa: E402


def env(media_dir, **extra: str) -> dict[str, str]:
    return {
        "AGENT_AVATAR_IMAGE": str(media_dir / "portrait.png"),
        "AGENT_LLM_BASE_URL": "http://127.0.0.1:9/v1",
        "AGENT_LLM_MODEL": "local-model",
        **extra,
    }


def test_config_names_what_is_missing_or_bad(media_dir) -> None:
    config = AgentConfig.from_env(env(media_dir, AGENT_LLM_API_KEY="sk-secret"))
    assert (config.stt_base_url, config.stt_api_key, config.stt_model) == (
        "http://127.0.0.1:9/v1",
        "sk-secret",
        "whisper-1",
    )
    assert config.avatar_url == "http://127.0.0.1:8080/" and config.ice_hosts is None
    assert "sk-secret" not in repr(config)
    assert AgentConfig.from_env(env(media_dir, AGENT_ICE_HOSTS="10.0.0.2, 127.0.0.1")).ice_hosts == (
        "10.0.0.2",
        "127.0.0.1",
    )
    for name in ("AGENT_AVATAR_IMAGE", "AGENT_LLM_BASE_URL", "AGENT_LLM_MODEL"):
        with pytest.raises(ConfigError, match=f"^{name}: required"):
            AgentConfig.from_env({k: v for k, v in env(media_dir).items() if k != name})
    with pytest.raises(ConfigError, match="^AGENT_AVATAR_IMAGE: .*nope.png: no such file"):
        AgentConfig.from_env(env(media_dir, AGENT_AVATAR_IMAGE="nope.png"))
    with pytest.raises(ConfigError, match="^AGENT_WIDTH: need a positive even number"):
        AgentConfig.from_env(env(media_dir, AGENT_WIDTH="225"))


@pytest.mark.slow
async def test_the_example_app_serves_the_avatar_to_a_webrtc_peer(media_dir, tmp_path) -> None:
    with server_process(tmp_path) as (url, log_path):
        app = create_app(AgentConfig.from_env(env(media_dir, AGENT_AVATAR_URL=url)))
        use_host_addresses(["127.0.0.1"])
        viewer = Viewer(RTCPeerConnection())
        microphone = PushAudioTrack()  # silence: the user says nothing
        viewer.pc.addTransceiver(microphone, direction="sendrecv")
        viewer.pc.addTransceiver("video", direction="recvonly")

        @viewer.pc.on("track")
        def on_track(track) -> None:
            viewer.tasks.append(asyncio.get_running_loop().create_task(viewer.consume(track)))

        await viewer.pc.setLocalDescription(await viewer.pc.createOffer())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://agent") as http:
            page = await http.get("/")
            assert page.status_code == 200 and "/api/offer" in page.text
            reply = await http.post(
                "/api/offer", json={"sdp": viewer.pc.localDescription.sdp, "type": "offer"}
            )
            assert reply.status_code == 200, reply.text
            answer = reply.json()
        try:
            await viewer.pc.setRemoteDescription(
                RTCSessionDescription(sdp=answer["sdp"], type=answer["type"])
            )
            await wait_until(lambda: len(viewer.video) > 10, 40, "the avatar's video at the peer")
            start_s, start_count = time.monotonic(), len(viewer.video)
            await asyncio.sleep(3.0)
            fps = (len(viewer.video) - start_count) / (time.monotonic() - start_s)
        finally:
            await viewer.pc.close()
            microphone.stop()
            for task in [*viewer.tasks, *app.state.runs]:
                task.cancel()
            await asyncio.gather(*viewer.tasks, *app.state.runs, return_exceptions=True)
    sizes = {(v.width, v.height) for v in viewer.video}
    print(f"\nexample app: {len(viewer.video)} video frames, {fps:.2f} fps over 3 s, sizes {sizes}")
    assert 22.5 <= fps <= 27.5
    assert sizes == {(224, 128)}
