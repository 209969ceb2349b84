"""A stand-in for ``create_app(settings, engine)`` while the ASGI server (branch ``asgi-server``)
is not merged: a FastAPI app with the parts of the protocol the fleet depends on.

- ``/healthz``, ``/readyz`` (503 when ``max_sessions`` run), ``/metrics``
  (``avatar_server_sessions_active``), ``app.state.drain(timeout_s)``;
- ``/ws``: ``session.start`` -> ``session.ready`` (``session_id``, ``resume_token``) or
  ``error`` ``capacity``; a ``stats`` message every 0.1 s carrying a running frame count and
  the replica's pid; a WebSocket that drops abnormally parks its session for
  ``session_resume_grace_s``; ``session.resume`` -> ``session.resumed``; drain ends each
  session with ``session.ended`` (reason ``shutdown``) and close 1001.

The fleet tests switch to the real factory (``avatar_server.app:create_app``) once it exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from engine.testpattern import TestPatternEngine

TICK_S = 0.1


def create_engine(settings: Any) -> TestPatternEngine:
    return TestPatternEngine(generate_delay_s=settings.testpattern_delay_s)


@dataclass
class _Session:
    session_id: str
    resume_token: str
    ws: WebSocket | None
    frames: int = 0
    parked_task: asyncio.Task | None = None
    ticker: asyncio.Task | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)


def create_app(settings: Any, engine: Any) -> FastAPI:
    app = FastAPI()
    registry = CollectorRegistry()
    active = Gauge("avatar_server_sessions_active", "Sessions running now", registry=registry)
    sessions: dict[str, _Session] = {}
    draining = False

    async def send(session: _Session, message: dict) -> None:
        if session.ws is not None:
            with contextlib.suppress(Exception):
                await session.ws.send_json(message)

    async def tick(session: _Session) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            session.frames += 1
            await send(session, {"type": "stats", "frames": session.frames, "pid": os.getpid()})

    async def end(session: _Session, reason: str, code: int = 1000) -> None:
        if sessions.pop(session.session_id, None) is None:
            return
        active.set(len(sessions))
        if session.ticker is not None:
            session.ticker.cancel()
        await send(session, {"type": "session.ended", "reason": reason})
        if session.ws is not None:
            with contextlib.suppress(Exception):
                await session.ws.close(code)
        session.ended.set()

    async def park(session: _Session) -> None:
        await asyncio.sleep(settings.session_resume_grace_s)
        await end(session, "resume_expired")

    @app.get("/healthz")
    async def healthz() -> Response:
        return PlainTextResponse("ok\n")

    @app.get("/readyz")
    async def readyz() -> Response:
        if draining:
            return PlainTextResponse("draining\n", status_code=503)
        if len(sessions) >= settings.max_sessions:
            return PlainTextResponse("at capacity\n", status_code=503)
        return PlainTextResponse("ready\n")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type="text/plain")

    @app.websocket("/ws")
    async def ws_endpoint(ws: WebSocket) -> None:
        await ws.accept()
        session: _Session | None = None
        try:
            first = await ws.receive_json()
            if first.get("type") == "session.resume":
                match = [s for s in sessions.values() if s.resume_token == first.get("resume_token")]
                if not match:
                    await ws.send_json(
                        {
                            "type": "error",
                            "code": "resume_failed",
                            "field": "resume_token",
                            "message": "resume_token: no such session here",
                        }
                    )
                    await ws.close(1008)
                    return
                session = match[0]
                if session.parked_task is not None:
                    session.parked_task.cancel()
                    session.parked_task = None
                session.ws = ws
                session.resume_token = secrets.token_urlsafe(16)
                await ws.send_json(
                    {
                        "type": "session.resumed",
                        "session_id": session.session_id,
                        "resume_token": session.resume_token,
                        "pid": os.getpid(),
                    }
                )
            elif draining or len(sessions) >= settings.max_sessions:
                await ws.send_json(
                    {
                        "type": "error",
                        "code": "capacity",
                        "message": f"at capacity: max_sessions = {settings.max_sessions}",
                    }
                )
                await ws.close(1013)
                return
            else:
                session = _Session(secrets.token_hex(8), secrets.token_urlsafe(16), ws)
                sessions[session.session_id] = session
                active.set(len(sessions))
                session.ticker = asyncio.get_running_loop().create_task(tick(session))
                await ws.send_json(
                    {
                        "type": "session.ready",
                        "session_id": session.session_id,
                        "resume_token": session.resume_token,
                        "pid": os.getpid(),
                        "resume_grace_s": settings.session_resume_grace_s,
                    }
                )
            while True:
                message = await ws.receive_json()
                if message.get("type") == "session.end":
                    await end(session, "client")
                    return
        except WebSocketDisconnect as exc:
            if session is not None and session.ws is ws and session.session_id in sessions:
                session.ws = None
                if exc.code in (1000, 1001) or settings.session_resume_grace_s <= 0:
                    await end(session, "client")
                else:
                    session.parked_task = asyncio.get_running_loop().create_task(park(session))

    async def drain(timeout_s: float) -> None:
        nonlocal draining
        draining = True
        await asyncio.gather(*(end(s, "shutdown", 1001) for s in list(sessions.values())))

    app.state.drain = drain
    return app
