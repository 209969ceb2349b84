"""Parts of the Python client that need no server: server frames parsed into the protocol
models, refusals matched on code (or ``in_reply_to``), and the pushed microphone track."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from pydantic import ValidationError

from avatar_server import protocol
from clients.client import SERVER_MODELS, RefusedError, answers, parse_server_message, split_chunks, ws_url
from clients.media import PushAudioTrack


def test_server_frames_become_their_models() -> None:
    ended = parse_server_message('{"type": "speak.ended", "utterance_id": "u1", "played_ms": 1234}')
    assert isinstance(ended, protocol.SpeakEnded) and (ended.utterance_id, ended.played_ms) == ("u1", 1234)
    resumed = parse_server_message(
        '{"type": "session.resumed", "session_id": "s", "width": 224, "height": 128, "fps": 25,'
        ' "sample_rate": 48000, "engine": "testpattern", "resume_token": "t", "a_newer_field": 1}'
    )
    assert type(resumed) is protocol.SessionResumed and resumed.resume_token == "t"
    assert SERVER_MODELS["session.ready"] is protocol.SessionReady
    assert SERVER_MODELS["session.resumed"] is protocol.SessionResumed
    with pytest.raises(ValidationError):
        parse_server_message('{"type": "no.such.frame"}')
    with pytest.raises(ValidationError):
        parse_server_message('{"type": "speak.ended", "utterance_id": "u1"}')  # played_ms missing


def test_refusals_are_matched_on_code_not_text() -> None:
    codes = frozenset({"recording_active", "no_session"})
    active = protocol.ErrorMessage(code="recording_active", message="anything at all")
    other = protocol.ErrorMessage(code="text_too_long", message="record.start: looks like a reply, is not")
    assert answers(active, "record.start", codes) and not answers(other, "record.start", codes)
    error = RefusedError("record.start", active)
    assert (
        error.code == "recording_active"
        and str(error) == "record.start refused: recording_active: anything at all"
    )


def test_chunks_and_urls() -> None:
    assert split_chunks("one two three four five", 2) == ["one two ", "three four ", "five"]
    assert "".join(split_chunks("a b c d", 3)) == "a b c d"
    assert ws_url("http://127.0.0.1:8080/") == "ws://127.0.0.1:8080/ws"
    assert ws_url("https://example.org") == "wss://example.org/ws"


async def test_pushed_audio_plays_at_real_time_then_silence() -> None:
    track = PushAudioTrack(48_000)
    samples = (np.arange(1440) % 100 + 1).astype(np.int16)  # 30 ms, no zero sample
    track.push(samples)
    assert track.queued_samples == 1440
    start_s = time.monotonic()
    frames = [await track.recv() for _ in range(4)]
    elapsed_s = time.monotonic() - start_s
    data = [f.to_ndarray().reshape(-1) for f in frames]
    assert [f.pts for f in frames] == [0, 960, 1920, 2880] and all(f.samples == 960 for f in frames)
    assert np.array_equal(data[0], samples[:960])
    assert np.array_equal(data[1][:480], samples[960:]) and not data[1][480:].any()
    assert not data[2].any() and track.sent_samples == 1440
    assert 0.055 <= elapsed_s < 0.5  # frame 3 is due 60 ms after the first
    track.push(samples)
    assert track.clear() == 1440 and track.queued_samples == 0
    with pytest.raises(ValueError, match="samples: need mono int16"):
        track.push(np.zeros(10, np.float32))
    track.stop()
    with pytest.raises(Exception):  # noqa: B017 - aiortc's MediaStreamError
        await asyncio.wait_for(track.recv(), 1)
