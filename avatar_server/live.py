"""Sessions on air over HTTP (issue 15): headless sessions driven by a backend, live outputs,
WHEP viewers, server-sent events, and the ``/watch`` page.

Routes (all JSON unless said; errors are the WebSocket protocol's ``error`` objects):

* ``POST /v1/sessions`` (api key, or a loopback client without one): body
  :class:`CreateSession`; ``201`` with :class:`SessionCreated` (``session_id``, a session
  ``token`` that controls it, a ``viewer_token`` that can only watch it, the WHEP and events
  URLs). The session has no browser: its media clock runs on the server
  (:class:`~streaming.live.LiveSession`), so it plays, records and streams with nobody watching.
* ``POST /v1/sessions/{id}/speak`` ``{"utterance_id", "text", "final"}``: one chunk of an
  utterance, ``final: true`` on the last; ``POST .../interrupt``; ``POST .../recording`` starts
  a recording, ``DELETE .../recording`` finishes it (the result: path, duration);
  ``POST .../outputs`` (:class:`OutputRequest`) starts an RTMP/RTMPS or WHIP output,
  ``DELETE .../outputs/{output_id}`` stops it, ``GET .../outputs`` lists them;
  ``POST .../viewer-tokens`` mints a viewer token; ``GET .../events``: the session's events
  as server-sent events (``event: <type>``, ``data: <json>``); ``GET .../stats``.
  These take the api key or the session's token (``Authorization: Bearer``).
* ``POST /v1/sessions/{id}/whep`` (``application/sdp``; the draft WHEP protocol): ``201``, the
  SDP answer and ``Location: /v1/sessions/{id}/whep/{viewer_id}``; ``DELETE`` that location
  to leave. A viewer token (scope ``viewer``) opens only these two routes.
* ``DELETE /v1/sessions/{id}`` (in :mod:`avatar_server.routes`) also ends a headless session.
* ``GET /watch``: a page without build step that plays a session over WHEP
  (``/watch?session=<id>&token=<viewer token>``).

Stream keys and WHIP bearer tokens are secrets: outputs are shown with redacted URLs only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import Counter, Gauge
from pydantic import BaseModel, Field, field_validator

from avatar_server import protocol
from avatar_server.auth import SCOPE_VIEWER, SESSION_ID_RE, new_session_id
from avatar_server.images import ImageError, decode_image
from avatar_server.recording import recording_name
from avatar_server.webrtc import make_peer_connection
from engine.api import EngineInputError
from streaming import events
from streaming.live import LiveEvent, LiveSession, OutputSpec, ViewerLeft
from streaming.outputs.base import Backoff, OutputState
from streaming.recorder import RecordingLimits
from streaming.session import SessionInputError, SessionRunner
from streaming.whep import ViewerBudget, WhepError

if TYPE_CHECKING:
    from avatar_server.app import AvatarServer

logger = logging.getLogger(__name__)

SDP_CONTENT_TYPE = "application/sdp"
MAX_SDP_BYTES = 64 * 1024
SSE_KEEPALIVE_S = 15.0


# --------------------------------------------------------------------------------- API models
OutputRequest = protocol.LiveOutput  # one model for HTTP and the WebSocket


def output_spec(output: protocol.LiveOutput) -> OutputSpec:
    return OutputSpec(**output.model_dump())


class CreateSession(BaseModel):
    """``POST /v1/sessions`` body."""

    image: str = Field(description="reference portrait: base64 PNG, JPEG or WebP (a data: URL is fine)")
    prompt: str = Field("", max_length=2000, description="appearance of the person")
    session_id: str | None = Field(None, max_length=64, description="default: a fresh id")
    outputs: list[OutputRequest] = Field(default_factory=list, description="outputs started with the session")
    record: bool = Field(False, description="start recording at once")
    max_viewers: int | None = Field(None, ge=0, description="WHEP viewers at most (default and cap: live.max_viewers_per_session)")

    @field_validator("session_id")
    @classmethod
    def _session_id(cls, value: str | None) -> str | None:
        if value is not None and not SESSION_ID_RE.fullmatch(value):
            raise ValueError(f"must match {SESSION_ID_RE.pattern}")
        return value


class SessionCreated(BaseModel):
    session_id: str
    token: str = Field(description="session token: controls this session (speak, outputs, events...)")
    viewer_token: str = Field(description="viewer token: may only watch (WHEP)")
    expires_at: int
    width: int
    height: int
    fps: int
    outputs: list[dict[str, Any]]
    whep_url: str
    events_url: str
    watch_url: str


class SpeakRequest(BaseModel):
    utterance_id: str = Field(min_length=1, max_length=protocol.UTTERANCE_ID_MAX_CHARS)
    text: str = Field("", max_length=20_000)
    final: bool = False
    language: str | None = Field(None, max_length=16)


# --------------------------------------------------------------------------------- events
def event_message(event: LiveEvent) -> dict[str, Any] | None:
    """The wire form of a live session's event (``None``: not sent to clients)."""
    if isinstance(event, events.StateChanged):
        return protocol.State(state=event.state).model_dump()
    if isinstance(event, events.SpeakStarted):
        return protocol.SpeakStarted(utterance_id=event.utterance_id).model_dump()
    if isinstance(event, events.SpeakEnded):
        return protocol.SpeakEnded(utterance_id=event.utterance_id, played_ms=event.played_ms).model_dump()
    if isinstance(event, events.Interrupted):
        return protocol.Interrupted(utterance_id=event.utterance_id, played_ms=event.played_ms).model_dump()
    if isinstance(event, events.SessionError):
        return protocol.ErrorMessage(code=event.code, message=event.message).model_dump(exclude_none=True)
    if isinstance(event, OutputState):
        return output_state_message(event).model_dump()
    if isinstance(event, ViewerLeft):
        return {"type": "viewer.left", "viewer_id": event.viewer_id, "reason": event.reason}
    return None


def output_state_message(event: OutputState) -> protocol.OutputStateMessage:
    fields = dataclasses.asdict(event)
    fields["output_type"] = fields.pop("type")
    return protocol.OutputStateMessage(**fields)


def _error(status: int, code: str, message: str, field: str | None = None) -> JSONResponse:
    body = protocol.ErrorMessage(code=code, message=message, field=field).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})


_INPUT_STATUS = {"no_session": 404, "unknown_output": 404, "no_recording": 409, "recording_active": 409,
                 "output_limit": 409, "utterance_ended": 409}


def _input_error(exc: SessionInputError | ImageError) -> JSONResponse:
    field = str(exc).partition(":")[0] if ":" in str(exc) else None
    status = _INPUT_STATUS.get(exc.code, 400)
    return _error(status, exc.code, str(exc), field=field if field and " " not in field else None)


# --------------------------------------------------------------------------------- registry
@dataclasses.dataclass(eq=False)
class HeadlessSession:
    session_id: str
    live: LiveSession
    created_s: float
    recordings: int = 0
    lifetime: asyncio.Task[None] | None = None


class LiveRegistry:
    """The server's headless sessions and its viewer slots (one per :class:`AvatarServer`)."""

    def __init__(self, server: AvatarServer) -> None:
        self.server = server
        self.sessions: dict[str, HeadlessSession] = {}
        settings = server.settings.live
        self.viewer_budget = ViewerBudget(settings.max_viewers)
        # Metrics of this module, on the server's registry (avatar_server_*; no session labels).
        registry = server.metrics.registry
        self.outputs_active = Gauge("avatar_server_live_outputs_active", "RTMP/WHIP outputs running", registry=registry)
        self.outputs_active.set_function(lambda: sum(len(h.live.outputs) for h in self.sessions.values()))
        self.outputs_live = Gauge("avatar_server_live_outputs_live", "Outputs whose state is live", registry=registry)
        self.outputs_live.set_function(
            lambda: sum(o.state == "live" for h in self.sessions.values() for o in h.live.outputs.values())
        )
        self.output_reconnects = Counter(
            "avatar_server_live_output_reconnects", "Output reconnect attempts after a failure", registry=registry
        )
        self.output_failures = Counter(
            "avatar_server_live_output_failures", "Outputs that gave up (state failed)", registry=registry
        )
        self.viewers_active = Gauge("avatar_server_whep_viewers_active", "WHEP viewers watching", registry=registry)
        self.viewers_active.set_function(lambda: self.viewer_budget.in_use)
        self.viewers_dropped = Counter(
            "avatar_server_whep_viewers_dropped", "WHEP viewers dropped (stalled, failed, timed out)", registry=registry
        )

    def get(self, session_id: str) -> HeadlessSession | None:
        return self.sessions.get(session_id)

    async def create(self, body: CreateSession) -> HeadlessSession:
        """Admit and start a headless session.

        Raises:
            SessionInputError: ``capacity``, ``shutting_down``, ``session_exists``, ``invalid_field``.
            ImageError: the image cannot be used.
            EngineInputError: the engine refused the image.
        """
        server = self.server
        settings = server.settings
        if server.draining:
            raise SessionInputError("shutting_down", "the server is shutting down; try another instance")
        if server.sessions_active >= settings.max_sessions:
            server.metrics.sessions_refused.labels("capacity").inc()
            raise SessionInputError("capacity", f"server at capacity: max_sessions = {settings.max_sessions}")
        session_id = body.session_id or new_session_id()
        if session_id in self.sessions or server.session_by_id(session_id) is not None:
            raise SessionInputError("session_exists", f"session_id: {session_id!r} is running")
        server.sessions_active += 1
        server.metrics.sessions_active.inc()
        try:
            limits = settings.limits
            image = await asyncio.to_thread(
                decode_image, body.image, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels
            )
            identity = await server.worker.prepare_identity(image, body.prompt)
            live_settings = settings.live
            holder: list[LiveSession] = []
            runner = SessionRunner(
                worker=server.worker,
                identity=identity,
                on_event=lambda event: holder[0].emit(event) if holder else None,
                config=server.loop_config,
            )
            ice = settings.webrtc.ice_servers
            live = LiveSession(
                runner,
                max_outputs=live_settings.max_outputs_per_session,
                max_viewers=min(
                    live_settings.max_viewers_per_session,
                    body.max_viewers if body.max_viewers is not None else live_settings.max_viewers_per_session,
                ),
                viewer_budget=self.viewer_budget,
                peer_connection_factory=lambda: make_peer_connection(ice),
                backoff=Backoff(max_s=live_settings.output_reconnect_max_s),
                whep_bitrate_bps=live_settings.whep_bitrate_bps,
                on_event=self.observe,
            )
            holder.append(live)
        except BaseException:
            server.sessions_active -= 1
            server.metrics.sessions_active.dec()
            raise
        headless = HeadlessSession(session_id, live, time.monotonic())
        self.sessions[session_id] = headless
        live.start()
        headless.lifetime = asyncio.get_running_loop().create_task(
            self._end_after(session_id, settings.session_max_duration_s), name="headless-lifetime"
        )
        server.metrics.sessions_started.inc()
        try:
            for output in body.outputs:
                live.add_output(output_spec(output))
            if body.record:
                self.start_recording(headless)
        except BaseException:
            await self.end(session_id)
            raise
        logger.info("headless session %s started (image %dx%d, %d outputs)", session_id, image.shape[1],
                    image.shape[0], len(body.outputs))
        return headless

    def observe(self, event: LiveEvent) -> None:
        """Metrics of every event of a headless session."""
        if isinstance(event, OutputState):
            if event.state == "reconnecting":
                self.output_reconnects.inc()
            elif event.state == "failed":
                self.output_failures.inc()
        elif isinstance(event, ViewerLeft):
            if event.reason not in ("left", "session ended"):
                self.viewers_dropped.inc()
        else:
            self.server.metrics.observe(event)

    def start_recording(self, headless: HeadlessSession) -> str:
        settings = self.server.settings
        limits = settings.limits
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        recording_id = f"{headless.session_id}-{headless.recordings + 1}"
        path = settings.recordings_dir / f"{stamp}-{recording_id}.mp4"
        headless.live.start_recording(
            path,
            RecordingLimits(
                max_seconds=limits.max_recording_s,
                max_bytes=limits.max_recording_bytes,
                min_free_bytes=limits.min_recording_free_bytes,
            ),
        )
        headless.recordings += 1
        logger.info("session %s: recording to %s", headless.session_id, path)
        return recording_name(path, settings.recordings_dir)

    async def _end_after(self, session_id: str, seconds: float) -> None:
        """A headless session ends after ``session_max_duration_s`` like any other (a backend
        that forgets one does not hold a slot forever)."""
        await asyncio.sleep(seconds)
        logger.info("headless session %s reached session_max_duration_s = %g", session_id, seconds)
        await self.end(session_id, from_lifetime=True)

    async def end(self, session_id: str, *, from_lifetime: bool = False) -> bool:
        headless = self.sessions.pop(session_id, None)
        if headless is None:
            return False
        if headless.lifetime is not None and not from_lifetime:
            headless.lifetime.cancel()
        try:
            await headless.live.close()
        finally:
            self.server.sessions_active -= 1
            self.server.metrics.sessions_active.dec()
        logger.info("headless session %s ended", session_id)
        return True

    async def close(self) -> None:
        for session_id in list(self.sessions):
            await self.end(session_id)


# --------------------------------------------------------------------------------- routes
def build_router(server: AvatarServer) -> APIRouter:
    """The routes of this module, on ``server``'s :class:`LiveRegistry` (``server.live``)."""
    router = APIRouter()
    registry: LiveRegistry = server.live

    def lookup(session_id: str) -> HeadlessSession | JSONResponse:
        headless = registry.get(session_id)
        if headless is None:
            return _error(404, "no_session", f"session_id: no headless session {session_id[:64]!r}", "session_id")
        return headless

    def base_url(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    @router.post("/v1/sessions", status_code=201, response_model=SessionCreated, tags=["live"])
    async def create_session(body: CreateSession, request: Request) -> Any:
        """Start a session with no browser (api key): it plays, records and streams on the
        server's clock. Answers its session token and a viewer token."""
        try:
            headless = await registry.create(body)
        except (SessionInputError, ImageError) as exc:
            status = 503 if exc.code in ("capacity", "shutting_down") else None
            response = _input_error(exc)
            if status is not None:
                response.status_code = status
            return response
        except EngineInputError as exc:
            return _error(400, "engine_input", str(exc))
        session_id = headless.session_id
        issuer = server.auth.issuer
        ttl_s = min(server.settings.live.viewer_token_ttl_s, issuer.max_ttl_s)
        token = issuer.mint(session_id, ttl_s=min(server.settings.session_max_duration_s, issuer.max_ttl_s))
        viewer = issuer.mint(session_id, ttl_s=ttl_s, scope=SCOPE_VIEWER)
        runner = headless.live.runner
        base = base_url(request)
        return JSONResponse(
            SessionCreated(
                session_id=session_id,
                token=token.token,
                viewer_token=viewer.token,
                expires_at=token.expires_at,
                width=runner.width,
                height=runner.height,
                fps=runner.buffer.fps,
                outputs=[o.stats() for o in headless.live.outputs.values()],
                whep_url=f"{base}/v1/sessions/{session_id}/whep",
                events_url=f"{base}/v1/sessions/{session_id}/events",
                watch_url=f"{base}/watch?session={session_id}",
            ).model_dump(),
            status_code=201,
            headers={"Cache-Control": "no-store", "Location": f"/v1/sessions/{session_id}"},
        )

    @router.post("/v1/sessions/{session_id}/speak", tags=["live"])
    async def speak(session_id: str, body: SpeakRequest) -> Any:
        """One text chunk of an utterance (``final: true`` on its last)."""
        headless = lookup(session_id)
        if isinstance(headless, JSONResponse):
            return headless
        try:
            headless.live.speak(body.utterance_id, body.text, final=body.final, language=body.language)
        except SessionInputError as exc:
            return _input_error(exc)
        return {"utterance_id": body.utterance_id, "final": body.final}

    @router.post("/v1/sessions/{session_id}/interrupt", tags=["live"])
    async def interrupt(session_id: str) -> Any:
        headless = lookup(session_id)
        if isinstance(headless, JSONResponse):
            return headless
        interrupted = headless.live.interrupt()
        return {"interrupted": [e.utterance_id for e in interrupted if e.utterance_id is not None]}

    @router.post("/v1/sessions/{session_id}/recording", status_code=201, tags=["live"])
    async def start_recording(session_id: str) -> Any:
        headless = lookup(session_id)
        if isinstance(headless, JSONResponse):
            return headless
        try:
            path = registry.start_recording(headless)
        except SessionInputError as exc:
            return _input_error(exc)
        return JSONResponse({"path": path}, status_code=201)

    @router.delete("/v1/sessions/{session_id}/recording", tags=["live"])
    async def stop_recording(session_id: str) -> Any:
        headless = lookup(session_id)
        if isinstance(headless, JSONResponse):
            return headless
        try:
            result = await headless.live.stop_recording()
        except SessionInputError as exc:
            return _input_error(exc)
        return {
            "path": recording_name(result.path, registry.server.settings.recordings_dir),
            "duration_ms": result.duration_ms,
            "size_bytes": result.size_bytes,
            "error": result.error,
            "limit": result.limit,
        }

    @router.get("/v1/sessions/{session_id}/outputs", tags=["live"])
    async def list_outputs(session_id: str) -> Any:
        headless = lookup(session_id)
        if isinstance(headless, JSONResponse):
            return headless
        return {"outputs": [o.stats() for o in headless.live.outputs.values()]}

    @router.post("/v1/sessions/{session_id}/outputs", status_code=201, tags=["live"])
    async def add_output(session_id: str, body: OutputRequest) -> Any:
        """Start an RTMP/RTMPS or WHIP output; its progress comes as ``output.state`` events."""
        headless = lookup(session_id)
        if isinstance(headless, JSONResponse):
            return headless
        try:
            output_id = headless.live.add_output(output_spec(body))
        except SessionInputError as exc:
            return _input_error(exc)
        return JSONResponse(headless.live.outputs[output_id].stats(), status_code=201)

    @router.delete("/v1/sessions/{session_id}/outputs/{output_id}", tags=["live"])
    async def remove_output(session_id: str, output_id: str) -> Any:
        headless = lookup(session_id)
        if isinstance(headless, JSONResponse):
            return headless
        try:
            return await headless.live.remove_output(output_id)
        except SessionInputError as exc:
            return _input_error(exc)

    @router.get("/v1/sessions/{session_id}/stats", tags=["live"])
    async def stats(session_id: str) -> Any:
        headless = lookup(session_id)
        if isinstance(headless, JSONResponse):
            return headless
        return headless.live.stats()

    @router.post("/v1/sessions/{session_id}/viewer-tokens", status_code=201, tags=["live"])
    async def viewer_token(session_id: str) -> Any:
        """A token that may watch this session over WHEP and do nothing else."""
        headless = lookup(session_id)
        if isinstance(headless, JSONResponse):
            return headless
        issuer = server.auth.issuer
        minted = issuer.mint(session_id, ttl_s=min(server.settings.live.viewer_token_ttl_s, issuer.max_ttl_s),
                             scope=SCOPE_VIEWER)
        return JSONResponse({"token": minted.token, "expires_at": minted.expires_at, "scope": minted.scope},
                            status_code=201, headers={"Cache-Control": "no-store"})

    @router.get("/v1/sessions/{session_id}/events", tags=["live"])
    async def session_events(session_id: str) -> Any:
        """Server-sent events of the session: ``event: <type>`` / ``data: <json>`` per event
        (speak.started, speak.ended, interrupted, state, output.state, viewer.left, error),
        a comment every 15 s, and ``event: session.ended`` when it ends."""
        headless = lookup(session_id)
        if isinstance(headless, JSONResponse):
            return headless
        feed = headless.live.subscribe()

        async def stream():
            try:
                yield ": connected\n\n"
                while True:
                    try:
                        event = await asyncio.wait_for(feed.get(), SSE_KEEPALIVE_S)
                    except TimeoutError:
                        yield ": keepalive\n\n"
                        continue
                    if event is None:
                        yield f"event: session.ended\ndata: {json.dumps({'type': 'session.ended'})}\n\n"
                        return
                    message = event_message(event)
                    if message is not None:
                        yield f"event: {message['type']}\ndata: {json.dumps(message)}\n\n"
            finally:
                headless.live.unsubscribe(feed)

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )

    @router.post("/v1/sessions/{session_id}/whep", status_code=201, tags=["live"])
    async def whep_offer(session_id: str, request: Request) -> Any:
        """WHEP: an SDP offer (``application/sdp``) in, ``201`` + the answer + ``Location`` out."""
        headless = lookup(session_id)
        if isinstance(headless, JSONResponse):
            return headless
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != SDP_CONTENT_TYPE:
            return _error(415, "unsupported_media_type", f"content-type: expected {SDP_CONTENT_TYPE}")
        body = await request.body()
        if len(body) > MAX_SDP_BYTES:
            return _error(413, "sdp_too_large", f"offer: {len(body)} bytes; the limit is {MAX_SDP_BYTES}")
        try:
            viewer_id, answer = await headless.live.relay.add_viewer(body.decode("utf-8", "replace"))
        except WhepError as exc:
            response = _error(exc.status, exc.code, str(exc))
            if exc.status == 503:
                response.headers["Retry-After"] = "10"
            return response
        return Response(
            answer,
            status_code=201,
            media_type=SDP_CONTENT_TYPE,
            headers={"Location": f"/v1/sessions/{session_id}/whep/{viewer_id}", "Cache-Control": "no-store"},
        )

    @router.delete("/v1/sessions/{session_id}/whep/{viewer_id}", tags=["live"])
    async def whep_leave(session_id: str, viewer_id: str) -> Any:
        headless = lookup(session_id)
        if isinstance(headless, JSONResponse):
            return headless
        if not await headless.live.relay.remove_viewer(viewer_id):
            return _error(404, "no_viewer", f"viewer_id: no viewer {viewer_id[:64]!r}", "viewer_id")
        return Response(status_code=200)

    @router.get("/watch", include_in_schema=False)
    async def watch() -> Any:
        return FileResponse(server.web_dir / "watch.html", headers={"Cache-Control": "no-cache"})

    return router


async def end_headless(server: AvatarServer, session_id: str) -> bool:
    """End headless session ``session_id``; ``False`` when there is none (for ``DELETE /v1/sessions/{id}``)."""
    registry: LiveRegistry | None = getattr(server, "live", None)
    return registry is not None and await registry.end(session_id)


class SessionOutputs:
    """``output.start`` / ``output.stop`` on the WebSocket control channel for one
    connection's session (composed by :class:`~avatar_server.connection.ClientConnection`):
    the session gets a :class:`~streaming.live.LiveSession` that does not own it
    (``owns_runner=False``) on its first output; ``output.state`` events go to the client
    through ``send``; everything ends with the session (:meth:`close`). It stays with the
    session across a resume, and so do its outputs.

    Args:
        server: the server (its live settings, ICE servers and live registry).
        send: queues a frame for the client (the connection's ``send``).
    """

    def __init__(self, server: AvatarServer, send: Callable[[protocol.ServerMessage], None]) -> None:
        self._server = server
        self._send = send
        self._on_air: LiveSession | None = None

    async def start(self, session: SessionRunner, message: protocol.OutputStart) -> None:
        """``output.start``: add an output (starting the on-air session on the first).

        Raises:
            SessionInputError: the output is refused (its spec, ``max_outputs_per_session``).
        """
        app = self._server
        if self._on_air is None:
            live_settings = app.settings.live
            ice = app.settings.webrtc.ice_servers
            self._on_air = LiveSession(
                session,
                owns_runner=False,
                max_outputs=live_settings.max_outputs_per_session,
                max_viewers=0,
                viewer_budget=app.live.viewer_budget,
                peer_connection_factory=lambda: make_peer_connection(ice),
                backoff=Backoff(max_s=live_settings.output_reconnect_max_s),
                on_event=self._on_event,
            )
            self._on_air.start()
        output_id = self._on_air.add_output(output_spec(message.output))
        output = self._on_air.outputs[output_id]
        self._send(protocol.OutputStarted(output_id=output_id, output_type=output.type, url=output.url))

    async def stop(self, message: protocol.OutputStop) -> None:
        """``output.stop``.

        Raises:
            SessionInputError: ``unknown_output``.
        """
        if self._on_air is None:
            raise SessionInputError("unknown_output", f"output_id: no output {message.output_id[:64]!r}")
        await self._on_air.remove_output(message.output_id)

    def _on_event(self, event: LiveEvent) -> None:
        self._server.live.observe(event)
        if isinstance(event, OutputState):
            self._send(output_state_message(event))

    async def close(self) -> None:
        """Stop the outputs (before the session closes)."""
        on_air, self._on_air = self._on_air, None
        if on_air is not None:
            await on_air.close()
