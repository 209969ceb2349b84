"""The one route table of the server: the page and its static files, ``/healthz``,
``/readyz``, ``/metrics``, the HTTP API for a backend (``/v1/tokens``, ``/v1/sessions``) and
the WebSocket ``/ws`` (documented in docs/PROTOCOL.md and on the OpenAPI page ``/docs``,
an admin route).

Every request, HTTP or WebSocket handshake, first passes :class:`AccessMiddleware`: the access
rules of :class:`~avatar_server.auth.Authenticator` (api key, session tokens, origins, admin
routes, the failure throttle) and, for ``/ws``, the connection counts of
:class:`~avatar_server.limits.AdmissionRegistry` and the drain. A refused request gets a JSON
error (``{"type": "error", "code", "message"}``, the codes of the WebSocket protocol) before
any route or WebSocket work is done.
"""

from __future__ import annotations

import contextlib
import http
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from avatar_server import protocol
from avatar_server.auth import SESSION_ID_RE, Grant, Refusal, RequestView, peer_host
from avatar_server.connection import ClientConnection, WebSocketLink
from avatar_server.live import build_router as build_live_router
from avatar_server.live import end_headless
from avatar_server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

if TYPE_CHECKING:
    from avatar_server.app import AvatarServer

logger = logging.getLogger(__name__)

GRANT_SCOPE_KEY = "avatar.grant"  # the Grant of an admitted /ws handshake, in its ASGI scope
MAX_QUERY_FIELDS = 16


# --------------------------------------------------------------------------------- API models
class TokenRequest(BaseModel):
    """``POST /v1/tokens`` body (every field optional; an empty body is allowed)."""

    session_id: str | None = Field(
        None, max_length=64, description="the session id the token may start (default: a fresh one)"
    )
    ttl_s: float | None = Field(None, description="lifetime in seconds (default auth.token_ttl_s; at most auth.max_token_ttl_s)")


class TokenResponse(BaseModel):
    token: str = Field(description="the session token (a JWT); give it to one client")
    expires_at: int = Field(description="expiry, Unix seconds")
    session_id: str
    scope: str


class SessionInfo(BaseModel):
    """One live session as ``GET /v1/sessions`` lists it."""

    session_id: str
    state: str = Field(description="idle, speaking, listening... (the session's state)")
    mode: str = Field(description="lipsync or conversation")
    duration_s: float = Field(description="seconds since session.ready")
    buffer_ms: int = Field(description="media buffered ahead of playout, ms")
    parked: bool = Field(description="its WebSocket dropped; waiting for session.resume")
    peer_connection: str | None = Field(description="the WebRTC connection state, or null before an offer")
    recording: bool
    client_address: str


class SessionList(BaseModel):
    sessions: list[SessionInfo]


class SessionDeleted(BaseModel):
    session_id: str
    reason: str


# --------------------------------------------------------------------------------- errors
def error_response(
    status: int,
    code: str,
    message: str,
    *,
    field: str | None = None,
    headers: Any = (),
) -> JSONResponse:
    """An HTTP error as JSON: the WebSocket protocol's ``error`` frame (same codes)."""
    body = protocol.ErrorMessage(code=code, message=message, field=field).model_dump(exclude_none=True)
    response = JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})
    for name, value in headers:
        response.headers[name] = value
    return response


def refusal_response(refusal: Refusal) -> JSONResponse:
    return error_response(refusal.status, refusal.code, refusal.message, headers=refusal.headers)


_STATUS_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "message_too_large",
}


def request_view(scope: dict[str, Any], headers: Any) -> RequestView:
    """The parts of an ASGI request that the access rules look at."""
    try:
        parsed = parse_qs(
            scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS
        )
        query = {key: values[0] for key, values in parsed.items()}
    except ValueError:
        query = {}  # too many fields: treated as a request without credentials
    return RequestView(
        method=scope.get("method", "GET"),
        path=scope.get("path", ""),
        query=query,
        headers=headers,
        peer=peer_host(scope.get("client")),
    )


class AccessMiddleware:
    """ASGI middleware: the access rules and the ``/ws`` admission before any route runs."""

    def __init__(self, app: Any, server: AvatarServer) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        from starlette.datastructures import Headers

        view = request_view(scope, Headers(scope=scope))
        server = self.server
        decision = server.auth.check(view)
        if isinstance(decision, Grant):
            decision = self._admit(decision)
        if isinstance(decision, Refusal):
            await self._refuse(scope, receive, send, decision)
            return
        if isinstance(decision, Grant):
            scope[GRANT_SCOPE_KEY] = decision
        await self.app(scope, receive, send)

    def _admit(self, grant: Grant) -> Grant | Refusal:
        server = self.server
        if server.draining:
            return Refusal(
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                "shutting_down",
                "draining: the server is shutting down; try another instance",
                (("Retry-After", "5"),),
            )
        refused = server.admission.check_connection(grant.address)
        return grant if refused is None else refused

    @staticmethod
    async def _refuse(scope: dict[str, Any], receive: Any, send: Any, refusal: Refusal) -> None:
        response = refusal_response(refusal)
        if scope["type"] == "http":
            await response(scope, receive, send)
            return
        if "websocket.http.response" in scope.get("extensions", {}):
            await send(
                {"type": "websocket.http.response.start", "status": response.status_code, "headers": response.raw_headers}
            )
            await send({"type": "websocket.http.response.body", "body": response.body})
        else:  # the ASGI server cannot send a response body: a plain 403
            await send({"type": "websocket.close", "code": 1008, "reason": refusal.code})


# --------------------------------------------------------------------------------- the app
def build_asgi_app(server: AvatarServer) -> FastAPI:
    """The FastAPI app of ``server`` (see the module docstring)."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await server.startup()
        try:
            yield
        finally:
            await server.shutdown()

    api = FastAPI(
        title="avatar-server",
        summary="Real-time streaming avatar: HTTP API for a backend; the media session is on /ws",
        version="1",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    api.state.avatar = server

    @api.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "bad_request" if exc.status_code < 500 else "internal")
        message = exc.detail if isinstance(exc.detail, str) else http.HTTPStatus(exc.status_code).phrase
        return error_response(exc.status_code, code, message, headers=(exc.headers or {}).items())

    @api.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        field = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            return error_response(400, "bad_json", "body: not valid JSON")
        return error_response(400, "invalid_field", f"{field or 'body'}: {first.get('msg', 'invalid')}", field=field)

    # ------------------------------------------------------------------------- probes
    @api.get("/healthz", response_class=PlainTextResponse, tags=["probes"])
    async def healthz() -> PlainTextResponse:
        """Process alive: 200 ``ok``; 503 when the engine worker stopped or a job stalls."""
        if not server.worker.jobs.alive:
            return PlainTextResponse("engine worker stopped\n", 503, headers={"Cache-Control": "no-store"})
        if (stall := server.engine_stall()) is not None:
            return PlainTextResponse(stall + "\n", 503, headers={"Cache-Control": "no-store"})
        return PlainTextResponse("ok\n", headers={"Cache-Control": "no-store"})

    @api.get("/readyz", response_class=PlainTextResponse, tags=["probes"])
    async def readyz() -> PlainTextResponse:
        """Ready for one more session: 200 ``ready``; 503 with the reason otherwise."""
        ok, reason = server.readiness()
        return PlainTextResponse(reason + "\n", 200 if ok else 503, headers={"Cache-Control": "no-store"})

    @api.get("/metrics", tags=["admin"])
    async def metrics() -> Response:
        """Prometheus metrics (admin: the api key or a loopback client)."""
        return Response(server.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    # ------------------------------------------------------------------------- HTTP API
    @api.post("/v1/tokens", response_model=TokenResponse, tags=["api"])
    async def mint_token(body: TokenRequest | None = None) -> Any:
        """Mint a session token (needs ``Authorization: Bearer <api key>``)."""
        body = body or TokenRequest()
        if body.session_id is not None and not SESSION_ID_RE.fullmatch(body.session_id):
            return error_response(
                400, "invalid_field", f"session_id: must match {SESSION_ID_RE.pattern}", field="session_id"
            )
        try:
            minted = server.auth.issuer.mint(body.session_id, ttl_s=body.ttl_s)
        except ValueError as exc:
            field = str(exc).partition(":")[0]
            return error_response(400, "invalid_field", str(exc), field=field)
        logger.info("token minted for session %s (expires at %d)", minted.session_id, minted.expires_at)
        return JSONResponse(
            TokenResponse(
                token=minted.token, expires_at=minted.expires_at, session_id=minted.session_id, scope=minted.scope
            ).model_dump(),
            headers={"Cache-Control": "no-store"},
        )

    @api.get("/v1/sessions", response_model=SessionList, tags=["api"])
    async def list_sessions() -> SessionList:
        """The live sessions (admin)."""
        return SessionList(sessions=[info for conn in server.live_sessions() if (info := session_info(conn))])

    @api.delete(
        "/v1/sessions/{session_id}",
        response_model=SessionDeleted,
        tags=["api"],
        responses={404: {"description": "no such session"}},
    )
    async def delete_session(session_id: str) -> Any:
        """End a session (admin): its client gets an ``error`` (code ``ended_by_operator``),
        ``session.ended``, and its WebSocket closes."""
        if await end_headless(server, session_id):
            return SessionDeleted(session_id=session_id, reason="ended_by_operator")
        conn = server.session_by_id(session_id)
        if conn is None:
            return error_response(404, "no_session", f"session_id: no live session {session_id[:64]!r}", field="session_id")
        reason = "ended_by_operator"
        await conn.end_session(reason, "session ended by the operator (DELETE /v1/sessions)", error=True, close_code=1000)
        return SessionDeleted(session_id=session_id, reason=reason)

    # ------------------------------------------------------------------------- WebSocket
    @api.websocket("/ws")
    async def websocket_endpoint(websocket: WebSocket) -> None:
        grant = websocket.scope.get(GRANT_SCOPE_KEY)
        if grant is None:  # mounted without the middleware in front: refuse
            await websocket.close(1008)
            return
        subprotocol = server.auth.select_subprotocol(request_view(websocket.scope, websocket.headers))
        await websocket.accept(subprotocol=subprotocol)
        await server.handle_websocket(WebSocketLink(websocket), grant)

    api.include_router(build_live_router(server))  # /v1/sessions (headless), WHEP, /watch
    api.mount("/", StaticFiles(directory=server.web_dir, html=True, check_dir=False), name="web")
    api.add_middleware(AccessMiddleware, server=server)
    return api


def session_info(conn: ClientConnection) -> SessionInfo | None:
    """What ``GET /v1/sessions`` says about ``conn``'s session (``None``: it has none yet)."""
    session = conn.session
    if session is None or conn.session_id is None:
        return None
    return SessionInfo(
        session_id=conn.session_id,
        state=session.state,
        mode=session.config.mode,
        duration_s=round(time.monotonic() - conn.started_s, 3),
        buffer_ms=round(session.buffer.depth_ms),
        parked=conn.parked,
        peer_connection=None if conn.pc is None else conn.pc.connectionState,
        recording=session.recorder is not None,
        client_address=conn.address,
    )
