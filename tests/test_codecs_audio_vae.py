"""Oobleck audio VAE wrapper (CODECS.md §3, PIPELINE.md §13, §15.2) on the seeded preview size.

Catches: a hop other than 2048 (25 latents/s at 51.2 kHz), the wrong output length (must be exactly
``1764 * A`` samples at 44.1 kHz), a resampler other than the FFT one, clipping of the decoded
waveform, the posterior mode instead of a sample, mono not duplicated to stereo, and missing limits.
The live preview engine's 12.8 kHz variant (hop 512) must keep 25 latents/s and exact durations,
while the released configuration (diffusers' defaults) must stay at 51.2 kHz / hop 2048.
"""

from __future__ import annotations

import av
import numpy as np
import pytest
import scipy.signal
import soxr
import torch
from diffusers import AutoencoderOobleck

from engine.codecs.audio_vae import (
    HOP_SAMPLES,
    LATENT_RATE_HZ,
    MODEL_SAMPLE_RATE,
    OUTPUT_SAMPLE_RATE,
    OobleckAudioVAE,
    model_sample_rate_for,
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


@pytest.fixture(scope="module")
def vae_12k() -> OobleckAudioVAE:
    """The live preview engine's variant: 12.8 kHz model rate (hop 512), bf16 encoder."""
    return OobleckAudioVAE.preview(seed=0, encode_dtype=torch.bfloat16, model_sample_rate=12_800)


def test_constants_and_preview_layout(vae):
    assert (LATENT_RATE_HZ, MODEL_SAMPLE_RATE, OUTPUT_SAMPLE_RATE, HOP_SAMPLES) == (25, 51200, 44100, 2048)
    cfg = vae.vae.config
    assert int(np.prod(cfg.downsampling_ratios)) == 2048
    assert cfg.decoder_input_channels == 64 and cfg.encoder_hidden_size == 128 and cfg.audio_channels == 2
    assert (vae.model_sample_rate, vae.hop_samples) == (51200, 2048)  # the default preview keeps the real hop


@pytest.mark.filterwarnings("ignore:.*weight_norm.*deprecated:FutureWarning")
def test_released_config_keeps_51200_hz():
    """diffusers' defaults are Stable-Audio-Open's (CODECS.md §3.4): the rate derived from them must be
    exactly 51.2 kHz with hop 2048 (built on the meta device: no weights, no memory)."""
    with torch.device("meta"):
        real = OobleckAudioVAE(AutoencoderOobleck())
    assert list(real.vae.config.downsampling_ratios) == [2, 4, 4, 8, 8]
    assert (real.model_sample_rate, real.hop_samples) == (51200, 2048)
    assert sum(p.numel() for p in real.vae.parameters()) == 156_112_514  # CODECS.md §3.1


def test_model_rate_is_derived_from_the_strides():
    assert model_sample_rate_for([2, 4, 4, 8, 8]) == 51200
    assert model_sample_rate_for((2, 2, 4, 4, 8)) == 12800
    for bad in ([2, 4, 4, 8, 5], [], [2, 0]):
        with pytest.raises(ValueError, match="even"):
            model_sample_rate_for(bad)
    with pytest.raises(ValueError, match="model_sample_rate"):
        OobleckAudioVAE.preview(model_sample_rate=16000)


def test_12k_preview_layout(vae_12k):
    cfg = vae_12k.vae.config
    assert list(cfg.downsampling_ratios) == [2, 2, 4, 4, 8]
    assert (vae_12k.model_sample_rate, vae_12k.hop_samples) == (12800, 512)
    assert cfg.decoder_input_channels == 64 and cfg.encoder_hidden_size == 128 and cfg.audio_channels == 2
    assert vae_12k.output_sample_rate == 44100


def test_from_pretrained_refuses_a_hop_other_than_2048(vae_12k, tmp_path):
    vae_12k.vae.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="hop 512"):
        OobleckAudioVAE.from_pretrained(tmp_path)


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


@pytest.mark.parametrize("which", ["vae", "vae_12k"])
def test_decode_resamples_a_sine_without_clipping(which, request, monkeypatch):
    """A 1 kHz sine of amplitude 2.5 at the model rate (51.2 kHz; 12.8 kHz for the live preview) must
    come out as the same sine at 44.1 kHz, unclipped."""
    vae = request.getfixturevalue(which)
    a, hop, rate_in = 10, vae.hop_samples, vae.model_sample_rate
    t = np.arange(hop * a) / rate_in
    sine = torch.from_numpy(2.5 * np.sin(2 * np.pi * 1000 * t)).float()

    class Out:
        sample = sine.view(1, 1, -1).expand(1, 2, -1)

    monkeypatch.setattr(vae.vae, "decode", lambda z: Out())
    wave, rate = vae.decode(torch.zeros(1, a, 64))
    assert rate == 44100 and wave.shape == (1764 * a, 2)
    t_out = np.arange(1764 * a) / OUTPUT_SAMPLE_RATE
    np.testing.assert_allclose(wave[:, 0], 2.5 * np.sin(2 * np.pi * 1000 * t_out), atol=1e-4)
    assert wave.max() > 2.49


def test_12k_decode_length_is_exact(vae_12k):
    z = torch.randn(1, 51, 64, generator=torch.Generator().manual_seed(0))
    raw = vae_12k.decode_model_rate(z)
    assert raw.shape == (1, 2, 512 * 51) and raw.dtype == torch.float32  # 2.04 s at 12.8 kHz
    wave, rate = vae_12k.decode(z)
    assert rate == 44100 and wave.dtype == np.float32
    assert wave.shape == (1764 * 51, 2) and wave.shape[0] / rate == 51 / 25  # exactly 2.04 s
    expected = scipy.signal.resample(raw[0].T.numpy(), 1764 * 51, axis=0)  # FFT up by 441/128
    np.testing.assert_allclose(wave, expected, rtol=1e-6, atol=1e-6)


def test_decode_rejects_bad_latents(vae):
    for bad in (torch.zeros(1, 64, 10), torch.zeros(10, 64), torch.zeros(1, 0, 64)):
        with pytest.raises(ValueError, match="latent"):
            vae.decode(bad)


@pytest.fixture(scope="module")
def speech() -> tuple[np.ndarray, int]:
    return load_mono(SHARED_DIR / "media" / "jfk.flac", 0.125)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _posterior_sample(model: AutoencoderOobleck, mono: np.ndarray, seed: int, dtype=torch.float32) -> torch.Tensor:
    """The reference draw through the public diffusers model: mono duplicated to stereo, encoded in
    ``dtype``, ``mean + std * eps`` with ``eps`` from ``seed``; ``[1, A, 64]`` fp32."""
    stereo = torch.from_numpy(np.asarray(mono, np.float32)).view(1, 1, -1).expand(1, 2, -1).contiguous()
    with torch.no_grad():
        dist = model.encode(stereo.to(dtype)).latent_dist
    mean, std = dist.mean.float(), dist.std.float()
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed))
    return (mean + std * eps).permute(0, 2, 1)


def test_encode_real_speech(vae, speech):
    """44.1 kHz speech is resampled to 51.2 kHz with soxr and duplicated to stereo before the encoder."""
    wave, rate = speech
    assert rate == 44100
    z = vae.encode(wave, rate, generator=torch.Generator().manual_seed(0))
    at_model_rate = soxr.resample(wave, rate, MODEL_SAMPLE_RATE).astype(np.float32)
    assert abs(at_model_rate.shape[0] - 0.125 * MODEL_SAMPLE_RATE) <= 1  # 6,400 samples
    assert z.shape == (1, at_model_rate.shape[0] // 2048, 64) == (1, 3, 64) and z.dtype == torch.float32
    same = vae.encode(at_model_rate, MODEL_SAMPLE_RATE, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, same)
    torch.testing.assert_close(z, _posterior_sample(vae.vae, at_model_rate, 0), rtol=1e-5, atol=1e-5)
    # Only the left channel (silence on the right) gives another latent: the duplication is seen.
    stereo_left = torch.from_numpy(at_model_rate).view(1, 1, -1)
    stereo_left = torch.cat([stereo_left, torch.zeros_like(stereo_left)], dim=1)
    with torch.no_grad():
        left_only = vae.vae.encode(stereo_left).latent_dist.mean.permute(0, 2, 1)
    assert not torch.allclose(z, left_only, atol=1e-2)


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


@pytest.mark.parametrize("seconds", [0.04, 1.0, 2.0, 2.68])
@pytest.mark.parametrize("rate", [48000, 44100, 16000, 12800])
def test_12k_encode_gives_25_latents_per_second(vae_12k, seconds, rate):
    """N seconds at any input rate -> exactly 25 N latents, as at 51.2 kHz (one per video frame)."""
    full, full_rate = load_mono(SHARED_DIR / "media" / "english.wav", 2.7)  # the file is 2.74 s long
    x = soxr.resample(full, full_rate, rate).astype(np.float32)[: round(seconds * rate)]
    z = vae_12k.encode(x, rate, generator=torch.Generator().manual_seed(0))
    assert z.shape == (1, round(25 * seconds), 64) and z.dtype == torch.float32
    assert torch.isfinite(z).all()


def test_12k_encode_feeds_12800_hz_stereo(vae_12k, speech):
    """The live variant resamples to 12.8 kHz and runs its encoder in bf16."""
    wave, rate = speech  # 0.125 s at 44.1 kHz
    z = vae_12k.encode(wave, rate, generator=torch.Generator().manual_seed(0))
    at_model_rate = soxr.resample(wave, rate, 12_800).astype(np.float32)
    assert at_model_rate.shape == (1600,) and z.shape == (1, 3, 64)  # 0.125 s at 12.8 kHz, hop 512
    assert torch.equal(z, vae_12k.encode(at_model_rate, 12_800, generator=torch.Generator().manual_seed(0)))
    # bf16 encoder: off the fp32 reference by bf16 rounding (measured 5e-4), far beyond the fp32
    # path's own error (folded vs unfolded weight norm, ~1e-6; rtol 1e-5 in the test above).
    error = rel_l2(z, _posterior_sample(vae_12k.vae, at_model_rate, 0))
    assert 1e-4 < error < 1e-2
    with pytest.raises(ValueError, match="512 samples at 12800 Hz"):
        vae_12k.encode(np.zeros(511, np.float32), 12800)
    with pytest.raises(ValueError, match="29 s"):
        vae_12k.encode(np.zeros(30 * 12800, np.float32), 12800)


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
