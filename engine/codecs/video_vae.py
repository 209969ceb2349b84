"""Wan2.2-TI2V-5B video VAE (CODECS.md §1) on top of ``diffusers.AutoencoderKLWan``.

Role: encode the conditioning image (TI2V, PIPELINE.md §7) into the DiT's normalised latent space,
and decode latents when the Turbo decoder is not used (PIPELINE.md §15.1).

Layout facts (CODECS.md §1.2, §1.7): ``z_dim`` 48, 2x2 input patchify (12 channels), strides
(t, h, w) = (4, 16, 16), ``temperal_downsample`` [False, True, True], residual (Wan 2.2) blocks.
The DiT works on *normalised* latents ``(mu - mean) / std`` with the §1.4 constants; diffusers works on
raw latents, so this wrapper applies the normalisation on both sides. Precision rule (§1.3 step 5,
§1.5): when the module is bf16 both the subtraction/multiplication and the constants are bf16 with
``inv_std = bf16(1 / bf16(std))``; when it is fp32 the same formula runs in fp32.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify

from engine.codecs.image import frames_to_uint8, image_to_tensor

logger = logging.getLogger(__name__)

__all__ = ["WAN22_LATENT_MEAN", "WAN22_LATENT_STD", "WanVideoVAE"]

# CODECS.md §1.4: per-channel mean / std of the Wan2.2-TI2V-5B latent (48 channels, channel order).
WAN22_LATENT_MEAN: tuple[float, ...] = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
WAN22_LATENT_STD: tuple[float, ...] = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip

Z_DIM = 48
SPATIAL_STRIDE = 16
TEMPORAL_STRIDE = 4

# Keys of the diffusers config that fix the Wan2.2 layout (CODECS.md §1.7); the preview keeps them all.
_WAN22_LAYOUT = dict(
    z_dim=Z_DIM,
    temperal_downsample=[False, True, True],
    is_residual=True,
    in_channels=12,
    out_channels=12,
    patch_size=2,
    scale_factor_spatial=SPATIAL_STRIDE,
    scale_factor_temporal=TEMPORAL_STRIDE,
    latents_mean=list(WAN22_LATENT_MEAN),
    latents_std=list(WAN22_LATENT_STD),
)

# Preview size: the smallest widths the class accepts (1 channel per stage, one resnet per decoder
# stage), four stages so that every stride is kept. Decodes a 2-s 224x128 segment in ~0.1 s on 2 CPU cores.
_PREVIEW_DIMS = dict(base_dim=1, decoder_base_dim=1, dim_mult=[1, 1, 1, 1], num_res_blocks=0)


class WanVideoVAE:
    """Wan2.2 video VAE: image encode and latent decode in the DiT's normalised latent space.

    Latents: ``[1, 48, T, H/16, W/16]`` float32, ``T = 1 + (F - 1)/4`` for ``F`` pixel frames at 25 fps.
    Pixels: ``[1, 3, F, H, W]`` in [-1, 1]; ``H`` and ``W`` multiples of 16.

    Build with :meth:`preview` (tiny random weights, CPU tests) or :meth:`from_pretrained`.
    """

    def __init__(self, vae: AutoencoderKLWan) -> None:
        """Wrap a diffusers ``AutoencoderKLWan`` that has the Wan2.2 layout.

        Raises:
            ValueError: ``z_dim`` is not 48, ``patch_size`` is not 2 or ``is_residual`` is false.
        """
        cfg = vae.config
        if cfg.z_dim != Z_DIM or cfg.patch_size != 2 or not cfg.is_residual:
            raise ValueError(
                f"vae must have the Wan2.2 layout (z_dim=48, patch_size=2, is_residual=True), got "
                f"z_dim={cfg.z_dim}, patch_size={cfg.patch_size}, is_residual={cfg.is_residual}"
            )
        self.vae = vae.eval().requires_grad_(False)
        self._set_constants()

    def _set_constants(self) -> None:
        # CODECS.md §1.3 step 5: bf16 module -> bf16 mean and inv_std = bf16(1 / bf16(std)); fp32 -> fp32.
        dtype, device = self.dtype, self.device
        shape = (1, Z_DIM, 1, 1, 1)
        self._mean = torch.tensor(WAN22_LATENT_MEAN, dtype=torch.float32).to(device, dtype).view(shape)
        std = torch.tensor(WAN22_LATENT_STD, dtype=torch.float32).to(device, dtype)
        self._inv_std = (1.0 / std).view(shape)

    @classmethod
    def preview(cls, seed: int = 0, dtype: torch.dtype = torch.float32) -> WanVideoVAE:
        """Same class at the smallest size, with seeded random weights (``torch.manual_seed(seed)``).

        All strides are kept (16x16 spatial, 4x temporal, 2x2 patchify, 48 latent channels); only the
        widths and the number of residual blocks shrink. Deterministic for a given ``seed``.
        """
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(**_PREVIEW_DIMS, **_WAN22_LAYOUT)
        if dtype != torch.float32:
            vae = vae.to(dtype)
        return cls(vae)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        subfolder: str | None = None,
    ) -> WanVideoVAE:
        """Load a diffusers-format VAE directory (``Wan-AI/Wan2.2-TI2V-5B-Diffusers``, subfolder ``vae``).

        Args:
            path: local directory (or Hub id) holding ``config.json`` + weights.
            dtype: module dtype; bf16 by default, as upstream (CODECS.md §1.6).
            device: target device.
            subfolder: optional subfolder inside ``path`` (e.g. ``"vae"``).

        Raises:
            ValueError: the checkpoint is not in the Wan2.2 layout.
        """
        vae = AutoencoderKLWan.from_pretrained(str(path), subfolder=subfolder, torch_dtype=dtype)
        return cls(vae.to(device))

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype of the wrapped module."""
        return next(self.vae.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Device of the wrapped module."""
        return next(self.vae.parameters()).device

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> WanVideoVAE:
        """Move/cast the module (and the normalisation constants, following the precision rule)."""
        self.vae.to(device=device, dtype=dtype)
        self._set_constants()
        return self

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """Raw posterior mean -> DiT latent, ``(mu - mean) * inv_std`` in the module dtype (CODECS.md §1.3 step 5).

        Args:
            mu: ``[B, 48, T, h, w]`` raw latent.

        Returns:
            ``[B, 48, T, h, w]`` float32.
        """
        z = (mu.to(self.dtype) - self._mean) * self._inv_std
        return z.float()

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """DiT latent -> raw latent, ``z / inv_std + mean`` in the module dtype (CODECS.md §1.5).

        Args:
            z: ``[B, 48, T, h, w]`` normalised latent (any float dtype).

        Returns:
            ``[B, 48, T, h, w]`` in the module dtype.
        """
        return z.to(self.device, self.dtype) / self._inv_std + self._mean

    @torch.no_grad()
    def encode_image(self, image: np.ndarray) -> torch.Tensor:
        """Encode one conditioning image (PIPELINE.md §7 steps 4-5, CODECS.md §1.3).

        Args:
            image: ``uint8 [H, W, 3]`` RGB, already at the stage resolution (see
                :func:`engine.codecs.image.preprocess_image`); ``H`` and ``W`` multiples of 16.

        Returns:
            ``float32 [1, 48, 1, H/16, W/16]``: normalised latent of the posterior mode (``mu``).

        Raises:
            ValueError: bad dtype/shape, or ``H``/``W`` not multiples of 16.
        """
        h, w = np.asarray(image).shape[:2]
        if h % SPATIAL_STRIDE or w % SPATIAL_STRIDE:
            raise ValueError(f"image height and width must be multiples of {SPATIAL_STRIDE}, got {h}x{w}")
        x = image_to_tensor(image).to(self.device, self.dtype)
        mu = self.vae.encode(x).latent_dist.mode()
        return self.normalize(mu)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Decode a normalised latent to pixels (CODECS.md §1.5, PIPELINE.md §15.1).

        Args:
            latent: ``float32 [1, 48, T, h, w]`` normalised latent, ``T >= 1``.

        Returns:
            ``float32 [1, 3, 4T - 3, 16h, 16w]`` clamped to [-1, 1].

        Raises:
            ValueError: ``latent`` is not ``[1, 48, T, h, w]``.
        """
        if latent.ndim != 5 or latent.shape[0] != 1 or latent.shape[1] != Z_DIM or latent.shape[2] < 1:
            raise ValueError(f"latent must be [1, {Z_DIM}, T>=1, h, w], got {list(latent.shape)}")
        raw = self.denormalize(latent)
        out = self.vae.decode(raw).sample
        return out.float().clamp(-1.0, 1.0)

    @torch.no_grad()
    def decode_chunks(self, latent: torch.Tensor) -> Iterator[torch.Tensor]:
        """:meth:`decode` one latent frame at a time, yielding each frame's pixels as soon as it is done.

        The Wan decoder is causal in time: diffusers' ``AutoencoderKLWan._decode`` already runs it on one
        latent frame after the other with a feature cache and concatenates the outputs; this runs the
        same loop and yields instead (issue 17: the first frames can play before the segment is whole).
        With tiling on it yields :meth:`decode` whole. The feature cache is this call's own list.

        Args:
            latent: ``float32 [1, 48, T, h, w]`` normalised latent, ``T >= 1``.

        Yields:
            ``float32 [1, 3, f_i, 16h, 16w]`` clamped to [-1, 1]; ``f_0 = 1``, then 4 per latent frame. They
            concatenate (in time) to :meth:`decode`'s output exactly.

        Raises:
            ValueError: ``latent`` is not ``[1, 48, T, h, w]``.
        """
        if latent.ndim != 5 or latent.shape[0] != 1 or latent.shape[1] != Z_DIM or latent.shape[2] < 1:
            raise ValueError(f"latent must be [1, {Z_DIM}, T>=1, h, w], got {list(latent.shape)}")
        vae = self.vae
        if getattr(vae, "use_tiling", False):
            yield self.decode(latent)
            return
        # Our own feature cache, one slot per causal conv of the decoder (what diffusers sizes its
        # cache by), so the loop touches only the decoder's public forward arguments.
        feat_cache: list = [None] * sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        x = vae.post_quant_conv(self.denormalize(latent))
        for i in range(x.shape[2]):
            out = vae.decoder(x[:, :, i : i + 1], feat_cache=feat_cache, feat_idx=[0], first_chunk=i == 0)
            yield unpatchify(out, patch_size=vae.config.patch_size).float().clamp(-1.0, 1.0)

    def decode_to_uint8(self, latent: torch.Tensor) -> np.ndarray:
        """:meth:`decode` then :func:`~engine.codecs.image.frames_to_uint8`: ``uint8 [4T - 3, 16h, 16w, 3]``."""
        return frames_to_uint8(self.decode(latent))
