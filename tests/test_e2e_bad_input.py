"""Bad input on a live connection gets error frames; the same connection then runs a good
session over WebRTC, and the server keeps serving others."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from avatar_server import protocol
from clients.client import AvatarClient
from tests.e2e_support import running_server

pytestmark = pytest.mark.slow


async def test_bad_input_then_a_good_session(media_dir) -> None:
    portrait = (media_dir / "portrait.png").read_bytes()
    async with running_server(limits={"max_text_chars": 200, "max_utterance_chars": 400}) as app:
        client = AvatarClient(f"http://127.0.0.1:{app.port}/")
        await client.connect()
        bad = [
            ('{"type": "teleport"}', "unknown_type"),
            ('{"type": "speak", "utterance_id": "u0"', "bad_json"),
            (json.dumps({"type": "speak", "utterance_id": "u0", "text": "too early"}), "no_session"),
            (json.dumps({"type": "session.start", "image": base64.b64encode(b"%PDF-1.4 not an image").decode()}), "image_invalid"),
            (json.dumps({"type": "session.start", "image": base64.b64encode(b"\0" * (9 << 20)).decode()}), "image_too_large"),
        ]
        for raw, code in bad:
            await client.send(raw)
            reply = await client.wait_for("error", timeout_s=10)
            assert reply.code == code, (code, reply)
            assert reply.message

        await client.start_session(portrait, "A man at a counter.")
        await client.start_media()
        await client.send(protocol.Speak.model_construct(type="speak", utterance_id="long", text="x" * 201))
        reply = await client.wait_for("error", timeout_s=10)
        assert reply.code == "text_too_long" and "max_text_chars = 200" in reply.message
        for _ in range(2):
            await client.speak_chunk("u1", "word " * 40)
        await client.speak_chunk("u1", "word " * 40)
        reply = await client.wait_for("error", timeout_s=10)
        assert reply.code == "utterance_too_long" and "max_utterance_chars = 400" in reply.message
        await client.interrupt()
        await client.wait_for("interrupted", timeout_s=10)
        await client.speak("u2", ["Still here, and still talking."], language="English")
        await client.wait_for("speak.ended", lambda m: m.utterance_id == "u2", timeout_s=20)

        # a second client is served at the same time
        other = AvatarClient(f"http://127.0.0.1:{app.port}/")
        await other.connect()
        await other.start_session(portrait)
        await other.start_media()
        await asyncio.sleep(1.0)
        await other.close()
        await client.close()
    assert len(client.received.video) > 50 and len(other.received.video) > 10
    assert {(v.width, v.height) for v in client.received.video} == {(224, 128)}
