"""Microphone: silero-vad on real speech, hysteresis, lip-sync audio taken in order."""

from __future__ import annotations

import asyncio
import fractions

import av
import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from streaming.microphone import MIC_SAMPLE_RATE_HZ, Microphone, _Ring


def decode_frames(path) -> list[av.AudioFrame]:
    """The file as 20 ms 48 kHz stereo s16 frames, as aiortc's Opus decoder delivers them."""
    resampler = av.AudioResampler(format="s16", layout="stereo", rate=48_000, frame_size=960)
    frames: list[av.AudioFrame] = []
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            frames.extend(resampler.resample(frame))
    frames.extend(resampler.resample(None))
    for index, frame in enumerate(frames):
        frame.pts = index * 960
        frame.time_base = fractions.Fraction(1, 48_000)
    return frames


def mono(frames: list[av.AudioFrame]) -> np.ndarray:
    return np.concatenate([f.to_ndarray().reshape(-1, 2).mean(axis=1) / 32768.0 for f in frames]).astype(np.float32)


class FileTrack(MediaStreamTrack):
    kind = "audio"

    def __init__(self, frames: list[av.AudioFrame]) -> None:
        super().__init__()
        self._frames = list(frames)

    async def recv(self) -> av.AudioFrame:
        await asyncio.sleep(0)
        if not self._frames:
            raise MediaStreamError
        return self._frames.pop(0)


@pytest.fixture(scope="module")
def jfk_frames(request) -> list[av.AudioFrame]:
    from tests.conftest import MEDIA_DIR

    path = MEDIA_DIR / "jfk.flac"
    if not path.exists():
        pytest.skip("shared media not found")
    return decode_frames(path)


async def test_real_speech_is_detected_and_taken_in_order(jfk_frames) -> None:
    changes: list[bool] = []
    mic = Microphone(on_change=changes.append)
    mic.attach(FileTrack(jfk_frames))
    for _ in range(3000):
        if mic.ended:
            break
        await asyncio.sleep(0.01)
    await mic.close()
    assert mic.ended

    spans = mic.voiced_spans_s()
    print("voiced spans (s):", [(round(a, 2), round(b, 2)) for a, b in spans])
    assert changes[0] is True and changes[-1] is False
    assert 0.1 < spans[0][0] < 0.8  # "And so my fellow Americans" starts at about 0.3 s
    voiced_s = sum(b - a for a, b in spans)
    assert 5.0 < voiced_s < 11.0
    assert mic.received_s == pytest.approx(len(jfk_frames) * 0.02, abs=0.03)

    # lip-sync audio starts at the first span (minus the pre-roll) and is the input itself
    sent = mono(jfk_frames)
    first = mic.take_audio(1.0)
    start = round((spans[0][0] - 0.2) * MIC_SAMPLE_RATE_HZ)
    np.testing.assert_allclose(first, sent[start : start + 48_000], atol=1e-3)
    second = mic.take_audio(0.5)
    np.testing.assert_allclose(second, sent[start + 48_000 : start + 72_000], atol=1e-3)


def test_hysteresis_with_a_scripted_scorer() -> None:
    mic = Microphone(hangover_ms=96.0, min_speech_ms=64.0, preroll_ms=0.0, scorer_factory=lambda: None)
    window = 512 * 3  # 48 kHz samples per 16 kHz VAD window
    mic.push_samples(np.zeros(window * 20, np.float32))
    script = [0.1, 0.9, 0.1, 0.1, 0.1, 0.1, 0.9, 0.9, 0.4, 0.4, 0.1, 0.1, 0.1, 0.1, 0.1]
    mic.push_scores(script)
    # a single voiced window is not speech; two are (64 ms); 0.4 keeps a started span alive
    assert mic.spans == [(6 * window, 10 * window)]
    assert not mic.speaking
    # the run goes on through the pause (shorter than run_gap_ms so far)
    assert mic.run_active and not mic.run_closing and mic.run_id == 1
    assert mic.available_s() == pytest.approx(14 * window / 48_000)
    assert mic.voiced_remaining_s() == pytest.approx(4 * window / 48_000)
    mic.push_samples(np.zeros(48_000 * 3 // 2, np.float32))
    assert mic.run_closing
    mic.take_audio(mic.voiced_remaining_s())
    assert not mic.run_active and mic.available_s() == 0.0


def test_ring_keeps_the_latest_history() -> None:
    ring = _Ring(10)
    ring.write(np.arange(7, dtype=np.float32))
    ring.write(np.arange(7, 13, dtype=np.float32))
    assert (ring.start, ring.end) == (3, 13)
    np.testing.assert_array_equal(ring.read(3, 10), np.arange(3, 13))
    np.testing.assert_array_equal(ring.read(0, 5), [0, 0, 0, 3, 4])  # lost history reads as zeros
    np.testing.assert_array_equal(ring.read(11, 4), [11, 12, 0, 0])
