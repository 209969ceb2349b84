"""Architecture constants of the single-stream DiT, one dataclass that maps 1:1 to the
checkpoint's ``ModelConfig`` (DIT.md §1), and the named size presets.

Sampler and pipeline knobs (steps, shift, guidance scales, fps) do not live here; see
:mod:`engine.schedules`, :mod:`engine.sampler` and :mod:`engine.pipeline`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# DIT.md §1.3: the 32 local-attention layers of the 1080p SR model (8 full layers: 3, 7, ..., 31).
LOCAL_ATTN_LAYERS_1080P = (
    0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, 16, 17, 18, 20, 21, 22,
    24, 25, 26, 28, 29, 30, 32, 33, 34, 35, 36, 37, 38, 39,
)


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of the MagiHuman single-stream DiT (DIT.md §1).

    Field names follow upstream ``ModelConfig`` so that a checkpoint's ``config.json`` (or the
    fixture's ``model_config``) loads with :meth:`from_dict`.

    Attributes:
        num_layers: transformer layers (40 in the released model).
        hidden_size: residual-stream width ``d`` (5120).
        head_dim: attention head size (128); ``num_heads_q = hidden_size // head_dim``.
        num_query_groups: K/V heads for grouped-query attention (8).
        video_in_channels: video patch features, ``48 * 1 * 2 * 2 = 192``.
        audio_in_channels: audio latent channels (64).
        text_in_channels: text-encoder feature width (3584 for T5Gemma-9B).
        mm_layers: "sandwich" layers with one expert per modality (video, audio, text).
        gelu7_layers: layers with the non-gated gelu7 MLP (intermediate ``4 d``); others swiglu7.
        local_attn_layers: layers using frame-local attention (1080p SR model only, §5.3).
        enable_attn_gating: per-head sigmoid gate on the attention output (§4.6).
        norm_eps: epsilon of every RMSNorm in the DiT (1e-6, §4.1).
    """

    num_layers: int = 40
    hidden_size: int = 5120
    head_dim: int = 128
    num_query_groups: int = 8
    video_in_channels: int = 192
    audio_in_channels: int = 64
    text_in_channels: int = 3584
    mm_layers: tuple[int, ...] = (0, 1, 2, 3, 36, 37, 38, 39)
    gelu7_layers: tuple[int, ...] = (0, 1, 2, 3)
    local_attn_layers: tuple[int, ...] = ()
    enable_attn_gating: bool = True
    norm_eps: float = 1e-6

    @property
    def num_heads_q(self) -> int:
        return self.hidden_size // self.head_dim

    @property
    def num_heads_kv(self) -> int:
        return self.num_query_groups

    @property
    def rope_bands(self) -> int:
        """Fourier bands per axis, ``head_dim // 8`` (16 for the real model, DIT.md §4.5)."""
        return self.head_dim // 8

    @property
    def swiglu_intermediate(self) -> int:
        """``floor(floor(d * 4 * 2 / 3) / 4) * 4`` (13652 for d = 5120, DIT.md §1.1)."""
        return int(self.hidden_size * 4 * 2 / 3) // 4 * 4

    @property
    def gelu_intermediate(self) -> int:
        return 4 * self.hidden_size

    @property
    def qkv_out_features(self) -> int:
        """q + k + v (+ one gate logit per query head): 7208 for the real model (DIT.md §1.1)."""
        gate = self.num_heads_q if self.enable_attn_gating else 0
        return (self.num_heads_q + 2 * self.num_heads_kv) * self.head_dim + gate

    @property
    def out_channels(self) -> int:
        """Width of the DiT output rows, ``max(video_in, audio_in)`` (DIT.md §3 step 6)."""
        return max(self.video_in_channels, self.audio_in_channels)

    @property
    def in_channels(self) -> int:
        """Width of the packed input rows, ``max(video_in, audio_in, text_in)``."""
        return max(self.video_in_channels, self.audio_in_channels, self.text_in_channels)

    @property
    def latent_channels(self) -> int:
        """Video latent channels ``z_dim`` (48): ``video_in_channels / (1 * 2 * 2)``."""
        return self.video_in_channels // 4

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field if the configuration is inconsistent."""
        if self.hidden_size % self.head_dim:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of head_dim {self.head_dim}")
        if self.num_heads_q % self.num_heads_kv:
            raise ValueError(
                f"num_heads_q {self.num_heads_q} must be a multiple of num_query_groups {self.num_heads_kv}"
            )
        if self.head_dim % 8:
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 8 (rotary bands)")
        if self.video_in_channels % 4:
            raise ValueError(f"video_in_channels {self.video_in_channels} must be 4 x latent channels")
        for name in ("mm_layers", "gelu7_layers", "local_attn_layers"):
            bad = [i for i in getattr(self, name) if not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(f"{name} has layers {bad} outside [0, {self.num_layers})")

    @classmethod
    def from_dict(cls, data: dict) -> DiTConfig:
        """Build from an upstream ``ModelConfig`` dict; unknown keys (tread_config, ...) are ignored.

        Raises:
            ValueError: ``post_norm_layers`` is non-empty (the released model has none and this
                port does not implement them) or ``activation_type`` is not ``swiglu7``.
        """
        if data.get("post_norm_layers"):
            raise ValueError("post_norm_layers is not supported (the released model has none)")
        if data.get("activation_type", "swiglu7") != "swiglu7":
            raise ValueError(f"activation_type {data['activation_type']!r} is not supported")
        kwargs = {}
        for f in cls.__dataclass_fields__:
            if f in data:
                value = data[f]
                kwargs[f] = tuple(value) if isinstance(value, list) else value
        config = cls(**kwargs)
        config.validate()
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> DiTConfig:
        data = json.loads(Path(path).read_text())
        return cls.from_dict(data.get("model_config", data))

    def to_dict(self) -> dict:
        return asdict(self)

    def with_local_attention(self, layers: tuple[int, ...] = LOCAL_ATTN_LAYERS_1080P) -> DiTConfig:
        return replace(self, local_attn_layers=tuple(layers))


def full_config() -> DiTConfig:
    """The released 15.3 B model (DIT.md §1): 40 layers, d 5120, GQA 40/8, T5Gemma-9B text."""
    return DiTConfig()


def preview_config() -> DiTConfig:
    """A small DiT of the same classes for CPU demos and tests (seeded, untrained weights).

    6 layers, d 192, head_dim 32 (6 query heads, 2 K/V heads), sandwich layers at both ends
    ([0, 1] gelu7 + [4, 5] swiglu7), text features of the preview T5Gemma encoder (128 wide).
    Sized so that a segment generates in about its own duration on 2 CPU cores.
    """
    return DiTConfig(
        num_layers=6,
        hidden_size=192,
        head_dim=32,
        num_query_groups=2,
        text_in_channels=128,
        mm_layers=(0, 1, 4, 5),
        gelu7_layers=(0, 1),
    )


PRESETS = {"full": full_config, "preview": preview_config}


def get_config(name: str) -> DiTConfig:
    """Return the named preset (``full`` or ``preview``).

    Raises:
        ValueError: unknown preset name (the message lists the known ones).
    """
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown DiT preset {name!r}; known: {sorted(PRESETS)}") from None
