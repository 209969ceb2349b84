"""The HTTP API for a backend (``/v1/tokens``, ``/v1/sessions``), its JSON errors, the OpenAPI
page, the static files, and ``create_app`` mounted in an ASGI server other than ours."""

from __future__ import annotations

import asyncio
import json

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from avatar_server.app import create_app
from avatar_server.settings import Settings
from engine.testpattern import TestPatternEngine
from tests.security_support import API_KEY, http_request, png_b64, recv_json, server, settle

AUTH = {"Authorization": f"Bearer {API_KEY}"}
START = json.dumps({"type": "session.start", "image": png_b64(), "mode": "conversation"})


async def test_sessions_are_listed_and_deleted_by_the_operator() -> None:
    async with server(api_key=API_KEY, max_sessions=4, auth={"admin_from_loopback": False}) as app:
        port = app.port
        assert json.loads((await http_request(port, "GET", "/v1/sessions", AUTH))[2]) == {"sessions": []}
        status, _, body = await http_request(port, "POST", "/v1/tokens", AUTH, json_body={"session_id": "room-1"})
        token = json.loads(body)["token"]
        async with connect(f"ws://127.0.0.1:{port}/ws?token={token}", max_size=None) as ws:
            await ws.send(START)
            assert (await recv_json(ws))["type"] == "session.ready"
            await asyncio.sleep(0.3)
            status, headers, body = await http_request(port, "GET", "/v1/sessions", AUTH)
            assert status == 200 and headers["content-type"] == "application/json"
            (listed,) = json.loads(body)["sessions"]
            assert listed["session_id"] == "room-1" and listed["mode"] == "conversation"
            assert listed["parked"] is False and listed["peer_connection"] is None and listed["recording"] is False
            assert 0.2 <= listed["duration_s"] < 10 and listed["buffer_ms"] >= 0 and listed["state"]
            assert listed["client_address"] == "127.0.0.1"

            # not the operator: the session's own token and a wrong key get nothing
            refused = await http_request(port, "GET", "/v1/sessions", {"Authorization": f"Bearer {token}"})
            assert refused[0] == 403 and json.loads(refused[2])["code"] == "forbidden"
            status, _, body = await http_request(port, "DELETE", "/v1/sessions/nobody", AUTH)
            assert status == 404 and json.loads(body) == {
                "type": "error",
                "code": "no_session",
                "message": "session_id: no live session 'nobody'",
                "field": "session_id",
            }

            status, _, body = await http_request(port, "DELETE", "/v1/sessions/room-1", AUTH)
            assert status == 200 and json.loads(body) == {"session_id": "room-1", "reason": "ended_by_operator"}
            error = await recv_json(ws)
            assert error["type"] == "error" and error["code"] == "ended_by_operator"
            assert (await recv_json(ws))["type"] == "session.ended"
            try:
                await recv_json(ws)
            except ConnectionClosed as exc:
                assert exc.rcvd is not None and exc.rcvd.code == 1000
        assert await settle(lambda: app.sessions_active == 0 and not app.connections)
        assert json.loads((await http_request(port, "GET", "/v1/sessions", AUTH))[2]) == {"sessions": []}


async def test_errors_are_json_with_protocol_codes_and_the_openapi_page_is_admin() -> None:
    async with server(api_key=API_KEY, auth={"admin_from_loopback": False}) as app:
        port = app.port
        status, _, body = await http_request(port, "POST", "/v1/tokens", AUTH, json_body={"ttl_s": "soon"})
        assert status == 400 and json.loads(body)["code"] == "invalid_field" and json.loads(body)["field"] == "ttl_s"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/tokens HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {API_KEY}\r\nContent-Length: 5\r\n\r\n{{oops".encode()
        )
        reply = await reader.read()
        writer.close()
        assert reply.startswith(b"HTTP/1.1 400") and b'"code":"bad_json"' in reply
        status, headers, body = await http_request(port, "GET", "/v1/tokens", AUTH)
        assert status == 405 and json.loads(body)["code"] == "method_not_allowed"
        # the OpenAPI description names the API routes; only the operator reads it
        status, _, body = await http_request(port, "GET", "/openapi.json", AUTH)
        paths = json.loads(body)["paths"]
        assert status == 200 and {"/v1/tokens", "/v1/sessions", "/v1/sessions/{session_id}"} <= set(paths)
        assert set(paths["/v1/tokens"]["post"]["requestBody"]["content"]) == {"application/json"}
        assert (await http_request(port, "GET", "/openapi.json"))[0] == 401
        assert (await http_request(port, "GET", "/docs", AUTH))[0] == 200


async def test_static_files_have_types_validators_and_no_traversal() -> None:
    async with server() as app:
        port = app.port
        status, headers, body = await http_request(port, "GET", "/app.js")
        assert status == 200 and "javascript" in headers["content-type"] and b"RTCPeerConnection" in body
        etag, modified = headers["etag"], headers["last-modified"]
        status, headers, body = await http_request(port, "GET", "/app.js", {"If-None-Match": etag})
        assert (status, body) == (304, b"")
        assert (await http_request(port, "GET", "/app.js", {"If-Modified-Since": modified}))[0] == 304
        status, headers, _ = await http_request(port, "GET", "/")
        assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
        for path in ("/../pyproject.toml", "/%2e%2e/pyproject.toml", "/..%2fpyproject.toml", "/web/../../README.md"):
            status, _, body = await http_request(port, "GET", path)
            assert status == 404 and b"[project]" not in body, path


async def test_create_app_runs_under_a_plain_asgi_server_lifespan() -> None:
    """The app alone (no uvicorn of ours), driven by httpx's ASGI transport and the lifespan
    protocol: /healthz answers and the lifespan shutdown stops the engine worker."""
    app = create_app(Settings(engine="testpattern", port=0), TestPatternEngine())
    avatar = app.state.avatar
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            response = await client.get("/healthz")
            assert (response.status_code, response.text) == (200, "ok\n")
            for _ in range(200):
                if (await client.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            assert (await client.get("/readyz")).text == "ready\n"
            assert (await client.get("/metrics")).status_code == 200
    assert not avatar.worker.scheduler.alive


async def test_server_side_errors_carry_field_limit_and_in_reply_to() -> None:
    async with server(limits={"max_pending_utterances": 1}) as app:
        async with connect(f"ws://127.0.0.1:{app.port}/ws", max_size=None) as ws:
            await ws.send(json.dumps({"type": "speak", "id": "a1", "utterance_id": "u", "text": "hi"}))
            error = await recv_json(ws)
            assert (error["code"], error["field"], error["limit"], error["in_reply_to"]) == ("no_session", "type", None, "a1")
            await ws.send(START)
            assert (await recv_json(ws))["type"] == "session.ready"
            await ws.send(json.dumps({"type": "speak", "utterance_id": "u1", "text": "one"}))
            await ws.send(json.dumps({"type": "speak", "id": "a2", "utterance_id": "u2", "text": "two"}))
            error = await recv_json(ws, skip=("stats", "state", "speak.started"))
            assert error["code"] == "too_many_utterances" and error["in_reply_to"] == "a2"
            assert (error["field"], error["limit"]) == ("utterance_id", "max_pending_utterances")
