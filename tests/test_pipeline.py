"""The preview engine end to end: segment geometry, continuation, lip-sync, cancel, super-resolution.

Uses the real reference image and prompt from shared/media; the weights are seeded and
untrained, so the checks are on structure, determinism and timing arithmetic, not on looks.
"""

from __future__ import annotations

import threading
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from engine.api import (
    CancelledError,
    Continuation,
    EngineInputError,
    SegmentKind,
    SegmentRequest,
    segment_frame_count,
)
from engine.factory import build_preview_engine

MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return build_preview_engine(seed=0, sr=True)


@pytest.fixture(scope="module")
def identity(engine):
    image = np.asarray(Image.open(MEDIA / "portrait.png").convert("RGB"))
    return engine.prepare_identity(image, "A man in a green shirt at a cooking demo.")


def read_mono(path: Path) -> tuple[np.ndarray, int]:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        rate = stream.rate
        chunks = [frame.to_ndarray().astype(np.float32).reshape(frame.to_ndarray().shape[0], -1)
                  for frame in container.decode(stream)]
    data = np.concatenate(chunks, axis=1)
    return data.mean(axis=0) if data.shape[0] > 1 else data[0], rate


def test_identity_is_cropped_and_encoded(engine, identity):
    assert identity.image.shape == (128, 224, 3) and identity.image.dtype == np.uint8
    assert tuple(identity.latent.shape) == (1, 48, 1, 8, 14)


def test_speak_segment_geometry_and_determinism(engine, identity):
    prompt = (MEDIA / "prompt.txt").read_text()
    request = SegmentRequest(identity=identity, kind=SegmentKind.SPEAK, prompt=prompt, seconds=2.0, seed=7)
    first = engine.generate(request)
    again = engine.generate(request)
    short = SegmentRequest(identity=identity, kind=SegmentKind.SPEAK, prompt=prompt, seconds=1.0, seed=7)
    assert first.frames.shape == (segment_frame_count(2.0), 128, 224, 3) == (49, 128, 224, 3)
    assert first.sample_rate == 44_100 and first.audio.dtype == np.float32
    assert first.audio.shape == (round(49 / 25 * 44_100),)  # audio trimmed to the video duration
    assert np.array_equal(first.frames, again.frames) and np.array_equal(first.audio, again.audio)
    short.seed = 8
    other = engine.generate(short)
    assert not np.array_equal(first.frames[:25], other.frames)
    assert tuple(first.continuation.video_latent.shape) == (1, 48, 13, 8, 14)
    assert np.array_equal(first.continuation.last_frame, first.frames[-1])


def test_continuation_drops_the_conditioning_frame_and_uses_it(engine, identity):
    base = engine.generate(SegmentRequest(identity=identity, kind=SegmentKind.IDLE, prompt="idle", seconds=1.0, seed=1))
    cont = engine.generate(SegmentRequest(identity=identity, kind=SegmentKind.IDLE, prompt="idle", seconds=1.0,
                                          seed=1, continue_from=base.continuation))
    assert base.frames.shape[0] == 25 and cont.frames.shape[0] == 24
    assert cont.audio.shape[0] == round(24 / 25 * 44_100)
    # a bare frame (no latent) continues the same way as the full continuation
    bare = engine.generate(SegmentRequest(identity=identity, kind=SegmentKind.IDLE, prompt="idle", seconds=1.0, seed=1,
                                          continue_from=Continuation(last_frame=base.frames[-1])))
    assert np.array_equal(bare.frames, cont.frames)
    with pytest.raises(EngineInputError, match="last_frame shape"):
        engine.generate(SegmentRequest(identity=identity, seconds=1.0,
                                       continue_from=Continuation(last_frame=np.zeros((8, 8, 3), np.uint8))))


def test_lipsync_returns_the_users_audio(engine, identity):
    speech, rate = read_mono(MEDIA / "english.wav")
    segment = engine.generate(SegmentRequest(identity=identity, kind=SegmentKind.LIPSYNC, seconds=2.0, seed=3,
                                             audio=speech, audio_sample_rate=rate))
    # 2 s -> 50 latents (25/s at the preview's 12.8 kHz, hop 512, as at the real 51.2 kHz, hop 2048)
    # -> T 13 -> 49 frames; audio = the input, cut to 49/25 s
    assert (engine.audio_vae.model_sample_rate, engine.audio_vae.hop_samples) == (12_800, 512)
    assert tuple(segment.continuation.audio_latent.shape) == (1, 50, 64)
    assert segment.frames.shape[0] == 49 and segment.sample_rate == rate
    n = round(49 / 25 * rate)
    assert np.array_equal(segment.audio, speech[:n].astype(np.float32))
    assert segment.audio.shape[0] / rate == pytest.approx(49 / 25, abs=0.5 / rate)
    assert segment.timings_s["encode_audio"] > 0


@pytest.mark.parametrize("seconds, rate, latents, frames", [(1.0, 48_000, 25, 25), (0.36, 48_000, 9, 9),
                                                            (1.0, 16_000, 25, 25)])
def test_lipsync_latents_follow_the_audio_length(engine, identity, seconds, rate, latents, frames):
    """Microphone-rate (48 kHz) and 16 kHz input: ``25 * seconds`` latents, ``4 T - 3`` frames."""
    import soxr

    speech, source_rate = read_mono(MEDIA / "english.wav")
    audio = soxr.resample(speech, source_rate, rate).astype(np.float32)[: round(seconds * rate)]
    segment = engine.generate(SegmentRequest(identity=identity, kind=SegmentKind.LIPSYNC, seconds=seconds, seed=4,
                                             audio=audio, audio_sample_rate=rate))
    assert tuple(segment.continuation.audio_latent.shape) == (1, latents, 64)
    assert segment.frames.shape[0] == frames == segment_frame_count(seconds)
    assert segment.audio.shape[0] == round(frames / 25 * rate)


def test_bad_requests_name_the_field(engine, identity):
    with pytest.raises(EngineInputError, match="seconds"):
        engine.generate(SegmentRequest(identity=identity, seconds=60.0))
    with pytest.raises(EngineInputError, match="audio"):
        engine.generate(SegmentRequest(identity=identity, kind=SegmentKind.LIPSYNC, seconds=1.0))


def test_cancel_stops_generation(engine, identity):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CancelledError):
        engine.generate(SegmentRequest(identity=identity, seconds=1.0), cancel)


def test_super_resolve_keeps_timeline_and_doubles_size(engine, identity):
    segment = engine.generate(SegmentRequest(identity=identity, kind=SegmentKind.IDLE, prompt="idle", seconds=1.0, seed=5))
    upgraded = engine.super_resolve(segment)
    assert upgraded.super_resolved and not segment.super_resolved
    assert upgraded.frames.shape == (25, 256, 448, 3)
    assert np.array_equal(upgraded.audio, segment.audio) and upgraded.duration_s == segment.duration_s


class WindowedDecoder:
    """The preview VAE's decode served in 3-frame chunks, like the Turbo decoder's ``decode_chunks``;
    ``on_chunk(i)`` runs while chunk ``i`` is being decoded (before it is yielded)."""

    def __init__(self, vae, on_chunk=lambda i: None):
        self.vae, self.on_chunk, self.chunks_yielded = vae, on_chunk, 0

    def decode_chunks(self, latent):
        frames = self.vae.decode(latent)
        for i, start in enumerate(range(0, frames.shape[2], 3)):
            self.on_chunk(i)
            self.chunks_yielded += 1
            yield frames[:, :, start:start + 3]

    def decode_to_uint8(self, latent):  # pragma: no cover - the pipeline must use decode_chunks
        raise AssertionError("windowed decoders are decoded chunk by chunk")


def test_windowed_decode_matches_and_cancels_between_windows(engine, identity):
    request = SegmentRequest(identity=identity, kind=SegmentKind.IDLE, prompt="idle", seconds=1.0, seed=5)
    plain = engine.generate(request)
    saved = engine.video_decoder
    try:
        engine.video_decoder = WindowedDecoder(engine.video_vae)
        windowed = engine.generate(request)
        assert engine.video_decoder.chunks_yielded == 9  # 25 frames in chunks of 3
        assert np.array_equal(windowed.frames, plain.frames)

        cancel = threading.Event()
        engine.video_decoder = WindowedDecoder(engine.video_vae, on_chunk=lambda i: cancel.set() if i == 1 else None)
        with pytest.raises(CancelledError, match="after 6 frames"):
            engine.super_resolve(plain, cancel)  # the SR decode of 25 frames stops after its second window
        assert engine.video_decoder.chunks_yielded == 2
    finally:
        engine.video_decoder = saved


def test_chunks_stream_out_and_tile_the_segment_exactly(engine, identity):
    """Issue 17: ``on_chunk`` gets every decoded window with its audio, in order; the chunks
    concatenate to the returned frames and audio exactly. The preview's Wan VAE decodes one latent
    frame at a time (1 frame, then 4 each); a continuation drops its first (duplicated) frame and
    the first 1/25 s of audio from the first chunk, as from the whole segment."""
    base_chunks, cont_chunks = [], []
    base = engine.generate(SegmentRequest(identity=identity, kind=SegmentKind.SPEAK, prompt="speak", seconds=1.0,
                                          seed=11), on_chunk=base_chunks.append)
    cont = engine.generate(SegmentRequest(identity=identity, kind=SegmentKind.SPEAK, prompt="speak", seconds=1.0,
                                          seed=12, continue_from=base.continuation), on_chunk=cont_chunks.append)
    for segment, chunks in ((base, base_chunks), (cont, cont_chunks)):
        assert np.array_equal(np.concatenate([c.frames for c in chunks]), segment.frames)
        assert np.array_equal(np.concatenate([c.audio for c in chunks]), segment.audio)
        starts = [c.start_frame for c in chunks]
        assert starts == sorted(starts) and all(c.total_frames == segment.num_frames for c in chunks)
        assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
        assert all(c.audio.shape[0] == c.num_frames * 1764 for c in chunks)  # 44.1 kHz / 25 fps
    assert [c.num_frames for c in base_chunks] == [1] + [4] * 6  # 25 frames: T = 7 latent frames
    assert [c.num_frames for c in cont_chunks] == [4] * 6  # the 1-frame window is the duplicate


def test_backend_selection_keeps_segments_close(identity):
    """The `fast` backend (best attention kernel: SDPA on CPU) gives the same segment as eager
    (fp32 compute, so that only the attention kernel differs)."""
    fast = build_preview_engine(seed=0, backend="fast", compute_dtype=torch.float32)
    eager = build_preview_engine(seed=0, compute_dtype=torch.float32)
    request = SegmentRequest(identity=identity, kind=SegmentKind.IDLE, prompt="idle", seconds=0.5, seed=2)
    a, b = eager.generate(request), fast.generate(request)
    assert a.frames.shape == b.frames.shape
    assert np.abs(a.frames.astype(int) - b.frames.astype(int)).mean() < 2.0


def test_preview_engine_says_its_picture_is_noise(engine):
    """The preview's weights are untrained: its engine carries the notice that session.ready
    passes to clients, naming the cause and how to load the real weights."""
    assert engine.name == "preview"
    assert "untrained" in engine.notice and "noise by design" in engine.notice
    assert "--engine full --checkpoint-dir" in engine.notice
