"""Authentication: API key -> session tokens -> WebSocket; admin routes; origins; start-up policy.

Every protected endpoint is tried without credentials, with an expired token, with another
session's token and with a token signed by another key; all run on loopback with the
test-pattern engine and without WebRTC.
"""

from __future__ import annotations

import asyncio
import json
import time

import jwt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from avatar_server import cli
from avatar_server.auth import TokenError, TokenIssuer, derive_token_secret, origin_allowed, startup_problem
from avatar_server.server import build_app
from avatar_server.settings import Settings
from engine.testpattern import TestPatternEngine
from tests.security_support import API_KEY, http_request, png_b64, recv_json, server

OTHER_KEY = "another-api-key-fedcba9876543210"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


async def mint(app, session_id: str | None = None, **params) -> dict:
    if session_id is not None:
        params["session_id"] = session_id
    status, _, body = await http_request(app.port, "POST", "/v1/tokens", AUTH, json_body=params or None)
    assert status == 200, body
    return json.loads(body)


def expired_token(session_id: str) -> str:
    issuer = TokenIssuer(derive_token_secret(API_KEY))
    return issuer.mint(session_id, ttl_s=60, now=time.time() - 3600).token


def foreign_token(session_id: str) -> str:
    return TokenIssuer(derive_token_secret(OTHER_KEY)).mint(session_id).token


async def ws_status(app, query: str = "", headers: dict | None = None, subprotocols=None) -> int:
    """101 when the WebSocket opens, else the HTTP status of the refusal."""
    try:
        async with connect(
            f"ws://127.0.0.1:{app.port}/ws{query}", additional_headers=headers, subprotocols=subprotocols
        ):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


@pytest.fixture
async def app():
    async with server(api_key=API_KEY, max_sessions=4) as app:
        yield app


async def test_tokens_endpoint_mints_scoped_short_lived_tokens(app) -> None:
    port = app.port
    assert (await http_request(port, "POST", "/v1/tokens"))[0] == 401
    assert (await http_request(port, "POST", "/v1/tokens", {"Authorization": f"Bearer {OTHER_KEY}"}))[0] == 401
    session_token = (await mint(app))["token"]
    assert (await http_request(port, "POST", "/v1/tokens", {"Authorization": f"Bearer {session_token}"}))[0] == 401
    status, headers, _ = await http_request(port, "GET", "/v1/tokens", AUTH)
    assert status == 405 and headers["allow"] == "POST"

    before = time.time()
    status, headers, body = await http_request(
        port, "POST", "/v1/tokens", AUTH, json_body={"session_id": "room-7", "ttl_s": 60}
    )
    assert status == 200 and headers["content-type"] == "application/json"
    reply = json.loads(body)
    assert set(reply) == {"token", "expires_at", "session_id", "scope"}
    assert reply["session_id"] == "room-7" and reply["scope"] == "session"
    assert before + 55 <= reply["expires_at"] <= time.time() + 65
    claims = jwt.decode(reply["token"], options={"verify_signature": False})
    assert {"exp", "iat", "sub", "scope", "jti"} <= set(claims) and claims["sub"] == "room-7"
    assert jwt.get_unverified_header(reply["token"])["alg"] == "HS256"

    default = await mint(app)
    assert len(default["session_id"]) == 16 and default["expires_at"] - time.time() <= 300 + 5
    for bad in ({"session_id": "a b"}, {"session_id": "x" * 65}, {"ttl_s": 99999}, {"ttl_s": -1}, {"ttl_s": "soon"}):
        status, _, body = await http_request(port, "POST", "/v1/tokens", AUTH, json_body=bad)
        assert status == 400, bad
        error = json.loads(body)
        assert error["code"] == "invalid_field" and error["field"] == next(iter(bad)), error


async def test_websocket_needs_a_valid_token_before_any_work(app) -> None:
    minted = await mint(app, "alice")
    assert await ws_status(app) == 401
    assert await ws_status(app, "?token=") == 401
    assert await ws_status(app, "?token=not.a.jwt") == 401
    assert await ws_status(app, f"?token={expired_token('alice')}") == 401
    assert await ws_status(app, f"?token={foreign_token('alice')}") == 401
    unscoped = jwt.encode(
        {"sub": "alice", "scope": "admin", "iat": int(time.time()), "exp": int(time.time()) + 60, "jti": "x",
         "iss": "avatar-server", "aud": "avatar-server"},
        derive_token_secret(API_KEY),
        algorithm="HS256",
    )
    assert await ws_status(app, f"?token={unscoped}") == 403
    none_alg = jwt.encode({"sub": "alice", "scope": "session"}, None, algorithm="none")
    assert await ws_status(app, f"?token={none_alg}") == 401
    assert app.connections == set() and app.sessions_active == 0  # nothing was started

    # the three ways to present a token
    assert await ws_status(app, f"?token={minted['token']}") == 101
    assert await ws_status(app, headers={"Authorization": f"Bearer {minted['token']}"}) == 101
    async with connect(
        f"ws://127.0.0.1:{app.port}/ws", subprotocols=["avatar.v1", f"bearer.{minted['token']}"]
    ) as ws:
        assert ws.subprotocol == "avatar.v1"


async def test_a_token_binds_its_session(app) -> None:
    alice, bob = await mint(app, "alice"), await mint(app, "bob")
    # the handshake refuses a token for another session
    assert await ws_status(app, f"?token={alice['token']}&session_id=bob") == 403
    url = f"ws://127.0.0.1:{app.port}/ws?token={alice['token']}"
    async with connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "session.start", "image": png_b64(), "session_id": "bob"}))
        reply = await recv_json(ws)
        assert reply["code"] == "forbidden" and "session_id" in reply["message"]
        await ws.send(json.dumps({"type": "session.start", "image": png_b64()}))
        ready = await recv_json(ws)
        assert ready["type"] == "session.ready" and ready["session_id"] == "alice"
        # the same token cannot run a second session at once (max_sessions_per_token = 1) ...
        async with connect(url, max_size=None) as again:
            await again.send(json.dumps({"type": "session.start", "image": png_b64()}))
            reply = await recv_json(again)
            assert reply["code"] == "too_many_sessions" and "max_sessions_per_token = 1" in reply["message"]
        # ... nor a second token of the same session id
        second = await mint(app, "alice")
        async with connect(f"ws://127.0.0.1:{app.port}/ws?token={second['token']}", max_size=None) as twin:
            await twin.send(json.dumps({"type": "session.start", "image": png_b64()}))
            assert (await recv_json(twin))["code"] == "session_exists"
        # bob's token starts bob's session beside it
        async with connect(f"ws://127.0.0.1:{app.port}/ws?token={bob['token']}", max_size=None) as other:
            await other.send(json.dumps({"type": "session.start", "image": png_b64(), "session_id": "bob"}))
            assert (await recv_json(other))["session_id"] == "bob"


@pytest.mark.parametrize("admin_from_loopback", [False, True])
async def test_admin_and_session_routes(admin_from_loopback: bool) -> None:
    # 12 wrong keys from one address: above the default failure throttle, which test_auth_throttle.py covers
    auth = {"admin_from_loopback": admin_from_loopback, "max_key_failures": 100}
    async with server(api_key=API_KEY, auth=auth) as app:
        port = app.port
        alice = (await mint(app, "alice"))["token"]
        for path in ("/metrics", "/admin/no-such-route", "/anything-else"):
            want = 200 if path == "/metrics" else 404  # past the check, an unknown route is 404
            assert (await http_request(port, "GET", path, AUTH))[0] == want, path
            for creds in (alice, expired_token("alice"), foreign_token("alice"), OTHER_KEY):
                status = (await http_request(port, "GET", path, {"Authorization": f"Bearer {creds}"}))[0]
                assert status == (want if admin_from_loopback else 403), (path, status)
            status, headers, _ = await http_request(port, "GET", path)
            if admin_from_loopback:
                assert status == want
            else:
                assert status == 401 and headers["www-authenticate"].startswith("Bearer")
        # /v1/sessions/<id>/...: the api key or that session's token (the route itself is 404 here)
        route = "/v1/sessions/alice/recording"
        assert (await http_request(port, "GET", route))[0] == 401
        assert (await http_request(port, "GET", f"{route}?token={alice}"))[0] == 404
        assert (await http_request(port, "GET", route, {"Authorization": f"Bearer {alice}"}))[0] == 404
        assert (await http_request(port, "GET", route, AUTH))[0] == 404
        assert (await http_request(port, "GET", "/v1/sessions/bob/recording", {"Authorization": f"Bearer {alice}"}))[0] == 403
        assert (await http_request(port, "GET", f"{route}?token={expired_token('alice')}"))[0] == 401
        assert (await http_request(port, "GET", f"{route}?token={foreign_token('alice')}"))[0] == 401
        # public routes need nothing
        for path in ("/", "/app.js", "/healthz", "/readyz"):
            assert (await http_request(port, "GET", path))[0] == 200, path


async def test_origins() -> None:
    assert origin_allowed(None, "h:1", None)  # not a browser
    assert origin_allowed("http://h:1", "h:1", None) and origin_allowed("https://H", "h", None)
    assert not origin_allowed("http://evil.example", "h:1", None)
    assert not origin_allowed("http://h:2", "h:1", None)
    assert not origin_allowed("null", "h:1", None)
    assert origin_allowed("https://app.example:443", "h", ["https://app.example"])
    assert not origin_allowed("https://app.example.evil", "h", ["https://app.example"])
    assert origin_allowed("https://any.where", "h", ["*"])

    async with server(api_key=API_KEY) as app:
        token = (await mint(app))["token"]
        same = {"Origin": f"http://127.0.0.1:{app.port}"}
        assert await ws_status(app, f"?token={token}", headers=same) == 101
        for origin in ("http://evil.example", "null", f"http://127.0.0.1:{app.port + 1}"):
            assert await ws_status(app, f"?token={token}", headers={"Origin": origin}) == 403, origin
    async with server(allowed_origins=["https://app.example"]) as app:
        assert await ws_status(app, headers={"Origin": "https://app.example"}) == 101
        assert await ws_status(app, headers={"Origin": f"http://127.0.0.1:{app.port}"}) == 403


async def test_zero_config_loopback_server_needs_no_token_but_only_answers_loopback_names() -> None:
    async with server() as app:
        assert await ws_status(app) == 101
        async with connect(f"ws://127.0.0.1:{app.port}/ws", max_size=None) as ws:
            await ws.send(json.dumps({"type": "session.start", "image": png_b64()}))
            assert (await recv_json(ws))["type"] == "session.ready"
        assert (await http_request(app.port, "POST", "/v1/tokens", AUTH))[0] == 404
        # DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends Host: evil.example
        assert (await http_request(app.port, "GET", "/", host=f"evil.example:{app.port}"))[0] == 403
        assert (await http_request(app.port, "GET", "/ws", host="evil.example"))[0] == 403
        for host in (f"localhost:{app.port}", f"[::1]:{app.port}", "127.0.0.1"):
            assert (await http_request(app.port, "GET", "/healthz", host=host))[0] == 200, host


async def test_public_bind_without_a_key_refuses_to_start(monkeypatch, capsys) -> None:
    assert cli.main(["serve", "--host", "0.0.0.0", "--engine", "testpattern"]) == 2
    err = capsys.readouterr().err
    assert "without an api key" in err and "--api-key" in err
    assert startup_problem(Settings(host="0.0.0.0", api_key=API_KEY)) is None
    assert "at least 16" in startup_problem(Settings(host="0.0.0.0", api_key="short"))
    assert "together" in startup_problem(Settings(tls_cert="cert.pem"))
    monkeypatch.setenv("AVATAR_SERVER_API_KEY", API_KEY)
    assert Settings(host="0.0.0.0").api_key.get_secret_value() == API_KEY
    assert API_KEY not in repr(Settings())  # a SecretStr never prints
    monkeypatch.delenv("AVATAR_SERVER_API_KEY")
    app = build_app(Settings(engine="testpattern", port=0), TestPatternEngine())
    app.settings = Settings(engine="testpattern", host="10.255.255.1", port=0)
    try:
        with pytest.raises(ValueError, match="without an api key"):
            await app.start(warm_up=False)  # refused before anything binds
    finally:
        await app.close()


def test_token_issuer() -> None:
    issuer = TokenIssuer(derive_token_secret(API_KEY), default_ttl_s=30, max_ttl_s=60)
    minted = issuer.mint("s1")
    assert issuer.verify(minted.token)["sub"] == "s1"
    with pytest.raises(ValueError):
        issuer.mint("s1", ttl_s=61)
    with pytest.raises(ValueError):
        issuer.mint("no spaces")
    head, payload, signature = minted.token.split(".")
    tampered = jwt.encode(
        {**jwt.decode(minted.token, options={"verify_signature": False}), "sub": "s2"}, "x" * 32, algorithm="HS256"
    ).split(".")[1]
    for bad in (f"{head}.{tampered}.{signature}", expired_token("s1"), foreign_token("s1"), "x" * 5000):
        with pytest.raises(TokenError):
            issuer.verify(bad)


async def test_token_and_key_never_reach_the_log(caplog) -> None:
    """Every logger at DEBUG, the server's included (uvicorn's and websockets' handshake lines
    print the request line with its query string); only the client library's own DEBUG log is
    kept at WARNING, as the CLI does (configure_logging)."""
    caplog.set_level("WARNING", logger="websockets.client")
    caplog.set_level("DEBUG")  # after: set_level also sets the capturing handler's level
    async with server(api_key=API_KEY, max_sessions=4) as app:
        minted = await mint(app, "logged")
        assert await ws_status(app, f"?token={minted['token']}") == 101
        await ws_status(app, f"?token={expired_token('logged')}")
        await asyncio.sleep(0.1)
    assert "logged" in caplog.text  # the log was captured
    assert minted["token"] not in caplog.text and API_KEY not in caplog.text
