"""Oobleck audio VAE wrapper (CODECS.md §3, PIPELINE.md §13, §15.2) on the seeded preview size.

Catches: a hop other than 2048 (25 latents/s at 51.2 kHz), the wrong output length (must be exactly
``1764 * A`` samples at 44.1 kHz), a resampler other than the FFT one, clipping of the decoded
waveform, the posterior mode instead of a sample, mono not duplicated to stereo, and missing limits.
"""

from __future__ import annotations

import av
import numpy as np
import pytest
import scipy.signal
import torch

from engine.codecs.audio_vae import (
    LATENT_RATE_HZ,
    MODEL_SAMPLE_RATE,
    OUTPUT_SAMPLE_RATE,
    OobleckAudioVAE,
)
from tests.conftest import SHARED_DIR


def load_mono(path, seconds: float) -> tuple[np.ndarray, int]:
    """First ``seconds`` of a file as mono float32 at its own rate (PyAV decode + downmix)."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        rate = stream.rate
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        chunks = []
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
            if sum(len(c) for c in chunks) >= seconds * rate:
                break
    return np.concatenate(chunks)[: int(seconds * rate)].astype(np.float32), rate


@pytest.fixture(scope="module")
def vae() -> OobleckAudioVAE:
    return OobleckAudioVAE.preview(seed=0)


def test_constants_and_preview_layout(vae):
    assert (LATENT_RATE_HZ, MODEL_SAMPLE_RATE, OUTPUT_SAMPLE_RATE) == (25, 51200, 44100)
    cfg = vae.vae.config
    assert int(np.prod(cfg.downsampling_ratios)) == 2048
    assert cfg.decoder_input_channels == 64 and cfg.encoder_hidden_size == 128 and cfg.audio_channels == 2


def test_preview_is_seeded(vae):
    a = vae.vae.state_dict()  # seed 0
    b, c = (OobleckAudioVAE.preview(seed=s).vae.state_dict() for s in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_decode_length_and_fft_resample(vae):
    z = torch.randn(1, 51, 64, generator=torch.Generator().manual_seed(0))
    wave, rate = vae.decode(z)
    assert rate == 44100 and wave.dtype == np.float32
    assert wave.shape == (1764 * 51, 2)  # 89,964 samples = exactly 2.04 s at 44.1 kHz
    raw = vae.decode_model_rate(z[:, :10])
    assert raw.shape == (1, 2, 2048 * 10) and raw.dtype == torch.float32
    expected = scipy.signal.resample(raw[0].T.numpy(), 1764 * 10, axis=0)
    np.testing.assert_allclose(vae.decode(z[:, :10])[0], expected, rtol=1e-6, atol=1e-6)
    assert vae.decode(z[:, :1])[0].shape == (1764, 2)


def test_decode_resamples_a_sine_without_clipping(vae, monkeypatch):
    """A 1 kHz sine of amplitude 2.5 at 51.2 kHz must come out as the same sine at 44.1 kHz, unclipped."""
    a = 10
    t = np.arange(2048 * a) / MODEL_SAMPLE_RATE
    sine = torch.from_numpy(2.5 * np.sin(2 * np.pi * 1000 * t)).float()

    class Out:
        sample = sine.view(1, 1, -1).expand(1, 2, -1)

    monkeypatch.setattr(vae.vae, "decode", lambda z: Out())
    wave, rate = vae.decode(torch.zeros(1, a, 64))
    t_out = np.arange(1764 * a) / OUTPUT_SAMPLE_RATE
    np.testing.assert_allclose(wave[:, 0], 2.5 * np.sin(2 * np.pi * 1000 * t_out), atol=1e-4)
    assert wave.max() > 2.49


def test_decode_rejects_bad_latents(vae):
    for bad in (torch.zeros(1, 64, 10), torch.zeros(10, 64), torch.zeros(1, 0, 64)):
        with pytest.raises(ValueError, match="latent"):
            vae.decode(bad)


@pytest.fixture(scope="module")
def speech() -> tuple[np.ndarray, int]:
    return load_mono(SHARED_DIR / "media" / "jfk.flac", 0.125)


def test_encode_real_speech(vae, speech, monkeypatch):
    wave, rate = speech
    assert rate == 44100
    seen = {}
    build = vae._folded_encoder

    def build_spy():
        encoder = build()

        def spy(x):
            seen["x"] = x.clone()
            return encoder(x)

        return spy

    monkeypatch.setattr(vae, "_folded_encoder", build_spy)
    monkeypatch.setattr(vae, "_fast_encoder", None)
    z = vae.encode(wave, rate, generator=torch.Generator().manual_seed(0))
    n = seen["x"].shape[-1]
    assert abs(n - 0.125 * MODEL_SAMPLE_RATE) <= 1  # resampled to 51.2 kHz (6,400 samples)
    assert seen["x"].shape[:2] == (1, 2) and torch.equal(seen["x"][0, 0], seen["x"][0, 1])
    assert z.shape == (1, n // 2048, 64) == (1, 3, 64) and z.dtype == torch.float32


def test_encode_is_a_seeded_posterior_sample(vae, speech):
    """At the model rate (no resampling) the draw is ``mean + (softplus(scale) + 1e-4) * eps``."""
    x = np.resize(speech[0], 4096)
    with torch.no_grad():
        stereo = torch.from_numpy(x).view(1, 1, -1).expand(1, 2, -1).contiguous()
        dist = vae.vae.encode(stereo).latent_dist
    eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(7))
    z7 = vae.encode(x, MODEL_SAMPLE_RATE, generator=torch.Generator().manual_seed(7))
    assert z7.shape == (1, 2, 64)
    torch.testing.assert_close(z7, (dist.mean + dist.std * eps).permute(0, 2, 1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(z7, dist.mean.permute(0, 2, 1))  # a sample, not the mode
    z8 = vae.encode(x, MODEL_SAMPLE_RATE, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(z7, z8)


def test_encode_limits(vae):
    long = np.zeros(30 * MODEL_SAMPLE_RATE, np.float32)
    with pytest.raises(ValueError, match="29 s"):
        vae.encode(long, MODEL_SAMPLE_RATE)
    z = vae.encode(long, MODEL_SAMPLE_RATE, max_seconds=0.1)  # 5,120 samples kept -> 2 latents
    assert z.shape == (1, 2, 64)
    with pytest.raises(ValueError, match="2048"):
        vae.encode(np.zeros(2047, np.float32), MODEL_SAMPLE_RATE)
    with pytest.raises(ValueError, match="mono"):
        vae.encode(np.zeros((2, 4096), np.float32), MODEL_SAMPLE_RATE)
    with pytest.raises(ValueError, match="sample_rate"):
        vae.encode(np.zeros(4096, np.float32), 0)


def test_from_pretrained_round_trip(vae, tmp_path):
    vae.vae.save_pretrained(tmp_path)
    loaded = OobleckAudioVAE.from_pretrained(tmp_path)
    z = torch.randn(1, 3, 64)
    np.testing.assert_array_equal(loaded.decode(z)[0], vae.decode(z)[0])


def test_bf16_encoder_stays_close_to_fp32(speech):
    """The preview's bf16 encoder (a speed choice) samples from nearly the same posterior."""
    fp32 = OobleckAudioVAE.preview(seed=0)
    bf16 = OobleckAudioVAE.preview(seed=0, encode_dtype=torch.bfloat16)
    wave, rate = speech
    a = fp32.encode(wave, rate, generator=torch.Generator().manual_seed(1))
    b = bf16.encode(wave, rate, generator=torch.Generator().manual_seed(1))
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    rel = ((a - b).norm() / a.norm()).item()
    assert 0 < rel < 0.05
