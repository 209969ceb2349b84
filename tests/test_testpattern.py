"""TestPatternEngine: frame/audio timeline, flash <-> click alignment, counter, cancel, delay."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from engine.api import (
    CancelledError,
    EngineInputError,
    SegmentEngine,
    SegmentKind,
    SegmentRequest,
    segment_frame_count,
)
from engine.testpattern import TestPatternEngine, decode_counter, is_flash_frame


@pytest.fixture
def engine() -> TestPatternEngine:
    return TestPatternEngine()


@pytest.fixture
def identity(engine: TestPatternEngine):
    image = np.random.default_rng(0).integers(0, 255, (720, 1280, 3), dtype=np.uint8)
    return engine.prepare_identity(image, "appearance")


def test_is_a_segment_engine(engine: TestPatternEngine) -> None:
    assert isinstance(engine, SegmentEngine)
    assert (engine.width, engine.height, engine.fps, engine.sample_rate) == (224, 128, 25, 48_000)


def test_prepare_identity_resizes_and_rejects_bad_images(engine: TestPatternEngine, identity) -> None:
    assert identity.image.shape == (128, 224, 3) and identity.appearance == "appearance"
    with pytest.raises(EngineInputError, match="image"):
        engine.prepare_identity(np.zeros((10, 10), np.uint8), "")


@pytest.mark.parametrize("seconds", [1.0, 2.0, 5.0])
def test_timeline_flash_and_click_line_up(engine: TestPatternEngine, identity, seconds: float) -> None:
    seg = engine.generate(SegmentRequest(identity=identity, kind=SegmentKind.SPEAK, seconds=seconds))
    count = segment_frame_count(seconds)
    assert seg.frames.shape == (count, 128, 224, 3) and seg.frames.dtype == np.uint8
    assert seg.audio.shape == (round(count / 25 * 48_000),) and seg.audio.dtype == np.float32
    flashes = [i for i in range(count) if is_flash_frame(seg.frames[i])]
    assert flashes == list(range(0, count, 25))
    # a 5 ms click (240 samples) starts at the first sample of each flash frame; silence elsewhere
    click = np.zeros(seg.audio.size, dtype=bool)
    for frame in flashes:
        click[frame * 1920 : frame * 1920 + 240] = True
        assert np.abs(seg.audio[frame * 1920 : frame * 1920 + 24]).max() > 0.5  # loud within 0.5 ms
    assert not seg.audio[~click].any()
    assert np.abs(seg.audio).max() <= 1.0


def test_counter_continues_through_the_continuation(engine: TestPatternEngine, identity) -> None:
    first = engine.generate(SegmentRequest(identity=identity, seconds=1.0))
    assert [decode_counter(f) for f in first.frames] == list(range(25))
    second = engine.generate(SegmentRequest(identity=identity, seconds=1.0, continue_from=first.continuation))
    assert [decode_counter(f) for f in second.frames] == list(range(25, 50))
    np.testing.assert_array_equal(first.continuation.last_frame, first.frames[-1])


def test_lipsync_audio_is_the_input_resampled_and_fitted(engine: TestPatternEngine, identity) -> None:
    rate = 16_000
    t = np.arange(3 * rate) / rate
    audio = (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    seg = engine.generate(
        SegmentRequest(identity=identity, kind=SegmentKind.LIPSYNC, seconds=2.0, audio=audio, audio_sample_rate=rate)
    )
    assert seg.audio.shape == (49 * 1920,)
    expected = (0.5 * np.sin(2 * np.pi * 220 * np.arange(seg.audio.size) / 48_000)).astype(np.float32)
    # away from the resampler's edges the waveform is the input's
    np.testing.assert_allclose(seg.audio[1000:-1000], expected[1000:-1000], atol=0.02)
    with pytest.raises(EngineInputError, match="audio"):
        engine.generate(SegmentRequest(identity=identity, kind=SegmentKind.LIPSYNC, seconds=1.0))


def test_bad_seconds_is_an_input_error(engine: TestPatternEngine, identity) -> None:
    for seconds in (0.0, -1.0, 11.0):
        with pytest.raises(EngineInputError, match="seconds"):
            engine.generate(SegmentRequest(identity=identity, seconds=seconds))


def test_generate_delay_and_cancel() -> None:
    engine = TestPatternEngine(generate_delay_s=0.3)
    identity = engine.prepare_identity(np.zeros((64, 64, 3), np.uint8), "")
    started = time.monotonic()
    engine.generate(SegmentRequest(identity=identity, seconds=1.0))
    assert time.monotonic() - started >= 0.3

    cancel = threading.Event()
    threading.Timer(0.05, cancel.set).start()
    started = time.monotonic()
    with pytest.raises(CancelledError):
        engine.generate(SegmentRequest(identity=identity, seconds=1.0), cancel)
    assert time.monotonic() - started < 0.2


@pytest.mark.parametrize("kind", [SegmentKind.SPEAK, SegmentKind.LIPSYNC])
def test_chunks_tile_the_segment_exactly(identity, kind) -> None:
    """``on_chunk`` gets the segment in ``chunk_frames`` pieces whose frames and audio concatenate to
    the returned segment exactly (issue 17); 1.0 s = 25 frames at 48 kHz (1,920 samples a frame)."""
    engine = TestPatternEngine(chunk_frames=10)
    chunks = []
    audio = np.random.default_rng(1).uniform(-0.5, 0.5, 16_000).astype(np.float32)
    request = SegmentRequest(identity=identity, kind=kind, seconds=1.0, audio=audio, audio_sample_rate=16_000)
    segment = engine.generate(request, on_chunk=chunks.append)
    assert [(c.start_frame, c.num_frames, c.last) for c in chunks] == [(0, 10, False), (10, 10, False), (20, 5, True)]
    assert all(c.total_frames == 25 and c.sample_rate == 48_000 and c.fps == 25 for c in chunks)
    assert [c.audio.shape[0] for c in chunks] == [19_200, 19_200, 9_600]
    assert np.array_equal(np.concatenate([c.frames for c in chunks]), segment.frames)
    assert np.array_equal(np.concatenate([c.audio for c in chunks]), segment.audio)


def test_cancel_between_chunks_stops_the_stream(identity) -> None:
    engine = TestPatternEngine(chunk_frames=5, chunk_delay_s=0.2)
    cancel = threading.Event()
    chunks = []

    def on_chunk(chunk) -> None:
        chunks.append(chunk)
        cancel.set()  # the worker's relay returns at once; the next wait sees the event

    started = time.monotonic()
    with pytest.raises(CancelledError):
        engine.generate(SegmentRequest(identity=identity, seconds=1.0), cancel, on_chunk)
    assert len(chunks) == 1 and time.monotonic() - started < 0.15
