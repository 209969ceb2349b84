"""The avatar as a Pipecat service (:mod:`clients.pipecat_avatar`), end to end: a Pipecat
pipeline with a scripted text source in place of the LLM, our service, and Pipecat's WebRTC
transport (``SmallWebRTCTransport``, aiortc) to a headless viewer, against a real
``avatar-server serve --engine testpattern`` process. Measured at the viewer:

* speech mode: video at 25 fps (22.5-27.5); audio continuous (20 ms pts steps, no arrival
  gap over 500 ms: a stall, not the jitter of a loaded machine); the speaking frames of an
  answer in the order Pipecat gives them (``TTSStartedFrame``, ``BotStartedSpeakingFrame``,
  ``BotStoppedSpeakingFrame``, ``TTSStoppedFrame``: the transport stops the bot on the stop
  frame), once each; every word of a finished answer as a ``TTSTextFrame`` after the
  transport. An ``InterruptionFrame`` mid-sentence: the test pattern's speech clicks once a
  second, and no click reaches the viewer later than 300 ms plus 150 ms (loopback transport,
  load) after it; the server reports ``played_ms``; the words that reached the context before
  the interruption are those of the audio played (2.5 words/s, +-2 words);
* lipsync mode: ``../shared/media/english.wav`` as another TTS's audio; the envelope of the
  audio the service passes on matches the file's (normalised cross-correlation of 10 ms RMS
  envelopes > 0.8 at the best lag, as the microphone test does), and so does the audio at the
  viewer on 40 ms windows. Two more aiortc hops lie between (service -> transport -> viewer,
  all in one process here): on this machine's load (1-minute average 10-15 on 2 cores) the
  viewer's 10 ms figure ranged 0.6-0.99; without the service's audio pre-roll even the 40 ms
  one fell to 0.6 (the transport filled each late packet with silence).

Skipped when Pipecat is not installed (``pip install -e ".[pipecat]"``; CI installs it).
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

pytest.importorskip("pipecat", reason='Pipecat is not installed: pip install -e ".[pipecat]"')

from pipecat.frames.frames import (  # noqa: E402
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
)

from clients.client import split_chunks  # noqa: E402
from clients.pipecat_avatar import AvatarService  # noqa: E402
from tests.browser_support import server_process  # noqa: E402
from tests.e2e_support import best_lag_correlation, load_audio, rms_envelope  # noqa: E402
from tests.pipecat_support import SAMPLE_RATE_HZ, Recorder, pipecat_bot, wait_until  # noqa: E402

pytestmark = pytest.mark.slow

SHORT = "Hello there, this is the avatar speaking through Pipecat."
LONG = "This sentence goes on and on for a long while so that it can be cut off in the middle of it. " * 2
CLICK_LEVEL = 0.3  # the clicks peak at 0.9
SPEAKING = (TTSStartedFrame, TTSStoppedFrame, BotStartedSpeakingFrame, BotStoppedSpeakingFrame)


def clicks_after(audio, start_s: float, end_s: float = float("inf")) -> list[float]:
    """Arrivals of the test pattern's clicks (one at each second of speech; silence between)."""
    return [
        a.arrival_s for a in audio if start_s <= a.arrival_s < end_s and np.abs(a.samples).max() > CLICK_LEVEL
    ]


def llm_response(text: str) -> list:
    """What an LLM service pushes for one answer: start, text in 3-word chunks, end."""
    return [
        LLMFullResponseStartFrame(),
        *(LLMTextFrame(chunk) for chunk in split_chunks(text, 3)),
        LLMFullResponseEndFrame(),
    ]


async def test_speech_mode_streams_in_sync_and_an_interruption_truncates_the_context(
    media_dir, tmp_path
) -> None:
    with server_process(tmp_path) as (url, log_path):
        avatar = AvatarService(url=url, image=(media_dir / "portrait.png").read_bytes(), prompt="A person.")
        reported = []

        @avatar.event_handler("on_avatar_interrupted")
        async def on_interrupted(service, utterance_id, played_ms, heard_text):
            reported.append((utterance_id, played_ms, heard_text))

        async with pipecat_bot([avatar]) as bot:
            viewer, recorder = bot.viewer, bot.recorder
            await wait_until(lambda: len(viewer.video) > 25, 30, "video at the viewer")
            # 1. one answer, spoken to the end
            await bot.worker.queue_frames(llm_response(SHORT))
            await wait_until(lambda: recorder.of(BotStoppedSpeakingFrame), 40, "the bot to stop speaking")
            first = [type(f) for _, f in recorder.of(*SPEAKING)]
            words_first = [f.text for _, f in recorder.of(TTSTextFrame)]
            await asyncio.sleep(1.0)
            # 2. a long answer, interrupted mid-sentence
            mark = len(recorder.frames)
            await bot.worker.queue_frames(llm_response(LONG))
            sent_s = time.monotonic()
            await wait_until(lambda: clicks_after(viewer.audio, sent_s), 30, "speech at the viewer")
            await asyncio.sleep(2.2)
            interrupted_s = time.monotonic()
            await bot.worker.queue_frame(InterruptionFrame())
            await wait_until(lambda: avatar.interruptions, 10, "the server's interrupted")
            await asyncio.sleep(2.5)  # long enough for two more clicks, had the speech gone on
            later = recorder.frames[mark:]
    video, audio = viewer.video, viewer.audio
    span_s = video[-1].arrival_s - video[25].arrival_s
    fps = (len(video) - 26) / span_s
    steps_ms = np.round(np.diff([a.pts_s for a in audio]) * 1000).astype(int)
    gaps_s = np.diff([a.arrival_s for a in audio])
    interruption = avatar.interruptions[0]
    cut = next(i for i, (_, f) in enumerate(later) if isinstance(f, InterruptionFrame))
    words_long = [f.text for _, f in later[:cut] if isinstance(f, TTSTextFrame)]
    before, after = clicks_after(audio, sent_s, interrupted_s), clicks_after(audio, interrupted_s)
    print(
        f"\nviewer: {len(video)} video frames at {fps:.2f} fps, {len(audio)} audio frames, max arrival gap "
        f"{1000 * gaps_s.max():.0f} ms; first answer {[t.__name__ for t in first]}; clicks of the long answer "
        f"{len(before)} before the interruption, {[round(t - interrupted_s, 3) for t in after]} s after it; "
        f"played_ms {interruption.played_ms}; words in the context {len(words_long)}: {' '.join(words_long)!r}"
    )
    assert 22.5 <= fps <= 27.5
    assert set(steps_ms) == {20} and gaps_s.max() < 0.5
    assert first == [TTSStartedFrame, BotStartedSpeakingFrame, BotStoppedSpeakingFrame, TTSStoppedFrame]
    assert words_first == SHORT.split()
    # the speech clicked once a second until the interruption, and fell silent within 0.45 s
    assert len(before) >= 2 and all(t < interrupted_s + 0.45 for t in after)
    assert reported == [(interruption.utterance_id, interruption.played_ms, interruption.heard_text)]
    assert 1500 <= interruption.played_ms <= 6000
    expected_words = interruption.played_ms / 1000 * 2.5
    assert abs(len(words_long) - expected_words) <= 2 and words_long == LONG.split()[: len(words_long)]
    assert len(words_long) < len(LONG.split())
    # after the interruption at most what the transport was handling when the interruption
    # overtook it leaves the transport: one audio chunk and one word
    assert len([f for _, f in later[cut:] if isinstance(f, TTSAudioRawFrame)]) <= 1
    assert len([f for _, f in later[cut:] if isinstance(f, TTSTextFrame)]) <= 1


async def test_lipsync_mode_follows_another_tts_audio(media_dir, tmp_path) -> None:
    speech = load_audio(media_dir / "english.wav", SAMPLE_RATE_HZ)
    pcm = (np.clip(speech, -1, 1) * 32767).astype(np.int16)
    with server_process(tmp_path) as (url, log_path):
        avatar = AvatarService(
            url=url, image=(media_dir / "portrait.png").read_bytes(), prompt="A person.", mode="lipsync"
        )
        out = Recorder()  # what the service passes on, before Pipecat's transport
        async with pipecat_bot([avatar, out]) as bot:
            viewer, recorder = bot.viewer, bot.recorder
            await wait_until(lambda: len(viewer.video) > 25, 30, "video at the viewer")
            # a TTS answers in a burst: 100 ms chunks, all at once
            chunk = SAMPLE_RATE_HZ // 10
            frames = [TTSStartedFrame()]
            frames += [
                TTSAudioRawFrame(
                    audio=pcm[i : i + chunk].tobytes(), sample_rate=SAMPLE_RATE_HZ, num_channels=1
                )
                for i in range(0, pcm.size, chunk)
            ]
            await bot.worker.queue_frames([*frames, TTSStoppedFrame()])
            await wait_until(lambda: recorder.of(BotStoppedSpeakingFrame), 40, "the bot to stop speaking")
            await asyncio.sleep(0.5)
    passed_on = np.concatenate(
        [np.frombuffer(f.audio, np.int16) / 32768.0 for _, f in out.of(TTSAudioRawFrame)]
    )
    service_corr, _ = best_lag_correlation(rms_envelope(speech), rms_envelope(passed_on))
    received = np.concatenate([a.samples for a in viewer.audio])
    fine_corr, _ = best_lag_correlation(rms_envelope(speech), rms_envelope(received))
    corr, lag = best_lag_correlation(rms_envelope(speech, window_ms=40), rms_envelope(received, window_ms=40))
    order = [type(f) for _, f in recorder.of(*SPEAKING)]
    print(
        f"\nlipsync: envelope correlation {service_corr:.3f} out of the service (10 ms), {corr:.3f} at the viewer "
        f"(40 ms; {fine_corr:.3f} on 10 ms) at lag {lag * 0.04:.2f} s; {[t.__name__ for t in order]}"
    )
    assert service_corr > 0.8 and corr > 0.8
    assert order == [TTSStartedFrame, BotStartedSpeakingFrame, BotStoppedSpeakingFrame, TTSStoppedFrame]
