"""Helpers of the end-to-end tests: a server on a free loopback port, and the measurements
made on what the Python client received (flashes, clicks, envelopes)."""

from __future__ import annotations

import asyncio
import contextlib
import wave
from collections.abc import AsyncIterator

import av
import numpy as np

from avatar_server.server import AvatarServer, build_app
from avatar_server.settings import Settings
from clients.media import AudioRecord, VideoRecord
from engine.testpattern import TestPatternEngine
from ops import measure_live

CLICK_LEVEL = 0.3  # the click peaks at 0.9; speech-free test-pattern audio is silent


@contextlib.asynccontextmanager
async def running_server(*, generate_delay_s: float = 0.2, **settings) -> AsyncIterator[AvatarServer]:
    config = {"engine": "testpattern", "port": 0, "max_sessions": 4, **settings}
    app = build_app(Settings(**config), TestPatternEngine(generate_delay_s=generate_delay_s))
    await app.start()
    try:
        for _ in range(300):  # like a load balancer: wait for /readyz (engine and VAD warmed up)
            if app.readiness()[0]:
                break
            await asyncio.sleep(0.05)
        assert app.readiness()[0], app.readiness()
        yield app
    finally:
        await app.close()


def first_paragraph(text: str) -> str:
    return text.strip().strip('"').split("\n\n")[0].strip()


def av_offsets_ms(video: list[VideoRecord], audio: list[AudioRecord]) -> tuple[np.ndarray, np.ndarray]:
    """Audio minus video time of each flash/click pair of the test pattern: by pts and by arrival, in ms
    (the measurement of :func:`ops.measure_live.av_offsets_ms`, at this engine's click level)."""
    by_pts, by_arrival = measure_live.av_offsets_ms(video, audio, click_level=CLICK_LEVEL)
    return np.array(by_pts), np.array(by_arrival)


def load_audio(path, sample_rate: int = 48_000) -> np.ndarray:
    """A file's audio as mono float32 at ``sample_rate`` (channels averaged)."""
    resampler = av.AudioResampler(format="fltp", rate=sample_rate)
    parts = []
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            parts.extend(out.to_ndarray().mean(axis=0) for out in resampler.resample(frame))
    parts.extend(out.to_ndarray().mean(axis=0) for out in resampler.resample(None))
    return np.concatenate(parts).astype(np.float32)


def write_wav_mono16(path, samples: np.ndarray, sample_rate: int = 48_000):
    """Write mono float samples (clipped to [-1, 1]) as a 16-bit PCM WAV; returns ``path``."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def rms_envelope(samples: np.ndarray, sample_rate: int = 48_000, window_ms: int = 10) -> np.ndarray:
    size = sample_rate * window_ms // 1000
    count = samples.size // size
    return np.sqrt((samples[: count * size].reshape(count, size) ** 2).mean(axis=1))


def best_lag_correlation(reference: np.ndarray, signal: np.ndarray) -> tuple[float, int]:
    """Highest normalised cross-correlation of ``reference`` against windows of ``signal``,
    and the lag (in envelope steps) where it occurs."""
    n = reference.size
    ref = (reference - reference.mean()) / (reference.std() + 1e-12)
    best = (-1.0, 0)
    for lag in range(0, signal.size - n + 1):
        window = signal[lag : lag + n]
        std = window.std()
        if std == 0:
            continue
        corr = float(np.dot(ref, (window - window.mean()) / std) / n)
        if corr > best[0]:
            best = (corr, lag)
    return best
