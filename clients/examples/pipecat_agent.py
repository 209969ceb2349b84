"""A voice agent with our avatar as its voice and face, on Pipecat.

    browser microphone -> Pipecat's SmallWebRTC transport -> speech-to-text -> LLM
    -> AvatarService (speech mode: the model speaks the LLM's words) -> the browser

Speech-to-text and the LLM are OpenAI-compatible services chosen by environment, so a local
model server (vLLM, llama.cpp, Ollama, a Whisper server, ...) works through its base URL:

=============================  =======================================================
``AGENT_AVATAR_URL``           the avatar server, default ``http://127.0.0.1:8080/``
``AGENT_AVATAR_IMAGE``         reference image file (required)
``AGENT_AVATAR_PROMPT``        appearance text (default: none)
``AGENT_AVATAR_TOKEN``         session token, for an avatar server with an api key
``AGENT_LANGUAGE``             language of the answers, e.g. ``English`` (default)
``AGENT_LLM_BASE_URL``         OpenAI-compatible chat completions, e.g. ``http://127.0.0.1:8000/v1``
``AGENT_LLM_MODEL``            model name there (required)
``AGENT_LLM_API_KEY``          its key (default: ``none``, for local servers)
``AGENT_STT_BASE_URL``         OpenAI-compatible transcriptions (default: the LLM's base URL)
``AGENT_STT_MODEL``            model name there (default ``whisper-1``)
``AGENT_STT_API_KEY``          its key (default: the LLM's key)
``AGENT_SYSTEM_PROMPT``        the LLM's instructions (default: short spoken answers)
``AGENT_WIDTH``/``AGENT_HEIGHT``  video size sent to the browser (default 224x128, the
                               test pattern's; the avatar's frames are scaled to it)
``AGENT_ICE_HOSTS``            comma-separated ICE host addresses (default: 127.0.0.1 when the
                               avatar server is on loopback, else aioice's own discovery;
                               process-wide, so name the browser-facing address too)
=============================  =======================================================

Run: ``python -m clients.examples.pipecat_agent --port 7860`` and open the page. Keys are
never logged. The page (``GET /``) sends its microphone and shows what comes back; its offer
goes to ``POST /api/offer`` (Pipecat's ``SmallWebRTCRequestHandler``); each peer connection
runs one pipeline. ICE uses the host's own addresses (no STUN): browser, agent and avatar
server on one network.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You are a friendly assistant in a video call. Your answers are spoken aloud by an avatar: "
    "answer in one to three short sentences of plain speech, without lists, markdown or emoji."
)

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Avatar agent</title>
<style>body{font-family:sans-serif;margin:2rem}video{width:448px;background:#000}</style></head>
<body><h1>Avatar agent</h1>
<p><button id="start">Start</button> <button id="stop" disabled>Stop</button> <span id="status"></span></p>
<video id="video" autoplay playsinline></video>
<script>
let pc = null;
const status = (text) => { document.getElementById("status").textContent = text; };
document.getElementById("start").onclick = async () => {
  pc = new RTCPeerConnection();
  const mic = await navigator.mediaDevices.getUserMedia({audio: true});
  pc.addTransceiver(mic.getAudioTracks()[0], {direction: "sendrecv"});
  pc.addTransceiver("video", {direction: "recvonly"});
  const stream = new MediaStream();
  pc.ontrack = (event) => { stream.addTrack(event.track); document.getElementById("video").srcObject = stream; };
  pc.onconnectionstatechange = () => status(pc.connectionState);
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((resolve) => {  // no trickle ICE: the candidates go in the offer
    if (pc.iceGatheringState === "complete") return resolve();
    pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && resolve();
  });
  const response = await fetch("/api/offer", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({sdp: pc.localDescription.sdp, type: pc.localDescription.type})});
  if (!response.ok) { status("offer refused: " + await response.text()); return; }
  await pc.setRemoteDescription(await response.json());
  document.getElementById("start").disabled = true; document.getElementById("stop").disabled = false;
};
document.getElementById("stop").onclick = () => {
  if (pc) pc.close(); pc = null; status("stopped");
  document.getElementById("start").disabled = false; document.getElementById("stop").disabled = true;
};
</script></body></html>
"""


class ConfigError(ValueError):
    """A missing or bad ``AGENT_*`` variable; the message names it."""


@dataclass(frozen=True)
class AgentConfig:
    """The example's settings (see the module docstring for the variables)."""

    avatar_url: str
    avatar_image: Path
    llm_base_url: str
    llm_model: str
    avatar_prompt: str = ""
    avatar_token: str | None = field(default=None, repr=False)
    language: str = "English"
    llm_api_key: str = field(default="none", repr=False)
    stt_base_url: str = ""
    stt_model: str = "whisper-1"
    stt_api_key: str = field(default="none", repr=False)
    system_prompt: str = SYSTEM_PROMPT
    width: int = 224
    height: int = 128
    ice_hosts: tuple[str, ...] | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AgentConfig:
        """Read the ``AGENT_*`` variables of ``env`` (default ``os.environ``).

        Raises:
            ConfigError: a required variable is missing, the image file does not exist, or a
                size is not a positive integer (the message names the variable).
        """
        env = os.environ if env is None else env

        def required(name: str) -> str:
            value = env.get(name, "").strip()
            if not value:
                raise ConfigError(f"{name}: required (see clients/examples/pipecat_agent.py)")
            return value

        def size(name: str, default: int) -> int:
            raw = env.get(name, str(default))
            if not raw.isdigit() or int(raw) <= 0 or int(raw) % 2:
                raise ConfigError(f"{name}: need a positive even number of pixels, got {raw!r}")
            return int(raw)

        image = Path(required("AGENT_AVATAR_IMAGE"))
        if not image.is_file():
            raise ConfigError(f"AGENT_AVATAR_IMAGE: {image}: no such file")
        llm_base_url = required("AGENT_LLM_BASE_URL")
        llm_api_key = env.get("AGENT_LLM_API_KEY") or "none"
        return cls(
            avatar_url=env.get("AGENT_AVATAR_URL") or "http://127.0.0.1:8080/",
            avatar_image=image,
            avatar_prompt=env.get("AGENT_AVATAR_PROMPT", ""),
            avatar_token=env.get("AGENT_AVATAR_TOKEN") or None,
            language=env.get("AGENT_LANGUAGE") or "English",
            llm_base_url=llm_base_url,
            llm_model=required("AGENT_LLM_MODEL"),
            llm_api_key=llm_api_key,
            stt_base_url=env.get("AGENT_STT_BASE_URL") or llm_base_url,
            stt_model=env.get("AGENT_STT_MODEL") or "whisper-1",
            stt_api_key=env.get("AGENT_STT_API_KEY") or llm_api_key,
            system_prompt=env.get("AGENT_SYSTEM_PROMPT") or SYSTEM_PROMPT,
            width=size("AGENT_WIDTH", 224),
            height=size("AGENT_HEIGHT", 128),
            ice_hosts=tuple(h.strip() for h in env["AGENT_ICE_HOSTS"].split(",") if h.strip())
            if env.get("AGENT_ICE_HOSTS")
            else None,
        )


def build_pipeline(config: AgentConfig, connection: Any) -> tuple[Any, Any]:
    """The agent's pipeline on one SmallWebRTC ``connection``: returns ``(worker, avatar)``.

    ``transport.input() -> STT -> user aggregator -> LLM -> AvatarService ->
    transport.output() -> assistant aggregator``; Silero VAD ends the user's turns, and the
    user speaking interrupts the avatar. Building it connects to nothing; the avatar session
    opens when the pipeline starts.
    """
    from pipecat.audio.vad.silero import SileroVADAnalyzer
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.aggregators.llm_response_universal import (
        LLMContextAggregatorPair,
        LLMUserAggregatorParams,
    )
    from pipecat.services.openai.llm import OpenAILLMService
    from pipecat.services.openai.stt import OpenAISTTService
    from pipecat.transports.base_transport import TransportParams

    from clients.pipecat_avatar import AvatarService, BufferedSmallWebRTCTransport

    # Pipecat's SmallWebRTCTransport with one audio chunk queued ahead, so a late event loop does
    # not cut 10 ms gaps into the avatar's speech (docs/PIPECAT.md, "Gaps in the transport's audio").
    transport = BufferedSmallWebRTCTransport(
        webrtc_connection=connection,
        params=TransportParams(
            audio_in_enabled=True,
            audio_out_enabled=True,
            video_out_enabled=True,
            video_out_is_live=True,
            video_out_width=config.width,
            video_out_height=config.height,
            video_out_framerate=25,
        ),
    )
    stt = OpenAISTTService(
        api_key=config.stt_api_key,
        base_url=config.stt_base_url,
        settings=OpenAISTTService.Settings(model=config.stt_model),
    )
    llm = OpenAILLMService(
        api_key=config.llm_api_key,
        base_url=config.llm_base_url,
        settings=OpenAILLMService.Settings(model=config.llm_model),
    )
    avatar = AvatarService(
        url=config.avatar_url,
        image=config.avatar_image.read_bytes(),
        prompt=config.avatar_prompt,
        language=config.language,
        token=config.avatar_token,
        host_addresses=config.ice_hosts,
    )
    context = LLMContext([{"role": "system", "content": config.system_prompt}])
    aggregators = LLMContextAggregatorPair(
        context, user_params=LLMUserAggregatorParams(vad_analyzer=SileroVADAnalyzer())
    )
    pipeline = Pipeline(
        [transport.input(), stt, aggregators.user(), llm, avatar, transport.output(), aggregators.assistant()]
    )
    worker = PipelineWorker(pipeline, params=PipelineParams(audio_out_sample_rate=48_000), enable_rtvi=False)
    return worker, avatar


def create_app(config: AgentConfig) -> Any:
    """The agent's web app (FastAPI): ``GET /`` the page, ``POST /api/offer`` one session."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse
    from pipecat.transports.smallwebrtc.request_handler import SmallWebRTCRequest, SmallWebRTCRequestHandler
    from pipecat.workers.runner import WorkerRunner

    handler = SmallWebRTCRequestHandler()
    runs: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await handler.close()
        for run in list(runs):
            run.cancel()

    app = FastAPI(title="avatar agent", lifespan=lifespan)
    app.state.runs = runs  # one pipeline run per peer connection

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE

    @app.post("/api/offer")
    async def offer(body: dict[str, Any]) -> dict[str, str] | None:
        async def start(connection: Any) -> None:
            worker, _ = build_pipeline(config, connection)
            runner = WorkerRunner(handle_sigint=False)
            await runner.add_workers(worker)
            run = asyncio.get_running_loop().create_task(runner.run())
            app.state.runs.add(run)
            run.add_done_callback(app.state.runs.discard)

        request = SmallWebRTCRequest(sdp=str(body.get("sdp", "")), type=str(body.get("type", "offer")))
        return await handler.handle_web_request(request, start)

    return app


def main(argv: list[str] | None = None) -> int:
    """Serve the agent (``--host``, ``--port``); exits 2 naming a bad ``AGENT_*`` variable."""
    parser = argparse.ArgumentParser(
        description="A Pipecat voice agent with the avatar as its voice and face."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    try:
        config = AgentConfig.from_env()
    except ConfigError as exc:
        parser.exit(2, f"pipecat_agent: {exc}\n")
    logging.basicConfig(level=logging.INFO)
    import uvicorn

    uvicorn.run(create_app(config), host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
