"""Session resume: a session whose WebSocket drops abnormally is parked for
``session_resume_grace_s`` and taken over by ``session.resume`` on a new WebSocket.

* the resumed session is the same (id, slot, peer connection and media over real WebRTC), the
  messages of the gap are replayed in order, the token is rotated and single-use;
* the per-address / per-token counts are exactly those of one live session after a resume,
  also from another address, and zero after a parked session ends (grace expiry, drain);
* a normal close (1000) and resume off (grace 0) end the session at once, as before;
* bad tokens (oversized, garbage, another session's, expired) get a clear error and never
  hurt the server or another session.

All on loopback with the test-pattern engine; one test runs real WebRTC.
"""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from websockets.asyncio.client import connect

from avatar_server import protocol
from avatar_server.settings import Limits
from tests.security_support import API_KEY, png_b64, recv_json, server, settle

GRACE_S = 30.0


def counts(app) -> dict:
    """The server-wide accounting that a session and its WebSocket hold."""
    admission = app.admission
    return {
        "sessions_active": app.sessions_active,
        "parked": app.sessions_parked,
        "connections": dict(admission.connections_by_address),
        "sessions": dict(admission.sessions_by_address),
        "tokens": sum(admission.sessions_by_token.values()),
        "session_ids": len(admission.running_session_ids),
        "resumable": len(app.resumable),
    }


def one_session(address: str = "127.0.0.1", *, connections: int = 1, parked: int = 0, tokens: int = 0) -> dict:
    return {
        "sessions_active": 1,
        "parked": parked,
        "connections": {address: connections} if connections else {},
        "sessions": {address: 1},
        "tokens": tokens,
        "session_ids": 1,
        "resumable": 1,
    }


NOTHING = {
    "sessions_active": 0, "parked": 0, "connections": {}, "sessions": {}, "tokens": 0, "session_ids": 0,
    "resumable": 0,
}


def metric(app, line_start: str) -> float:
    for line in app.metrics.render().decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


async def start(app, **kwargs):
    ws = await connect(f"ws://127.0.0.1:{app.port}/ws", max_size=None, **kwargs)
    await ws.send(json.dumps({"type": "session.start", "image": png_b64()}))
    ready = await recv_json(ws)
    assert ready["type"] == "session.ready", ready
    return ws, ready


async def resume(app, token: str, **kwargs):
    ws = await connect(f"ws://127.0.0.1:{app.port}/ws", max_size=None, **kwargs)
    await ws.send(json.dumps({"type": "session.resume", "resume_token": token}))
    reply = await recv_json(ws)
    return ws, reply


def drop(ws) -> None:
    """Lose the connection without a close frame (as a Wi-Fi hiccup does): the server sees 1006."""
    ws.transport.abort()


def parked_connection(app):
    return next(conn for conn in app.resumable.values() if conn.parked)


# ------------------------------------------------------------------------------- protocol
def test_session_resume_token_is_validated() -> None:
    limits = Limits()
    ok = protocol.parse_client_message(json.dumps({"type": "session.resume", "resume_token": "a" * 43}), limits)
    assert isinstance(ok, protocol.SessionResume)
    for token, needle in (("a" * 129, "at most 128"), ("", "at least 1"), (12345, "string"), (None, "string")):
        error = protocol.parse_client_message(json.dumps({"type": "session.resume", "resume_token": token}), limits)
        assert isinstance(error, protocol.ErrorMessage), token
        assert error.code == "invalid_field" and error.field == "resume_token" and needle in error.message, error
    missing = protocol.parse_client_message('{"type": "session.resume"}', limits)
    assert missing.code == "invalid_field" and missing.field == "resume_token"


# ------------------------------------------------------------------------------- park / resume
async def test_abnormal_drop_parks_and_resume_takes_over_from_another_address() -> None:
    async with server(session_resume_grace_s=GRACE_S) as app:
        ws, ready = await start(app)
        token = ready["resume_token"]
        assert ready["resume_grace_s"] == GRACE_S and isinstance(token, str) and len(token) >= 43
        await ws.send(json.dumps({"type": "speak", "utterance_id": "u1", "text": "Hello there."}))
        await asyncio.sleep(0.2)
        assert counts(app) == one_session()
        drop(ws)
        assert await settle(lambda: app.sessions_parked == 1, 5)
        assert counts(app) == one_session(connections=0, parked=1)  # the slot and session counts stay
        conn = parked_connection(app)
        assert conn.session.utterances.is_open("u1")  # moves with the session
        for _ in range(3):  # stats are not kept; events are
            conn.send(protocol.Stats(buffer_ms=0, underruns=0, segments=0, frames_sent=0, state="idle"))
        conn.send(protocol.State(state="speaking"))

        ws2, resumed = await resume(app, token, local_addr=("127.0.0.2", 0))
        assert resumed["type"] == "session.resumed", resumed
        assert resumed["session_id"] == ready["session_id"] and resumed["resume_token"] != token
        assert resumed["missed_messages"] == 1 and resumed["dropped_messages"] == 0
        assert resumed["peer_connection"] is None and resumed["width"] == ready["width"]
        assert (await recv_json(ws2, skip=("stats",))) == {"type": "state", "state": "speaking"}
        # Exactly one session, now counted for the new address; the old address holds nothing.
        assert counts(app) == one_session("127.0.0.2")
        assert [u.utterance_id for u in conn.session.utterances] == ["u1"]
        await ws2.send(json.dumps({"type": "speak.end", "utterance_id": "u1"}))
        await ws2.send(json.dumps({"type": "interrupt"}))
        reply = await recv_json(ws2)
        assert reply["type"] == "interrupted" and reply["utterance_id"] == "u1"

        # The old token no longer works, nor does the new one once used on another connection.
        ws3, refused = await resume(app, token)
        assert refused["type"] == "error" and refused["code"] == "resume_failed"
        assert refused["message"] == "resume_token: unknown or expired" and refused["field"] == "resume_token"
        await ws3.close()
        await ws2.close()
        assert await settle(lambda: counts(app) == NOTHING, 5), counts(app)
        assert metric(app, 'avatar_server_sessions_ended_total{reason="closed"}') == 1
        assert metric(app, 'avatar_server_session_resumes_total{result="resumed"}') == 1
        assert metric(app, 'avatar_server_session_resumes_total{result="failed"}') == 1


async def test_a_resume_takes_over_a_websocket_the_server_has_not_seen_drop() -> None:
    """Mobile handover: the old TCP connection is half-open (the server would only notice at
    the keepalive timeout); the client resumes at once on a new one and the old one is dropped."""
    async with server(session_resume_grace_s=GRACE_S) as app:
        ws, ready = await start(app)
        ws2, resumed = await resume(app, ready["resume_token"])
        assert resumed["type"] == "session.resumed" and resumed["session_id"] == ready["session_id"]
        async with asyncio.timeout(5):
            await ws.wait_closed()  # the server dropped the old connection
        assert await settle(lambda: counts(app) == one_session(), 5), counts(app)
        await ws2.send(json.dumps({"type": "interrupt"}))
        assert (await recv_json(ws2))["type"] == "interrupted"
        await ws2.close()
        assert await settle(lambda: counts(app) == NOTHING, 5), counts(app)


async def test_kept_messages_are_bounded_and_the_loss_is_reported() -> None:
    async with server(session_resume_grace_s=GRACE_S, limits={"max_send_queue_messages": 8}) as app:
        ws, ready = await start(app)
        drop(ws)
        assert await settle(lambda: app.sessions_parked == 1, 5)
        conn = parked_connection(app)
        kept_before = len(conn.missed_messages)  # what the session queued before this test's frames
        for number in range(10):
            conn.send(protocol.ErrorMessage(code="internal", message=str(number)))
        assert [m.message for m in conn.missed_messages] == ["6", "7", "8", "9"]  # the bound: 8 // 2
        ws2, resumed = await resume(app, ready["resume_token"])
        assert resumed["missed_messages"] == 4 and resumed["dropped_messages"] == 6 + kept_before
        replayed = [await recv_json(ws2) for _ in range(4)]
        assert [m["message"] for m in replayed] == ["6", "7", "8", "9"]  # the newest, in order
        await ws2.close()


# ------------------------------------------------------------------------------- ending
async def test_grace_expiry_ends_the_parked_session_and_frees_everything(tmp_path) -> None:
    async with server(session_resume_grace_s=0.5, recordings_dir=tmp_path) as app:
        ws, ready = await start(app)
        await ws.send(json.dumps({"type": "record.start"}))
        assert (await recv_json(ws))["type"] == "record.started"
        await asyncio.sleep(0.3)
        drop(ws)
        assert await settle(lambda: app.sessions_parked == 1, 5)
        assert await settle(lambda: app.sessions_active == 0, 5)
        assert counts(app) == NOTHING and app.admission.recordings_running == 0
        assert metric(app, 'avatar_server_sessions_ended_total{reason="resume_timeout"}') == 1
        # finished as when a session ends (no media flowed without a peer connection: no file)
        assert metric(app, 'avatar_server_recordings_stopped_total{reason="session_ended"}') == 1
        assert metric(app, "avatar_server_sessions_parked") == 0
        ws2, late = await resume(app, ready["resume_token"])
        assert late["code"] == "resume_failed" and "unknown or expired" in late["message"]
        await ws2.close()
        assert await settle(lambda: counts(app) == NOTHING, 5), counts(app)


@pytest.mark.parametrize("code", [1000, 1001])
async def test_a_normal_close_ends_the_session_at_once(code) -> None:
    async with server(session_resume_grace_s=GRACE_S) as app:
        ws, ready = await start(app)
        await ws.close(code)
        assert await settle(lambda: app.sessions_active == 0, 5)
        assert counts(app) == NOTHING
        assert metric(app, 'avatar_server_sessions_ended_total{reason="closed"}') == 1
        ws2, refused = await resume(app, ready["resume_token"])
        assert refused["code"] == "resume_failed"
        await ws2.close()


async def test_resume_off_behaves_as_before() -> None:
    async with server(session_resume_grace_s=0) as app:
        ws, ready = await start(app)
        assert ready["resume_token"] is None and ready["resume_grace_s"] == 0
        drop(ws)
        assert await settle(lambda: app.sessions_active == 0, 5)
        assert counts(app) == NOTHING
        assert metric(app, 'avatar_server_sessions_ended_total{reason="closed"}') == 1


async def test_drain_and_close_end_parked_sessions() -> None:
    async with server(session_resume_grace_s=GRACE_S, max_sessions=2) as app:
        ws, ready = await start(app)
        drop(ws)
        assert await settle(lambda: app.sessions_parked == 1, 5)
        await app.drain(1.0)
        assert counts(app) == NOTHING
        assert metric(app, 'avatar_server_sessions_ended_total{reason="shutdown"}') == 1
        assert app.resume_target(ready["resume_token"]) is None
    async with server(session_resume_grace_s=GRACE_S) as app:
        ws, _ = await start(app)
        drop(ws)
        assert await settle(lambda: app.sessions_parked == 1, 5)
        await app.close()
        assert counts(app) == NOTHING


async def test_idle_timeout_still_ends_a_parked_session() -> None:
    async with server(session_resume_grace_s=GRACE_S, session_idle_timeout_s=0.6) as app:
        ws, _ = await start(app)
        drop(ws)
        assert await settle(lambda: app.sessions_active == 0, 5)
        assert counts(app) == NOTHING
        assert metric(app, 'avatar_server_sessions_ended_total{reason="idle_timeout"}') == 1


# ------------------------------------------------------------------------------- bad input
async def test_bad_resume_requests_get_clear_errors_and_hurt_nothing() -> None:
    async with server(session_resume_grace_s=GRACE_S, max_sessions=2) as app:
        ws, ready = await start(app)
        other = await connect(f"ws://127.0.0.1:{app.port}/ws", max_size=None)
        for token in ("x" * 129, "", "\x00" * 64, "not-a-token", 7, ["list"], {"a": 1}):
            await other.send(json.dumps({"type": "session.resume", "resume_token": token}))
            error = await recv_json(other)
            assert error["type"] == "error" and error["field"] == "resume_token", error
            assert error["code"] in ("invalid_field", "resume_failed") and len(error["message"]) < 200
        await other.send(b'{"type": "session.resume", "resume_token": "\xff\xfe"}')
        assert (await recv_json(other))["type"] == "error"
        # A connection with a session cannot resume another (nor its own).
        await ws.send(json.dumps({"type": "session.resume", "resume_token": ready["resume_token"]}))
        assert (await recv_json(ws))["code"] == "session_exists"
        # The bad requests left the connection usable and the session untouched.
        await other.send(json.dumps({"type": "session.start", "image": png_b64()}))
        assert (await recv_json(other))["type"] == "session.ready"
        await ws.send(json.dumps({"type": "interrupt"}))
        assert (await recv_json(ws))["type"] == "interrupted"
        await other.close()
        await ws.close()
        assert await settle(lambda: counts(app) == NOTHING, 5), counts(app)


async def test_with_an_api_key_only_the_sessions_token_may_resume() -> None:
    async with server(session_resume_grace_s=GRACE_S, api_key=API_KEY, max_sessions=2) as app:
        mine = app.auth.issuer.mint("alice").token
        theirs = app.auth.issuer.mint("bob").token
        ws, ready = await start(app, additional_headers={"Authorization": f"Bearer {mine}"})
        drop(ws)
        assert await settle(lambda: app.sessions_parked == 1, 5)
        wrong, refused = await resume(
            app, ready["resume_token"], additional_headers={"Authorization": f"Bearer {theirs}"}
        )
        assert refused["code"] == "resume_failed" and refused["message"] == "resume_token: unknown or expired"
        await wrong.close()
        fresh = app.auth.issuer.mint("alice").token  # a new token of the same session
        ws2, resumed = await resume(
            app, ready["resume_token"], additional_headers={"Authorization": f"Bearer {fresh}"}
        )
        assert resumed["type"] == "session.resumed" and resumed["session_id"] == "alice"
        assert counts(app) == one_session(tokens=1)
        (conn,) = app.connections
        assert dict(app.admission.sessions_by_token) == {conn.grant.token_id: 1}  # the new token's
        await ws2.close()
        assert await settle(lambda: counts(app) == NOTHING, 5), counts(app)


# ------------------------------------------------------------------------------- over WebRTC
@pytest.mark.slow
async def test_media_and_events_survive_a_signalling_drop_over_webrtc() -> None:
    """The avatar speaks; the WebSocket drops mid-utterance; media keeps arriving over the
    untouched peer connection; the utterance ends during the gap; ``resume()`` gets its
    ``speak.ended`` among the replayed messages, and the stream never restarted."""
    from clients.client import AvatarClient, split_chunks

    async with server(session_resume_grace_s=GRACE_S, testpattern_delay_s=0.05, warm_up=True) as app:
        client = AvatarClient(f"http://127.0.0.1:{app.port}/", keep_audio=False)
        await client.connect()
        ready = await client.start_session(base64.b64decode(png_b64()))  # resume() replaces client.session
        await client.start_media()
        pc = client.pc
        await client.speak("u1", split_chunks("One short sentence for the gap.", 2))
        await client.wait_for("speak.started", timeout_s=20)
        drop(client.websocket)
        assert await settle(lambda: app.sessions_parked == 1, 5)
        frames_at_drop = len(client.received.video)
        conn = parked_connection(app)
        assert await settle(
            lambda: any(isinstance(m, protocol.SpeakEnded) for m in conn.missed_messages), 20
        ), "the utterance did not end during the gap"
        frames_in_gap = len(client.received.video) - frames_at_drop
        resumed = await client.resume()
        assert resumed.session_id == ready.session_id
        assert resumed.resume_token != ready.resume_token and resumed.peer_connection == "connected"
        ended = await client.wait_for("speak.ended", timeout_s=5)
        assert ended.utterance_id == "u1"
        types = [m.type for _, m in client.received.messages]
        after = types[types.index("session.resumed") + 1 :]
        assert "speak.ended" in after[: resumed.missed_messages] and "stats" not in after[: resumed.missed_messages]
        assert counts(app) == one_session()
        frames_after_resume = len(client.received.video)
        await asyncio.sleep(1.0)
        frames_later = len(client.received.video)
        assert client.pc is pc and pc.connectionState == "connected"
        pts = [v.pts_s for v in client.received.video]
        await client.close()
        assert await settle(lambda: counts(app) == NOTHING, 10), counts(app)
    print(f"\nframes: {frames_in_gap} during the gap, {frames_later - frames_after_resume} in 1 s after resume")
    assert frames_in_gap >= 10 and frames_later - frames_after_resume >= 15
    assert all(b > a for a, b in zip(pts, pts[1:], strict=False))  # one timeline: no restart


async def test_python_client_resumes_by_itself() -> None:
    from clients.client import AvatarClient

    async with server(session_resume_grace_s=GRACE_S) as app:
        client = AvatarClient(f"http://127.0.0.1:{app.port}/", auto_resume=True)
        await client.connect()
        ready = await client.start_session(base64.b64decode(png_b64()))
        drop(client.websocket)
        resumed = await client.wait_for("session.resumed", timeout_s=10)
        assert resumed.session_id == ready.session_id
        assert await settle(lambda: client.resumes == 1, 5)
        assert client.session.resume_token == resumed.resume_token != ready.resume_token
        await client.interrupt()
        assert (await client.wait_for("interrupted")).utterance_id is None
        assert counts(app) == one_session()
        await client.close()
        assert await settle(lambda: counts(app) == NOTHING, 5), counts(app)
        assert metric(app, 'avatar_server_sessions_ended_total{reason="closed"}') == 1
