"""End to end over real WebRTC: jfk.flac as the client's microphone drives lip-sync, and the
avatar's audio is the user's speech.

The check: the 10 ms RMS envelope of the first 4 s of speech in the file must match the
envelope of the received audio with a normalised cross-correlation above 0.8 at the best lag
(the lag is printed: voice detection + one lip-sync segment + generation + transport).
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from clients.client import AvatarClient
from tests.e2e_support import best_lag_correlation, load_audio, rms_envelope, running_server

pytestmark = pytest.mark.slow

SPEECH_S = 4.0


async def test_microphone_drives_lipsync_with_the_users_audio(media_dir) -> None:
    sent = load_audio(media_dir / "jfk.flac")
    sent_env = rms_envelope(sent)
    onset = int(np.flatnonzero(sent_env > 0.1 * sent_env.max())[0])  # first speech, in 10 ms steps
    reference = sent_env[onset : onset + int(SPEECH_S * 100)]

    async with running_server() as app:
        client = AvatarClient(f"http://127.0.0.1:{app.port}/")
        await client.connect()
        await client.start_session((media_dir / "portrait.png").read_bytes(), "A man speaks at a podium.")
        started_s = time.monotonic()
        await client.start_media(microphone=media_dir / "jfk.flac")
        listening = await client.wait_for("state", lambda m: m.state == "listening", timeout_s=10)
        listening_s = time.monotonic() - started_s
        await client.wait_for("state", lambda m: m.state == "speaking", timeout_s=10)
        speaking_s = time.monotonic() - started_s
        # enough received audio to hold the first SPEECH_S of speech after the lag
        deadline = time.monotonic() + 20
        corr, lag = -1.0, 0
        while time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            received_env = rms_envelope(client.received.audio_samples())
            if received_env.size >= reference.size:
                corr, lag = best_lag_correlation(reference, received_env)
                if corr > 0.8 and lag + reference.size <= received_env.size - 50:
                    break
        await client.close()

    delay_s = (lag - onset) / 100  # received stream time vs. time in the file
    # Level: the speech comes back at the level sent (two aiortc hops, the microphone's and the
    # avatar's, each stereo on the wire; a mono track loses 3 dB in aiortc's Opus upmix, two: 6 dB).
    level = float(np.sqrt(np.mean(received_env[lag : lag + reference.size] ** 2) / np.mean(reference**2)))
    print(
        f"\nlistening after {listening_s:.2f} s, lip-sync on screen after {speaking_s:.2f} s; "
        f"envelope correlation {corr:.3f} at lag {lag / 100:.2f} s in the received stream "
        f"(speech starts {onset / 100:.2f} s into the file: {delay_s:.2f} s later than sent); "
        f"level {level:.2f} x sent ({20 * np.log10(level):.1f} dB)"
    )
    assert listening.state == "listening"
    assert corr > 0.8
    assert 0.8 < level < 1.25, level
