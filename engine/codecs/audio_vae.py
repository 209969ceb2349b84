"""Stable-Audio-Open-1.0 "Oobleck" audio VAE (CODECS.md §3) on top of ``diffusers.AutoencoderOobleck``.

Rate convention (PIPELINE.md §6, §13, §15.2): the VAE hop is 2048 samples and MagiHuman feeds and
interprets its audio at **51,200 Hz**, so one latent row is exactly 1/25 s (the video frame rate).
Decoded audio is FFT-resampled by 441/512 to 44,100 Hz for output. Latents are raw and unscaled
(no mean/std, no scale factor), stored time-major ``[1, A, 64]`` float32. The module runs in fp32.

The wrapper derives its model rate from the VAE's own config, ``25 * prod(downsampling_ratios)`` Hz
(:func:`model_sample_rate_for`): 51,200 Hz for the released checkpoint (strides 2·4·4·8·8, enforced by
:meth:`OobleckAudioVAE.from_pretrained`), and so the real stack's encode and decode are exactly the
reference's. Only the CPU preview may ask for a smaller hop (:meth:`OobleckAudioVAE.preview`
``model_sample_rate=12_800``: strides 2·2·4·4·8 = 512): the encoder's first stage is 128 channels
wide whatever the widths (diffusers ties it to ``encoder_hidden_size`` = 2 x latent dim), so its cost
scales with the samples per second it is fed; a quarter of the rate is a quarter of the work, still
25 latents per second, with audio band-limited to 6.4 kHz (plenty for the lip motion of speech).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import scipy.signal
import soxr
import torch
from diffusers import AutoencoderOobleck
from diffusers.models.autoencoders.autoencoder_oobleck import OobleckDiagonalGaussianDistribution

logger = logging.getLogger(__name__)

__all__ = [
    "HOP_SAMPLES",
    "LATENT_DIM",
    "LATENT_RATE_HZ",
    "MAX_ENCODE_SECONDS",
    "MODEL_SAMPLE_RATE",
    "OUTPUT_SAMPLE_RATE",
    "OUTPUT_SAMPLES_PER_LATENT",
    "OobleckAudioVAE",
    "model_sample_rate_for",
]

LATENT_RATE_HZ = 25
MODEL_SAMPLE_RATE = 51200  # Hz, the rate the released VAE is fed/interpreted at (PIPELINE.md §13)
OUTPUT_SAMPLE_RATE = 44100  # Hz, after the 441/512 FFT resample (PIPELINE.md §15.2)
HOP_SAMPLES = MODEL_SAMPLE_RATE // LATENT_RATE_HZ  # 2048 = product of the released downsampling ratios
OUTPUT_SAMPLES_PER_LATENT = OUTPUT_SAMPLE_RATE // LATENT_RATE_HZ  # 1764 = 2048 * 441 / 512
LATENT_DIM = 64
MAX_ENCODE_SECONDS = 29.0  # single-window encode limit (PIPELINE.md §13 step 3); longer is not supported

# Preview: the widest stage is the encoder's first one, which diffusers ties to 2 x latent dim (128);
# the decoder is shrunk to 8 channels. Strides [2, 4, 4, 8, 8] keep the 2048 hop (51.2 kHz).
_PREVIEW_CONFIG = dict(
    encoder_hidden_size=2 * LATENT_DIM,
    downsampling_ratios=[2, 4, 4, 8, 8],
    channel_multiples=[1, 1, 1, 1, 1],
    decoder_channels=8,
    decoder_input_channels=LATENT_DIM,
    audio_channels=2,
    sampling_rate=OUTPUT_SAMPLE_RATE,
)


# Strides of the preview for each model rate it may run at (all even, so lengths floor exactly).
_PREVIEW_RATIOS: dict[int, list[int]] = {
    MODEL_SAMPLE_RATE: [2, 4, 4, 8, 8],  # hop 2048, the released layout
    12_800: [2, 2, 4, 4, 8],  # hop 512: a quarter of the encoder's work (the live lip-sync preview)
}


def model_sample_rate_for(downsampling_ratios: list[int] | tuple[int, ...]) -> int:
    """Model sample rate in Hz of an Oobleck VAE with these strides: ``25 * prod(ratios)``.

    One latent row is one video frame (1/25 s), so the rate is the hop times 25: 51,200 Hz for the
    released strides ``[2, 4, 4, 8, 8]`` (hop 2048), 12,800 Hz for ``[2, 2, 4, 4, 8]`` (hop 512).

    Raises:
        ValueError: empty, or a stride that is not a positive even integer (an odd stride would make
            ``encode`` lengths differ from ``floor(N / hop)``, CODECS.md §3.1).
    """
    ratios = [int(r) for r in downsampling_ratios]
    if not ratios or any(r <= 0 or r % 2 for r in ratios):
        raise ValueError(f"downsampling ratios must be positive even integers, got {list(downsampling_ratios)}")
    return LATENT_RATE_HZ * int(np.prod(ratios))


@contextlib.contextmanager
def _quiet_weight_norm() -> Iterator[None]:
    """Silence torch's FutureWarning about ``weight_norm``, which diffusers' Oobleck layers still use."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*weight_norm.*deprecated", category=FutureWarning)
        yield


def _fold_weight_norm(module: torch.nn.Module) -> int:
    """Fold every weight-normalised conv's ``weight_g * weight_v / ||weight_v||`` into a plain weight.

    Inference only: the weights are fixed, so recomputing the norm on every call (diffusers keeps
    ``torch.nn.utils.weight_norm`` hooks) is wasted work, about a quarter of the encoder's CPU time.
    Folding changes the state-dict keys, so it is applied to a copy (the wrapped model still saves
    and loads in the diffusers format). Returns the number of folded modules.
    """
    folded = 0
    for child in module.modules():
        if hasattr(child, "weight_g") and hasattr(child, "weight_v"):
            torch.nn.utils.remove_weight_norm(child)
            folded += 1
    return folded


class OobleckAudioVAE:
    """Oobleck audio VAE: ``[1, A, 64]`` latents <-> stereo waveforms, 25 latents per second.

    Build with :meth:`preview` (small random weights, CPU tests) or :meth:`from_pretrained`.

    Attributes:
        hop_samples: samples per latent at the model rate, ``prod(downsampling_ratios)`` (2048 for
            the released VAE).
        model_sample_rate: Hz the VAE is fed and its decoder output interpreted at,
            ``25 * hop_samples`` (51,200 for the released VAE).
        output_sample_rate: Hz of :meth:`decode`'s waveform (44,100).
    """

    output_sample_rate: int = OUTPUT_SAMPLE_RATE  # Hz of :meth:`decode`'s waveform
    latent_rate_hz: int = LATENT_RATE_HZ

    def __init__(self, vae: AutoencoderOobleck, encode_dtype: torch.dtype = torch.float32) -> None:
        """Wrap a diffusers ``AutoencoderOobleck``; the model rate is taken from its strides.

        ``encode_dtype``: dtype of the encoder's convolutions. The reference runs it in fp32
        (CODECS.md §3.2, the default); the CPU preview uses bf16, 2-3x faster on CPUs with bf16
        dot-product units. The posterior moments are always sampled in fp32.

        Raises:
            ValueError: a stride is not even, latent dim is not 64, or it is not stereo.
        """
        cfg = vae.config
        if cfg.decoder_input_channels != LATENT_DIM or cfg.audio_channels != 2:
            raise ValueError(
                f"vae must have latent dim {LATENT_DIM} and 2 audio channels, got "
                f"decoder_input_channels={cfg.decoder_input_channels}, audio_channels={cfg.audio_channels}"
            )
        self.model_sample_rate = model_sample_rate_for(cfg.downsampling_ratios)
        self.hop_samples = self.model_sample_rate // LATENT_RATE_HZ
        self.vae = vae.eval().requires_grad_(False)
        self._fast_encoder: torch.nn.Module | None = None  # weight-norm-folded copy, built on first encode
        self.encode_dtype = encode_dtype

    def _folded_encoder(self) -> torch.nn.Module:
        """A copy of the encoder (same class, same weights) with weight norm folded in."""
        cfg = self.vae.config
        with _quiet_weight_norm():
            encoder = type(self.vae.encoder)(
                encoder_hidden_size=cfg.encoder_hidden_size, audio_channels=cfg.audio_channels,
                downsampling_ratios=list(cfg.downsampling_ratios), channel_multiples=list(cfg.channel_multiples),
            )
        encoder.load_state_dict(self.vae.encoder.state_dict())
        encoder = encoder.to(self.device).eval().requires_grad_(False)
        _fold_weight_norm(encoder)
        return encoder.to(self.encode_dtype)

    @classmethod
    def preview(
        cls, seed: int = 0, encode_dtype: torch.dtype = torch.float32, model_sample_rate: int = MODEL_SAMPLE_RATE
    ) -> OobleckAudioVAE:
        """Same class with small channels and seeded random weights (``torch.manual_seed(seed)``), fp32.

        Keeps latent dim 64 (encoder output 128) and stereo. ``model_sample_rate`` (Hz): 51,200 (the
        default) keeps the released hop 2048; 12,800 uses strides ``[2, 2, 4, 4, 8]`` (hop 512, still
        25 latents/s), which the live preview engine uses to run its lip-sync encode in a quarter of
        the time. That differs from the real stack, which always runs at 51.2 kHz: the preview's
        encoder sees audio band-limited to 6.4 kHz, and its decoder's output is FFT-resampled by
        441/128 (up) instead of 441/512 (down) to 44.1 kHz.

        Raises:
            ValueError: ``model_sample_rate`` is not 51,200 or 12,800 Hz.
        """
        if model_sample_rate not in _PREVIEW_RATIOS:
            raise ValueError(f"preview model_sample_rate must be one of {sorted(_PREVIEW_RATIOS)} Hz, "
                             f"got {model_sample_rate}")
        torch.manual_seed(seed)
        with _quiet_weight_norm():
            vae = AutoencoderOobleck(**{**_PREVIEW_CONFIG, "downsampling_ratios": _PREVIEW_RATIOS[model_sample_rate]})
        return cls(vae, encode_dtype=encode_dtype)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device = "cpu", subfolder: str | None = None
    ) -> OobleckAudioVAE:
        """Load the diffusers-format VAE (``stabilityai/stable-audio-open-1.0``, subfolder ``vae``) in fp32.

        The released VAE's strides are ``[2, 4, 4, 8, 8]``: model rate 51,200 Hz, hop 2048.

        Raises:
            ValueError: the checkpoint is not hop 2048 / latent 64 / stereo.
        """
        with _quiet_weight_norm():
            vae = AutoencoderOobleck.from_pretrained(
                str(path), subfolder=subfolder, torch_dtype=torch.float32
            )
        hop = int(np.prod(vae.config.downsampling_ratios))
        if hop != HOP_SAMPLES:
            raise ValueError(f"vae at {path} has hop {hop} (strides {list(vae.config.downsampling_ratios)}); "
                             f"the released checkpoint has hop {HOP_SAMPLES} ({MODEL_SAMPLE_RATE} Hz)")
        return cls(vae.to(device))

    @property
    def device(self) -> torch.device:
        """Device of the wrapped module."""
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def decode_model_rate(self, latent: torch.Tensor) -> torch.Tensor:
        """Oobleck decode at the model rate (PIPELINE.md §15.2 step 1).

        Args:
            latent: ``float32 [1, A, 64]``, ``A >= 1``.

        Returns:
            ``float32 [1, 2, hop_samples * A]`` at ``model_sample_rate`` Hz (released VAE:
            ``2048 * A`` at 51,200 Hz), unclipped.

        Raises:
            ValueError: ``latent`` is not ``[1, A>=1, 64]``.
        """
        if latent.ndim != 3 or latent.shape[0] != 1 or latent.shape[2] != LATENT_DIM or latent.shape[1] < 1:
            raise ValueError(f"latent must be [1, A>=1, {LATENT_DIM}], got {list(latent.shape)}")
        z = latent.to(self.device, torch.float32).permute(0, 2, 1)
        return self.vae.decode(z).sample.float()

    def decode(self, latent: torch.Tensor) -> tuple[np.ndarray, int]:
        """Decode audio latents to a 44.1 kHz stereo waveform (PIPELINE.md §15.2).

        Oobleck decode to ``hop_samples * A`` samples treated as ``model_sample_rate`` Hz (released
        VAE: ``2048 * A`` at 51.2 kHz), then ``scipy.signal.resample`` (FFT, no window) along time to
        ``1764 * A`` samples (factor ``44100 / model_sample_rate``: 441/512 for the released VAE);
        no clipping.

        Args:
            latent: ``float32 [1, A, 64]``.

        Returns:
            ``(wave, 44100)`` with ``wave`` ``float32 [1764 * A, 2]`` (duration exactly ``A / 25`` s).

        Raises:
            ValueError: ``latent`` is not ``[1, A>=1, 64]``.
        """
        wave = self.decode_model_rate(latent)[0].T.cpu().numpy()  # [hop A, 2] at the model rate
        n_out = OUTPUT_SAMPLES_PER_LATENT * latent.shape[1]
        out = scipy.signal.resample(wave, n_out, axis=0)
        return np.ascontiguousarray(out, dtype=np.float32), OUTPUT_SAMPLE_RATE

    @torch.no_grad()
    def encode(
        self,
        waveform: np.ndarray,
        sample_rate: int,
        generator: torch.Generator | None = None,
        max_seconds: float | None = None,
    ) -> torch.Tensor:
        """Encode mono audio to latents for audio-to-video (PIPELINE.md §13 steps 1-4).

        Resamples to ``model_sample_rate`` (51,200 Hz for the released VAE) with soxr, keeps the first
        ``max_seconds * model_sample_rate`` samples, duplicates mono to stereo, runs the encoder in
        ``encode_dtype`` (fp32 unless built otherwise) and draws a posterior **sample**
        ``mean + (softplus(scale) + 1e-4) * eps`` with ``generator``.

        Args:
            waveform: ``float32 [N]`` mono samples in [-1, 1].
            sample_rate: rate of ``waveform`` in Hz (> 0).
            generator: torch generator for the posterior noise (``None``: global RNG).
            max_seconds: optional cap on the encoded duration in seconds.

        Returns:
            ``float32 [1, A, 64]`` with ``A = floor(N_model / hop_samples)`` (released VAE:
            ``floor(N_51200 / 2048)``), 25 latents per second.

        Raises:
            ValueError: not mono, bad ``sample_rate``/``max_seconds``, fewer than ``hop_samples`` samples
                at the model rate, or more than 29 s (the windowed long-audio path is not implemented).
        """
        x = np.asarray(waveform, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"waveform must be mono [N], got shape {list(x.shape)}")
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be > 0 Hz, got {sample_rate}")
        if max_seconds is not None and max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
        rate, hop = self.model_sample_rate, self.hop_samples
        if sample_rate != rate:
            x = soxr.resample(x, sample_rate, rate).astype(np.float32, copy=False)
        if max_seconds is not None:
            x = x[: int(max_seconds * rate)]
        n = x.shape[0]
        if n > MAX_ENCODE_SECONDS * rate:
            raise ValueError(
                f"audio is {n / rate:.2f} s long; the limit is {MAX_ENCODE_SECONDS:g} s "
                f"({int(MAX_ENCODE_SECONDS * rate)} samples at {rate} Hz)"
            )
        if n < hop:
            raise ValueError(f"audio must have at least {hop} samples at {rate} Hz, got {n}")
        stereo = torch.from_numpy(x).to(self.device)[None, None].expand(1, 2, n).contiguous()
        if self._fast_encoder is None:
            self._fast_encoder = self._folded_encoder()
        moments = self._fast_encoder(stereo.to(self.encode_dtype)).float()  # [1, 128, A] = mean | scale
        z = OobleckDiagonalGaussianDistribution(moments).sample(generator=generator)  # [1, 64, A]
        a = n // hop
        if z.shape[-1] != a:
            raise RuntimeError(f"encoder produced {z.shape[-1]} latents for {n} samples, expected {a}")
        return z.permute(0, 2, 1).float().contiguous()
