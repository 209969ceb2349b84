"""Packing video, audio and text into one DiT sequence, and unpacking its output
(PIPELINE.md §8-§9, fixtures/upstream/README.md §2).

Sequence order is always ``[video tokens | audio tokens | text tokens]``. Two asymmetries are
reproduced on purpose (PIPELINE.md §17.1): video tokens are *packed* channel-major
(feature ``c*4 + dy*2 + dx``) but the DiT output is *unpacked* channel-minor
(feature ``(dy*2 + dx)*C + c``), so ``unpack(pack(v)) != v``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from engine.dit import AttentionRanges, Span

VIDEO, AUDIO, TEXT = 0, 1, 2
PATCH = 2  # spatial patch (1 x 2 x 2), PIPELINE.md §2.1
FRAME_RECEPTIVE_FIELD = 11  # DataProxyConfig.frame_receptive_field, PIPELINE.md §2.2

CoordsStyle = Literal["v1", "v2"]


@dataclass
class PackedInputs:
    """One DiT call's inputs.

    Attributes:
        x: fp32 ``[L, in_channels]`` token features, each modality zero-padded on the right.
        coords: fp32 ``[L, 9]`` rotary coordinates ``(pos t,h,w, size t,h,w, ref t,h,w)``.
        modality: int64 ``[L]`` (0 video, 1 audio, 2 text).
        spans: contiguous modality runs ``(modality, start, end)`` (host-side ints).
        local_ranges: frame-local attention (query, key) ranges, ``[T + 2, 2]`` int32 each.
        latent_shape: ``(C, T, H, W)`` of the video latent (for unpacking).
        num_video, num_audio, num_text: token counts.
    """

    x: torch.Tensor
    coords: torch.Tensor
    modality: torch.Tensor
    spans: list[Span]
    local_ranges: AttentionRanges
    latent_shape: tuple[int, int, int, int]
    num_video: int
    num_audio: int
    num_text: int

    @property
    def length(self) -> int:
        return self.num_video + self.num_audio + self.num_text


def patchify_video(latent: torch.Tensor) -> torch.Tensor:
    """``[1, C, T, H, W]`` -> ``[T * H/2 * W/2, 4 C]``, tokens (t, row, col), features (c, dy, dx)
    channel-major (PIPELINE.md §8.1).

    Raises:
        ValueError: batch is not 1 or H, W are not even.
    """
    if latent.dim() != 5 or latent.shape[0] != 1:
        raise ValueError(f"video latent must be [1, C, T, H, W], got {tuple(latent.shape)}")
    _, c, t, h, w = latent.shape
    if h % PATCH or w % PATCH:
        raise ValueError(f"video latent height {h} and width {w} must be even")
    x = latent[0].reshape(c, t, h // PATCH, PATCH, w // PATCH, PATCH)
    return x.permute(1, 2, 4, 0, 3, 5).reshape(t * (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpatchify_video(tokens: torch.Tensor, latent_shape: tuple[int, int, int, int]) -> torch.Tensor:
    """``[Nv, 4 C]`` DiT output rows -> ``[1, C, T, H, W]`` reading features as (dy, dx, c),
    channel innermost (PIPELINE.md §9, DIT.md §7)."""
    c, t, h, w = latent_shape
    y = tokens[:, : 4 * c].reshape(t, h // PATCH, w // PATCH, PATCH, PATCH, c)
    return y.permute(5, 0, 1, 3, 2, 4).reshape(1, c, t, h, w)


def local_attention_ranges(
    num_video: int, num_total: int, latent_frames: int, frame_receptive_field: int = FRAME_RECEPTIVE_FIELD
) -> AttentionRanges:
    """Frame-local attention ranges (PIPELINE.md §8.5, DIT.md §5.3).

    Per latent frame f: queries ``[f P, (f+1) P)`` see video keys of frames
    ``f - frf .. f + frf`` (clipped); then video queries see all audio+text keys, and
    audio+text queries see every key. ``P = num_video / latent_frames``.
    """
    per_frame = num_video // latent_frames if latent_frames else 0
    q, k = [], []
    for f in range(latent_frames):
        q.append((f * per_frame, (f + 1) * per_frame))
        k.append((max(0, (f - frame_receptive_field) * per_frame), min(num_video, (f + frame_receptive_field + 1) * per_frame)))
    q.append((0, num_video))
    k.append((num_video, num_total))
    q.append((num_video, num_total))
    k.append((0, num_total))
    return AttentionRanges(torch.tensor(q, dtype=torch.int32), torch.tensor(k, dtype=torch.int32))


def build_coords(
    latent_frames: int, grid_h: int, grid_w: int, num_audio: int, num_text: int, style: CoordsStyle
) -> torch.Tensor:
    """Rotary coordinates ``[Nv + Na + Nt, 9]`` fp32 (PIPELINE.md §8.4).

    v2 (base/distill): audio ref ``((A-1)//4 + 1, 1, 1)``, text pos ``j - Nt`` with ref (1,1,1).
    v1 (SR): audio ref ``(T, 1, 1)``, text pos ``j`` with ref (2,1,1).
    """
    if style not in ("v1", "v2"):
        raise ValueError(f"coords style must be 'v1' or 'v2', got {style!r}")
    t, r, c = torch.meshgrid(
        torch.arange(latent_frames), torch.arange(grid_h), torch.arange(grid_w), indexing="ij"
    )
    n_video = latent_frames * grid_h * grid_w
    video = torch.zeros(n_video, 9)
    video[:, 0], video[:, 1], video[:, 2] = t.flatten(), r.flatten(), c.flatten()
    video[:, 3:6] = torch.tensor([latent_frames, grid_h, grid_w], dtype=torch.float32)
    video[:, 6:9] = video[:, 3:6]

    audio = torch.zeros(num_audio, 9)
    audio[:, 0] = torch.arange(num_audio)
    audio[:, 3:6] = torch.tensor([num_audio, 1, 1], dtype=torch.float32)
    audio_ref_t = (num_audio - 1) // 4 + 1 if style == "v2" else latent_frames
    audio[:, 6:9] = torch.tensor([audio_ref_t, 1, 1], dtype=torch.float32)

    text = torch.zeros(num_text, 9)
    j = torch.arange(num_text, dtype=torch.float32)
    text[:, 0] = j - num_text if style == "v2" else j
    text[:, 3:6] = torch.tensor([num_text, 1, 1], dtype=torch.float32)
    text[:, 6:9] = torch.tensor([1 if style == "v2" else 2, 1, 1], dtype=torch.float32)
    return torch.cat([video, audio, text], dim=0)


def pack(
    video_latent: torch.Tensor,
    audio_latent: torch.Tensor,
    text_features: torch.Tensor,
    *,
    num_audio: int | None = None,
    num_text: int | None = None,
    in_channels: int | None = None,
    coords_style: CoordsStyle = "v2",
    frame_receptive_field: int = FRAME_RECEPTIVE_FIELD,
) -> PackedInputs:
    """Pack one DiT call (PIPELINE.md §8).

    Args:
        video_latent: fp32 ``[1, C, T, H, W]``.
        audio_latent: fp32 ``[1, A_rows, C_audio]``; the first ``num_audio`` rows are used.
        text_features: fp32 ``[1, L_rows, C_text]`` or ``[L_rows, C_text]``; the first
            ``num_text`` rows are used (the zero padding to 640 is dropped, §8.3).
        num_audio, num_text: token counts (default: all rows).
        in_channels: width of ``x`` (default ``max`` of the three feature widths).
        coords_style: ``v2`` for the base/distill model, ``v1`` for the SR model.
        frame_receptive_field: local-attention window in latent frames.

    Raises:
        ValueError: a count exceeds the rows given, or a feature width exceeds ``in_channels``.
    """
    if text_features.dim() == 2:
        text_features = text_features[None]
    num_audio = audio_latent.shape[1] if num_audio is None else num_audio
    num_text = text_features.shape[1] if num_text is None else num_text
    if not 0 <= num_audio <= audio_latent.shape[1]:
        raise ValueError(f"num_audio {num_audio} outside [0, {audio_latent.shape[1]}] audio rows")
    if not 0 <= num_text <= text_features.shape[1]:
        raise ValueError(f"num_text {num_text} outside [0, {text_features.shape[1]}] text rows")
    video_tokens = patchify_video(video_latent.float())
    audio_tokens = audio_latent[0, :num_audio].float()
    text_tokens = text_features[0, :num_text].float()
    widths = (video_tokens.shape[1], audio_tokens.shape[1], text_tokens.shape[1])
    in_channels = max(widths) if in_channels is None else in_channels
    if max(widths) > in_channels:
        raise ValueError(f"feature widths {widths} exceed in_channels {in_channels}")
    n_video = video_tokens.shape[0]
    total = n_video + num_audio + num_text
    x = video_tokens.new_zeros(total, in_channels)
    x[:n_video, : widths[0]] = video_tokens
    x[n_video : n_video + num_audio, : widths[1]] = audio_tokens
    x[n_video + num_audio :, : widths[2]] = text_tokens
    modality = torch.cat([
        torch.full((n_video,), VIDEO, dtype=torch.int64),
        torch.full((num_audio,), AUDIO, dtype=torch.int64),
        torch.full((num_text,), TEXT, dtype=torch.int64),
    ]).to(x.device)
    _, c, t, h, w = video_latent.shape
    coords = build_coords(t, h // PATCH, w // PATCH, num_audio, num_text, coords_style).to(x.device)
    spans = [(m, s, e) for m, s, e in (
        (VIDEO, 0, n_video), (AUDIO, n_video, n_video + num_audio), (TEXT, n_video + num_audio, total)
    ) if e > s]
    ranges = local_attention_ranges(n_video, total, t, frame_receptive_field)
    return PackedInputs(x, coords, modality, spans, ranges, (c, t, h, w), n_video, num_audio, num_text)


def unpack(out: torch.Tensor, packed: PackedInputs, audio_channels: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """DiT output ``[L, Cout]`` -> (video ``[1, C, T, H, W]``, audio ``[1, A, audio_channels]``),
    text rows discarded (PIPELINE.md §9)."""
    nv, na = packed.num_video, packed.num_audio
    video = unpatchify_video(out[:nv], packed.latent_shape)
    audio = out[nv : nv + na, :audio_channels][None]
    return video, audio
