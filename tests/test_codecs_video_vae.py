"""Wan2.2 video VAE wrapper (CODECS.md §1, PIPELINE.md §7, §15.1) on the seeded preview size.

Catches: a layout that loses a stride (shapes), missing or wrong normalisation (the DiT would see raw
latents), the wrong precision rule for bf16 (CODECS.md §1.3 step 5: bf16 constants and
``inv_std = bf16(1 / bf16(std))``), a posterior sample instead of the mode, non-deterministic
seeding, and a broken diffusers-format load.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.codecs.image import frames_to_uint8, image_to_tensor, preprocess_image
from engine.codecs.video_vae import WAN22_LATENT_MEAN, WAN22_LATENT_STD, WanVideoVAE
from tests.conftest import SHARED_DIR

MEAN = torch.tensor(WAN22_LATENT_MEAN).view(1, 48, 1, 1, 1)
STD = torch.tensor(WAN22_LATENT_STD).view(1, 48, 1, 1, 1)


@pytest.fixture(scope="module")
def vae() -> WanVideoVAE:
    return WanVideoVAE.preview(seed=0)


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    return preprocess_image(Image.open(SHARED_DIR / "media" / "portrait.png"), 224, 128)


def test_constants():
    assert len(WAN22_LATENT_MEAN) == len(WAN22_LATENT_STD) == 48
    assert (
        WAN22_LATENT_MEAN[0] == -0.2289
        and WAN22_LATENT_MEAN[19] == 0.5109
        and WAN22_LATENT_MEAN[47] == -0.0667
    )
    assert WAN22_LATENT_STD[0] == 0.4765 and WAN22_LATENT_STD[39] == 1.6887 and WAN22_LATENT_STD[47] == 0.7744


def test_preview_keeps_wan22_layout(vae):
    cfg = vae.vae.config
    assert (cfg.z_dim, cfg.patch_size, cfg.in_channels, cfg.out_channels) == (48, 2, 12, 12)
    assert list(cfg.temperal_downsample) == [False, True, True] and cfg.is_residual
    assert len(cfg.dim_mult) == 4
    assert list(cfg.latents_mean) == list(WAN22_LATENT_MEAN)


def test_preview_is_seeded():
    a, b, c = WanVideoVAE.preview(seed=3), WanVideoVAE.preview(seed=3), WanVideoVAE.preview(seed=4)
    sa, sb, sc = a.vae.state_dict(), b.vae.state_dict(), c.vae.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_decode_shapes_and_range(vae):
    z = torch.randn(1, 48, 13, 8, 14, generator=torch.Generator().manual_seed(0))
    out = vae.decode(z)
    assert out.shape == (1, 3, 49, 128, 224) and out.dtype == torch.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    frames = vae.decode_to_uint8(z)
    assert frames.shape == (49, 128, 224, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames, frames_to_uint8(out))
    assert vae.decode(torch.randn(1, 48, 1, 2, 3)).shape == (1, 3, 1, 32, 48)


def test_decode_denormalises_before_diffusers(vae, monkeypatch):
    seen = {}
    real = vae.vae.decode

    def spy(z, *args, **kwargs):
        seen["z"] = z.clone()
        return real(z, *args, **kwargs)

    monkeypatch.setattr(vae.vae, "decode", spy)
    z = torch.randn(1, 48, 2, 2, 2)
    vae.decode(z)
    torch.testing.assert_close(seen["z"], z * STD + MEAN, rtol=1e-6, atol=1e-6)


def test_encode_image_is_normalised_mode(vae, portrait):
    lat = vae.encode_image(portrait)
    assert lat.shape == (1, 48, 1, 8, 14) and lat.dtype == torch.float32
    with torch.inference_mode():
        mu = vae.vae.encode(image_to_tensor(portrait)).latent_dist.mode()
    torch.testing.assert_close(lat, (mu - MEAN) / STD, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vae.encode_image(portrait), lat, rtol=0, atol=0)  # mode, not a sample


def test_normalisation_round_trip_fp32(vae):
    mu = torch.randn(1, 48, 3, 2, 2)
    torch.testing.assert_close(vae.denormalize(vae.normalize(mu)), mu, rtol=1e-6, atol=1e-6)


def test_bf16_precision_rule(portrait):
    vae16 = WanVideoVAE.preview(seed=0, dtype=torch.bfloat16)
    assert vae16.dtype == torch.bfloat16
    std16 = torch.tensor(WAN22_LATENT_STD).bfloat16()
    expected_inv = (1.0 / std16).view(1, 48, 1, 1, 1)
    # bf16(1/bf16(std)) is not the fp32 reciprocal: the rounding is visible.
    assert not torch.equal(expected_inv.float(), 1.0 / STD)
    mu = torch.randn(1, 48, 1, 2, 2, generator=torch.Generator().manual_seed(0)).bfloat16()
    expected = ((mu - torch.tensor(WAN22_LATENT_MEAN).bfloat16().view(1, 48, 1, 1, 1)) * expected_inv).float()
    assert torch.equal(vae16.normalize(mu), expected)
    # ... and normalize uses the bf16 constants, not the fp32 ones (the two results differ).
    with_fp32_constants = ((mu.float() - MEAN) / STD).bfloat16().float()
    assert not torch.equal(vae16.normalize(mu), with_fp32_constants)
    lat = vae16.encode_image(portrait)
    assert lat.dtype == torch.float32 and lat.shape == (1, 48, 1, 8, 14)


def test_bad_inputs(vae):
    with pytest.raises(ValueError, match="multiples of 16"):
        vae.encode_image(np.zeros((120, 224, 3), np.uint8))
    with pytest.raises(ValueError, match="latent"):
        vae.decode(torch.zeros(1, 16, 2, 2, 2))
    with pytest.raises(ValueError, match="latent"):
        vae.decode(torch.zeros(48, 2, 2, 2))


def test_from_pretrained_round_trip(vae, tmp_path):
    vae.vae.save_pretrained(tmp_path / "vae")
    loaded32 = WanVideoVAE.from_pretrained(tmp_path, dtype=torch.float32, subfolder="vae")
    z = torch.randn(1, 48, 2, 2, 2)
    torch.testing.assert_close(loaded32.decode(z), vae.decode(z), rtol=0, atol=0)
    assert WanVideoVAE.from_pretrained(tmp_path / "vae").dtype == torch.bfloat16  # default dtype


def test_decode_chunks_are_the_decode_one_latent_frame_at_a_time() -> None:
    """``decode_chunks`` runs the decoder one latent frame at a time with its own feature cache and
    yields as it goes (issue 17): 1 frame, then 4 per latent frame, concatenating to ``decode`` bit
    for bit; a half-consumed stream leaves nothing behind for the next call."""
    vae = WanVideoVAE.preview(seed=0)
    latent = torch.randn(1, 48, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    chunks = list(vae.decode_chunks(latent))
    assert [c.shape[2] for c in chunks] == [1, 4, 4]
    assert torch.equal(torch.cat(chunks, dim=2), vae.decode(latent))
    assert torch.equal(torch.cat(list(vae.decode_chunks(latent)), dim=2), vae.decode(latent))  # cache cleared
    abandoned = vae.decode_chunks(torch.randn(1, 48, 3, 2, 2, generator=torch.Generator().manual_seed(1)))
    next(abandoned)  # a cancelled job stops reading after its first window
    assert torch.equal(torch.cat(list(vae.decode_chunks(latent)), dim=2), vae.decode(latent))
