"""Turbo VAE decoder ("TurboVAED", CODECS.md §2): a decode-only student decoder for the Wan2.2 latent space.

Written by hand from CODECS.md §2 and the fixture description (fixtures/upstream/README.md §5); it is
not in diffusers. Architecture facts:

* Convs are "causal" in name only: time padding **replicates** the first/last frame ``(k_t - 1)/2``
  times on both sides, space is zero-padded ``k/2`` (§2.2). A block flagged ``decoder_is_dw_conv``
  uses a depthwise ``k x k x k`` conv followed by a pointwise ``1x1x1`` conv instead.
* RMSNorm over channels without weight, variance in float32 (eps 1e-8; 1e-6 for the shortcut norm).
* ResNet: ``conv2(SiLU(norm2(conv1(act1(norm1(x)))))) + shortcut``; ``act1`` is ReLU for the resnets
  that follow an upsampler inside an up-block.
* Upsample3d: time conv to 2C channels, the halves interleaved in time (first output frame dropped in
  a first chunk), then per frame nearest-exact x2 (in float32) + Conv2d 3x3. Upsample2d: only the
  spatial part.
* Tail: ``use_unpatchify`` true (real config): RMSNorm, SiLU, conv_out to 12 channels, 2x2
  un-patchify (channel ``c*4 + a*2 + b`` -> pixel (row ``2y + b``, col ``2x + a``)). ``use_unpatchify``
  false (fixture tiny config): RMSNorm, SiLU, per-frame Conv2d 3x3 + pixel_shuffle(2), RMSNorm, SiLU,
  conv_out to 3 channels.
* Config lists are in encoder order and reversed here: ``decoder_layers_per_block`` and
  ``decoder_is_dw_conv`` = [mid, up0..up3]; the other lists = [up0..up3].
* ``decode`` runs overlapping latent windows (first chunk ``first_chunk_size``, then ``step_size``
  latents with one latent of overlap on each side, 4 pixel frames trimmed per overlapped side, §2.4).

Parameter names match the upstream state dict (``decoder.conv_in.conv.weight``,
``decoder.up_blocks.0.upsamplers.0.time_conv.conv.weight``, ``...resample.1.weight``,
``...conv1.depthwise_conv.weight``, ``decoder.upsampler2d_1.conv.weight``...).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from engine.codecs.image import frames_to_uint8
from engine.codecs.video_vae import WAN22_LATENT_MEAN, WAN22_LATENT_STD

logger = logging.getLogger(__name__)

__all__ = [
    "TurboVAED",
    "TurboVAEDConfig",
    "check_turbo_fixtures",
    "load_turbo_checkpoint",
    "rel_l2",
    "unpatchify",
]

NORM_EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class TurboVAEDConfig:
    """Decoder hyper-parameters, 1:1 with the keys of the shipped ``TurboVAED`` JSON (CODECS.md §2.1).

    Defaults are the real ``TurboV3-Wan22-TinyShallow_7_7`` values. Lists are in encoder order.
    """

    latent_channels: int = 48
    out_channels: int = 3
    decoder_block_out_channels: tuple[int, ...] = (64, 128, 256, 512)
    decoder_layers_per_block: tuple[int, ...] = (2, 2, 2, 3, 3)
    decoder_spatio_temporal_scaling: tuple[bool, ...] = (False, True, True, True)
    decoder_spatio_only: tuple[bool, ...] = (False, True, False, False)
    decoder_is_dw_conv: tuple[bool, ...] | None = None
    decoder_dw_kernel_size: int = 3
    patch_size: int = 2
    use_unpatchify: bool = True
    first_chunk_size: int = 7
    step_size: int = 7
    spatial_compression_ratio: int = 16
    temporal_compression_ratio: int = 4
    decoder_causal: bool = False
    resnet_norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> TurboVAEDConfig:
        """Build from a config dict; unknown keys (``in_channels``, ``scaling_factor``...) are ignored.

        Raises:
            ValueError: see :meth:`validate`.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in names}
        ignored = sorted(k for k in config if k not in names and not k.startswith("_"))
        if ignored:
            logger.debug("TurboVAED config keys ignored: %s", ignored)
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check the invariants the decoder relies on.

        Raises:
            ValueError: naming the offending key: ``latent_channels`` not 48, ``patch_size`` not 2,
                ``decoder_causal`` true, list lengths inconsistent, compression ratios that do not match
                the upsamplers, or window sizes < 1.
        """
        n = len(self.decoder_block_out_channels)
        if self.latent_channels != 48:
            raise ValueError(f"latent_channels must be 48 (Wan2.2 latent), got {self.latent_channels}")
        if self.patch_size != 2:
            raise ValueError(f"patch_size must be 2, got {self.patch_size}")
        if self.decoder_causal:
            raise ValueError("decoder_causal must be false")
        if len(self.decoder_layers_per_block) != n + 1:
            raise ValueError(
                f"decoder_layers_per_block must have {n + 1} entries, got {len(self.decoder_layers_per_block)}"
            )
        for key in ("decoder_spatio_temporal_scaling", "decoder_spatio_only"):
            if len(getattr(self, key)) != n:
                raise ValueError(f"{key} must have {n} entries, got {len(getattr(self, key))}")
        if self.decoder_is_dw_conv is not None and len(self.decoder_is_dw_conv) != n + 1:
            raise ValueError(
                f"decoder_is_dw_conv must have {n + 1} entries, got {len(self.decoder_is_dw_conv)}"
            )
        temporal = sum(
            s and not o
            for s, o in zip(self.decoder_spatio_temporal_scaling, self.decoder_spatio_only, strict=True)
        )
        # Spatial: every upsampler doubles, plus the final 2x (un-patchify or pixel shuffle).
        spatial = sum(self.decoder_spatio_temporal_scaling) + 1
        if 2**temporal != self.temporal_compression_ratio or 2**spatial != self.spatial_compression_ratio:
            raise ValueError(
                f"temporal_compression_ratio/spatial_compression_ratio must match the upsamplers "
                f"({2**temporal}/{2**spatial}), got {self.temporal_compression_ratio}/{self.spatial_compression_ratio}"
            )
        if self.first_chunk_size < 1 or self.step_size < 1:
            raise ValueError(
                f"first_chunk_size and step_size must be >= 1, got {self.first_chunk_size}, {self.step_size}"
            )


def _rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Channel RMSNorm without weight (CODECS.md §2.2): ``x * rsqrt(mean_c(x_f32^2) + eps)`` in fp32, cast back."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(dim=1, keepdim=True) + eps)).to(x.dtype)


def _pad_time_replicate(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Repeat the first and last frame ``pad`` times along time. ``x: [B, C, T, H, W]``."""
    if pad == 0:
        return x
    return torch.cat(
        [x[:, :, :1].expand(-1, -1, pad, -1, -1), x, x[:, :, -1:].expand(-1, -1, pad, -1, -1)], dim=2
    )


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D op to every frame: ``[B, C, T, H, W] -> [B, C', T, H', W']``."""
    b, c, t, h, w = x.shape
    y = fn(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
    return y.reshape(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)


class CausalConv3d(nn.Module):
    """Conv3d with replicate time padding and zero spatial padding, stride 1 (CODECS.md §2.2).

    ``forward(x: [B, Cin, T, H, W]) -> [B, Cout, T, H, W]``. Weight key: ``conv.weight``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int]) -> None:
        super().__init__()
        k = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        self.time_pad = (k[0] - 1) // 2
        self.conv = nn.Conv3d(in_channels, out_channels, k, padding=(0, k[1] // 2, k[2] // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_pad_time_replicate(x, self.time_pad))


class DepthwiseSeparableConv3d(nn.Module):
    """Depthwise ``k x k x k`` conv (same padding rules as :class:`CausalConv3d`) then pointwise ``1x1x1``.

    ``forward(x: [B, Cin, T, H, W]) -> [B, Cout, T, H, W]``. Keys: ``depthwise_conv.*``, ``pointwise_conv.*``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.time_pad = (kernel_size - 1) // 2
        self.depthwise_conv = nn.Conv3d(
            in_channels,
            in_channels,
            kernel_size,
            padding=(0, kernel_size // 2, kernel_size // 2),
            groups=in_channels,
        )
        self.pointwise_conv = nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(_pad_time_replicate(x, self.time_pad)))


class ResnetBlock3d(nn.Module):
    """ResNet block (CODECS.md §2.2): ``y = conv2(SiLU(norm2(conv1(act1(norm1(x)))))) + shortcut(x)``.

    ``act1`` is ReLU when ``relu_first`` (resnets after an upsampler), else SiLU. The shortcut is
    ``conv_shortcut(norm3(x))`` (kernel 1, eps ``shortcut_eps``) when channels change, else identity.
    With ``dw`` every conv is a :class:`DepthwiseSeparableConv3d` (``dw_kernel`` for conv1/conv2).
    ``forward(x: [B, Cin, T, H, W]) -> [B, Cout, T, H, W]``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        dw: bool,
        dw_kernel: int,
        relu_first: bool,
        shortcut_eps: float,
    ) -> None:
        super().__init__()

        def conv(cin: int, cout: int, kernel: int) -> nn.Module:
            return DepthwiseSeparableConv3d(cin, cout, kernel) if dw else CausalConv3d(cin, cout, kernel)

        self.relu_first = relu_first
        self.shortcut_eps = shortcut_eps
        k = dw_kernel if dw else 3
        self.conv1 = conv(in_channels, out_channels, k)
        self.conv2 = conv(out_channels, out_channels, k)
        # The shortcut uses the block's conv type with kernel 1 (depthwise-separable in dw blocks).
        self.conv_shortcut = conv(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _rms_norm(x, NORM_EPS)
        h = F.relu(h) if self.relu_first else F.silu(h)
        h = self.conv1(h)
        h = self.conv2(F.silu(_rms_norm(h, NORM_EPS)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(_rms_norm(x, self.shortcut_eps))
        return h + shortcut


class Upsampler(nn.Module):
    """Wan-style upsampler (CODECS.md §2.2): Upsample3d (``temporal``) or Upsample2d.

    ``forward(x: [B, C, T, H, W], first_chunk) -> [B, C, T', 2H, 2W]`` with ``T' = 2T`` (3-D, non-first
    chunk), ``2T - 1`` (3-D, first chunk) or ``T`` (2-D). Keys: ``time_conv.conv.*`` (3-D only) and
    ``resample.1.*`` (the Conv2d after the nearest-exact upsample at ``resample.0``).
    """

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1)) if temporal else None
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=2.0, mode="nearest-exact"), nn.Conv2d(dim, dim, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        if self.time_conv is not None:
            b, c, t, h, w = x.shape
            y = self.time_conv(x).reshape(b, 2, c, t, h, w)
            x = torch.stack([y[:, 0], y[:, 1]], dim=3).reshape(b, c, 2 * t, h, w)  # A_0, B_0, A_1, B_1, ...
            if first_chunk:
                x = x[:, :, 1:]
        up, conv = self.resample[0], self.resample[1]
        return _per_frame(lambda f: conv(up(f.float()).to(f.dtype)), x)


class MidBlock(nn.Module):
    """Middle block: ResNets only (no attention). ``[B, C, T, H, W] -> same``."""

    def __init__(self, dim: int, num_layers: int, *, dw: bool, dw_kernel: int, shortcut_eps: float) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3d(dim, dim, dw=dw, dw_kernel=dw_kernel, relu_first=False, shortcut_eps=shortcut_eps)
            for _ in range(num_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x


class UpBlock(nn.Module):
    """Up block (CODECS.md §2.3): ``conv_in`` ResNet when channels change, optional upsampler, ResNets.

    ResNets after an upsampler use ReLU as their first activation.
    ``forward(x: [B, Cin, T, H, W], first_chunk) -> [B, Cout, T', H', W']``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        *,
        upsample: bool,
        spatial_only: bool,
        dw: bool,
        dw_kernel: int,
        shortcut_eps: float,
    ) -> None:
        super().__init__()
        kw = dict(dw=dw, dw_kernel=dw_kernel, shortcut_eps=shortcut_eps)
        self.conv_in = (
            ResnetBlock3d(in_channels, out_channels, relu_first=False, **kw)
            if in_channels != out_channels
            else None
        )
        self.upsamplers = (
            nn.ModuleList([Upsampler(out_channels, temporal=not spatial_only)]) if upsample else None
        )
        self.resnets = nn.ModuleList(
            ResnetBlock3d(out_channels, out_channels, relu_first=upsample, **kw) for _ in range(num_layers)
        )

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        if self.conv_in is not None:
            x = self.conv_in(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, first_chunk)
        for resnet in self.resnets:
            x = resnet(x)
        return x


class PixelShuffleUpsampler2d(nn.Module):
    """Per-frame Conv2d 3x3 then ``pixel_shuffle(2)``: ``[B, C, T, H, W] -> [B, C/4, T, 2H, 2W]``. Key: ``conv.*``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _per_frame(lambda f: F.pixel_shuffle(self.conv(f), 2), x)


def unpatchify(x: torch.Tensor, patch_size: int = 2) -> torch.Tensor:
    """2x2 un-patchify (CODECS.md §2.3): ``[B, C*p*p, F, H, W] -> [B, C, F, pH, pW]``.

    Channel ``c*p*p + a*p + b`` goes to pixel ``(row = p*y + b, col = p*x + a)`` (a: column offset,
    b: row offset), the Wan VAE convention.
    """
    bsz, cpp, f, h, w = x.shape
    p = patch_size
    x = x.reshape(bsz, cpp // (p * p), p, p, f, h, w)  # [B, C, a, b, F, H, W]
    x = x.permute(0, 1, 4, 5, 3, 6, 2)  # [B, C, F, H, b, W, a]
    return x.reshape(bsz, cpp // (p * p), f, h * p, w * p)


class TurboDecoder(nn.Module):
    """The decoder graph of CODECS.md §2.3 (or the fixture's pixel-shuffle tail).

    ``forward(z: [B, 48, L, h, w] raw latent, first_chunk) -> [B, 3, F, 16h, 16w]`` with ``F = 4L - 3``
    for a first chunk, else ``4L`` (with the standard scaling flags).
    """

    def __init__(self, cfg: TurboVAEDConfig) -> None:
        super().__init__()
        widths = list(reversed(cfg.decoder_block_out_channels))
        layers = list(reversed(cfg.decoder_layers_per_block))
        scaling = list(reversed(cfg.decoder_spatio_temporal_scaling))
        spatial_only = list(reversed(cfg.decoder_spatio_only))
        dw = list(reversed(cfg.decoder_is_dw_conv or [False] * len(layers)))
        kw = dict(dw_kernel=cfg.decoder_dw_kernel_size, shortcut_eps=cfg.resnet_norm_eps)

        self.use_unpatchify = cfg.use_unpatchify
        self.patch_size = cfg.patch_size
        self.conv_in = CausalConv3d(cfg.latent_channels, widths[0], 3)
        self.mid_block = MidBlock(widths[0], layers[0], dw=dw[0], **kw)
        self.up_blocks = nn.ModuleList()
        prev = widths[0]
        for i, width in enumerate(widths):
            self.up_blocks.append(
                UpBlock(
                    prev,
                    width,
                    layers[i + 1],
                    upsample=scaling[i],
                    spatial_only=spatial_only[i],
                    dw=dw[i + 1],
                    **kw,
                )
            )
            prev = width
        if cfg.use_unpatchify:
            self.upsampler2d_1 = None
            self.conv_out = CausalConv3d(prev, cfg.out_channels * cfg.patch_size**2, 3)
        else:
            self.upsampler2d_1 = PixelShuffleUpsampler2d(prev)
            self.conv_out = CausalConv3d(prev // 4, cfg.out_channels, 3)

    def forward(self, z: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x, first_chunk)
        x = F.silu(_rms_norm(x, NORM_EPS))
        if self.upsampler2d_1 is not None:
            x = F.silu(_rms_norm(self.upsampler2d_1(x), NORM_EPS))
        x = self.conv_out(x)
        if self.use_unpatchify:
            x = unpatchify(x, self.patch_size)
        return x


class TurboVAED(nn.Module):
    """Turbo VAE decoder with the sliding-window decode of CODECS.md §2.4.

    Input latents are normalised Wan2.2 latents ``float32 [1, 48, T, h, w]``; they are cast to the module
    dtype, de-normalised in fp32 with fp32 constants as ``z / (1/std) + mean``, cast back, and decoded
    window by window. Output ``[1, 3, 4T - 3, 16h, 16w]`` float32, roughly in [-1, 1], not clamped.

    The module dtype is the compute dtype (bf16 upstream: ``.to(torch.bfloat16)``; the constants stay
    fp32). On CPU, bf16 convolutions through oneDNN round differently from PyTorch's native kernels
    that produced the upstream fixtures (rel_l2 ~7e-3 between the two; see :func:`check_turbo_fixtures`).
    """

    def __init__(self, config: TurboVAEDConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.decoder = TurboDecoder(config)
        # fp32 constants (CODECS.md §1.4, §2.4); plain attributes so that .to(bf16) leaves them fp32.
        self._mean = torch.tensor(WAN22_LATENT_MEAN, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._inv_std = (1.0 / torch.tensor(WAN22_LATENT_STD, dtype=torch.float32)).view(1, -1, 1, 1, 1)

    @classmethod
    def from_config(cls, config: dict[str, Any] | str | Path | TurboVAEDConfig) -> TurboVAED:
        """Build from a config dict, a JSON file path, or a :class:`TurboVAEDConfig` (unknown keys ignored).

        Weights are PyTorch's default initialisation; load real ones with :func:`load_turbo_checkpoint`.
        """
        if isinstance(config, (str, Path)):
            config = json.loads(Path(config).read_text())
        if isinstance(config, dict):
            config = TurboVAEDConfig.from_dict(config)
        return cls(config)

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype."""
        return next(self.parameters()).dtype

    def denormalize(self, latent: torch.Tensor) -> torch.Tensor:
        """``bf16/fp32(fp32(z) / inv_std + mean)`` with fp32 constants (CODECS.md §2.4 step 2).

        Args:
            latent: ``[1, 48, T, h, w]`` normalised latent; first cast to the module dtype.

        Returns:
            Raw latent in the module dtype.
        """
        dev = self.decoder.conv_in.conv.weight.device
        z = latent.to(dev, self.dtype).float()
        z = z / self._inv_std.to(dev) + self._mean.to(dev)
        return z.to(self.dtype)

    def windows(self, num_latents: int) -> list[tuple[int, int, bool, int, int]]:
        """Window plan for ``num_latents`` (already padded) latents (CODECS.md §2.4 steps 3-4).

        Returns:
            ``(start, stop, first_chunk, drop_front, drop_back)`` per window: latent range and the
            number of output frames trimmed at each end.
        """
        fc, step = self.config.first_chunk_size, self.config.step_size
        overlap = self.config.temporal_compression_ratio  # pixel frames per overlapped latent
        if num_latents == fc:
            return [(0, fc, True, 0, 0)]
        plan = [(0, fc + 1, True, 0, overlap)]
        for i in range(fc, num_latents, step):
            last = i + step >= num_latents
            stop = num_latents if last else i + step + 1
            plan.append((i - 1, stop, False, overlap, 0 if last else overlap))
        return plan

    def padded_length(self, num_latents: int) -> int:
        """``T'``: ``first_chunk_size`` if ``T`` is smaller, else the next ``first_chunk_size + n * step_size``."""
        fc, step = self.config.first_chunk_size, self.config.step_size
        if num_latents <= fc:
            return fc
        return fc + -(-(num_latents - fc) // step) * step

    @torch.no_grad()
    def decode_chunks(self, latent: torch.Tensor) -> Iterator[torch.Tensor]:
        """Decode window by window, yielding trimmed frame chunks as soon as each window is done.

        Args:
            latent: ``float32 [1, 48, T, h, w]`` normalised latent, ``T >= 1``.

        Yields:
            ``float32 [1, 3, f_i, 16h, 16w]``; the chunks concatenate (in time) to the output of
            :meth:`decode`, ``sum(f_i) = 4T - 3``.

        Raises:
            ValueError: ``latent`` is not ``[1, 48, T>=1, h, w]``.
        """
        if latent.ndim != 5 or latent.shape[0] != 1 or latent.shape[1] != 48 or latent.shape[2] < 1:
            raise ValueError(f"latent must be [1, 48, T>=1, h, w], got {list(latent.shape)}")
        t = latent.shape[2]
        z = self.denormalize(latent)
        t_pad = self.padded_length(t)
        if t_pad > t:
            z = torch.cat([z, z[:, :, -1:].expand(-1, -1, t_pad - t, -1, -1)], dim=2)
        frames_left = self.config.temporal_compression_ratio * (t - 1) + 1
        for start, stop, first, drop_front, drop_back in self.windows(t_pad):
            out = self.decoder(z[:, :, start:stop], first_chunk=first)
            out = out[:, :, drop_front : out.shape[2] - drop_back][:, :, :frames_left]
            frames_left -= out.shape[2]
            if out.shape[2] > 0:
                yield out.float()
            if frames_left <= 0:
                break

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Sliding-window decode (CODECS.md §2.4): ``float32 [1, 48, T, h, w] -> float32 [1, 3, 4T - 3, 16h, 16w]``.

        Raises:
            ValueError: ``latent`` is not ``[1, 48, T>=1, h, w]``.
        """
        return torch.cat(list(self.decode_chunks(latent)), dim=2)

    def decode_to_uint8(self, latent: torch.Tensor) -> np.ndarray:
        """:meth:`decode` then :func:`~engine.codecs.image.frames_to_uint8`: ``uint8 [4T - 3, 16h, 16w, 3]``."""
        return frames_to_uint8(self.decode(latent))


def load_turbo_checkpoint(module: TurboVAED, path: str | Path) -> TurboVAED:
    """Load decoder weights into ``module`` (CODECS.md §2.5).

    ``.ckpt``/``.pt``: ``torch.load(weights_only=True)`` of a dict holding ``"ema_state_dict"``.
    ``.safetensors``: a plain state dict. A leading ``"module."`` is stripped from every key,
    training-only ``aligned_feature_projection*`` keys are ignored, and prefix-less decoder keys (first
    key starting with neither ``decoder.`` nor ``encoder.``) are loaded into ``module.decoder``.

    Returns:
        ``module`` (weights loaded in place; dtype unchanged).

    Raises:
        ValueError: no ``ema_state_dict`` in a pickle checkpoint, or decoder keys missing (named).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or "ema_state_dict" not in ckpt:
            raise ValueError(f"{path}: checkpoint must be a dict with key 'ema_state_dict'")
        state = ckpt["ema_state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("aligned_feature_projection")}
    first = next(iter(state), "")
    if not first.startswith(("decoder.", "encoder.")):
        state = {f"decoder.{k}": v for k, v in state.items()}
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise ValueError(
            f"{path}: missing {len(result.missing_keys)} decoder keys: {sorted(result.missing_keys)}"
        )
    if result.unexpected_keys:
        logger.warning(
            "%s: ignored %d unexpected keys, e.g. %s",
            path,
            len(result.unexpected_keys),
            result.unexpected_keys[:3],
        )
    return module


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    """``||a - ref||_2 / ||ref||_2`` over all elements, in float64."""
    a64, r64 = a.double(), ref.double()
    return float((a64 - r64).norm() / r64.norm())


def check_turbo_fixtures(fixture_dir: str | Path) -> list[tuple[str, float, float, bool]]:
    """Parity of this decoder against the upstream tiny fixtures (fixtures/upstream/README.md §5).

    Builds the tiny config with its weights and decodes both cases in fp32 (vs ``decoded_fp32``,
    ``latent_denormalized``, ``decoder_first_window_fp32``) and in bf16 (weights + latent bf16, constants
    fp32; vs ``decoded_bf16`` and ``frames_uint8_bf16path``). The bf16 decode runs with oneDNN disabled:
    the fixtures were produced by PyTorch's native CPU conv kernels, and with them the bf16 output and
    its uint8 frames are bit-identical; oneDNN's bf16 convs round differently (~1/3 of the uint8 bytes
    then differ by one level, rel_l2 ~7e-3).

    Returns:
        ``(name, measured, tolerance, passed)`` per check; ``passed`` is ``measured <= tolerance``.
        ``*.bytes_differing`` checks count differing uint8 bytes.

    Raises:
        FileNotFoundError: fixture files absent.
    """
    d = Path(fixture_dir)
    fp32 = TurboVAED.from_config(d / "turbo_vaed_tiny_config.json")
    load_turbo_checkpoint(fp32, d / "turbo_vaed_tiny_weights.safetensors")
    bf16 = TurboVAED.from_config(d / "turbo_vaed_tiny_config.json")
    bf16.load_state_dict(fp32.state_dict())
    bf16.to(torch.bfloat16)

    results: list[tuple[str, float, float, bool]] = []

    def add(name: str, measured: float, tol: float) -> None:
        results.append((name, measured, tol, measured <= tol))

    for case in ("single_window", "sliding_window"):
        ref = load_file(str(d / f"turbo_vaed_tiny_{case}.safetensors"))
        latent = ref["latent"]
        den = fp32.denormalize(latent)
        add(
            f"{case}.latent_denormalized.max_abs", float((den - ref["latent_denormalized"]).abs().max()), 1e-6
        )
        out = fp32.decode(latent)
        add(f"{case}.decoded_fp32.rel_l2", rel_l2(out, ref["decoded_fp32"]), 1e-5)
        add(f"{case}.decoded_fp32.max_abs", float((out - ref["decoded_fp32"]).abs().max()), 2e-4)
        if "decoder_first_window_fp32" in ref:
            with torch.no_grad():
                win = fp32.decoder(den[:, :, : fp32.config.first_chunk_size + 1], first_chunk=True)
            add(
                f"{case}.decoder_first_window_fp32.rel_l2",
                rel_l2(win, ref["decoder_first_window_fp32"]),
                1e-5,
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # oneDNN TF32 notice emitted by mkldnn.flags
            with torch.backends.mkldnn.flags(enabled=False):
                out16 = bf16.decode(latent)
        add(f"{case}.decoded_bf16.rel_l2", rel_l2(out16, ref["decoded_bf16"]), 1e-1)
        frames_ref = ref["frames_uint8_bf16path"].numpy()
        add(f"{case}.frames_uint8.bytes_differing", float((frames_to_uint8(out16) != frames_ref).sum()), 0.0)
    return results
