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
from engine.geometry import PATCH, latent_frames_for

VIDEO, AUDIO, TEXT = 0, 1, 2
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
        num_video, num_audio, num_text: token counts (``num_text`` real text tokens).
        num_padding: text padding rows after the real text (a text bucket, :func:`packed_layout`).
        rope: fp32 ``[L, 6 B]`` rotary table of ``coords`` (the DiT's ``rope`` argument), or None.
        masks: ``(global, local)`` bool ``[L, L]`` attention masks (the DiT's ``masks`` argument), or None.
            ``rope`` and ``masks`` are static over a segment; :meth:`engine.runner.DiTRunner.prepare`
            fills them.
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
    num_padding: int = 0
    rope: torch.Tensor | None = None
    masks: tuple[torch.Tensor | None, torch.Tensor | None] | None = None

    @property
    def length(self) -> int:
        """Sequence length ``L`` including padding rows."""
        return self.num_video + self.num_audio + self.num_text + self.num_padding

    @property
    def valid_length(self) -> int:
        """Tokens before the padding (the DiT's ``valid_length``)."""
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
    audio_ref_t = latent_frames_for(num_audio) if style == "v2" else latent_frames
    audio[:, 6:9] = torch.tensor([audio_ref_t, 1, 1], dtype=torch.float32)

    text = torch.zeros(num_text, 9)
    j = torch.arange(num_text, dtype=torch.float32)
    text[:, 0] = j - num_text if style == "v2" else j
    text[:, 3:6] = torch.tensor([num_text, 1, 1], dtype=torch.float32)
    text[:, 6:9] = torch.tensor([1 if style == "v2" else 2, 1, 1], dtype=torch.float32)
    return torch.cat([video, audio, text], dim=0)


def packed_layout(
    latent_shape: tuple[int, int, int, int],
    num_audio: int,
    text_features: torch.Tensor,
    *,
    num_text: int | None = None,
    text_rows: int | None = None,
    in_channels: int | None = None,
    video_channels: int | None = None,
    audio_channels: int | None = None,
    coords_style: CoordsStyle = "v2",
    frame_receptive_field: int = FRAME_RECEPTIVE_FIELD,
    device: torch.device | str | None = None,
) -> PackedInputs:
    """Everything of one segment's DiT calls that does not change between denoising steps
    (PIPELINE.md §8): coordinates, modality ids, spans, local ranges, and ``x`` with the text rows
    filled and the video/audio rows zero (:func:`write_latents` fills those at every step).

    Args:
        latent_shape: ``(C, T, H, W)`` of the video latent.
        num_audio: audio tokens ``A``.
        text_features: fp32 ``[1, L_rows, C_text]`` or ``[L_rows, C_text]``; the first ``num_text``
            rows are used (the zero padding to 640 is dropped, §8.3).
        num_text: text tokens (default: all rows).
        text_rows: text rows in the sequence, ``>= num_text`` (default ``num_text``). Rows
            ``num_text .. text_rows`` are padding (a text bucket): zero features, text modality,
            neutral coordinates ``(0,0,0, 1,1,1, 1,1,1)``; the DiT must be called with
            ``valid_length = packed.valid_length`` so that no real token attends to them.
        in_channels: width of ``x`` (default ``max`` of the three feature widths).
        video_channels, audio_channels: feature widths of video (``4 C``) and audio tokens (default
            ``4 C`` and ``C_text``'s sibling: the audio latent's width must then be given by the caller
            of :func:`write_latents`; used for the ``in_channels`` default and width checks).
        coords_style: ``v2`` for the base/distill model, ``v1`` for the SR model.
        frame_receptive_field: local-attention window in latent frames.
        device: device of the tensors (default: ``text_features``'s).

    Raises:
        ValueError: a count exceeds the rows given, ``text_rows < num_text``, or a feature width exceeds
            ``in_channels``.
    """
    if text_features.dim() == 2:
        text_features = text_features[None]
    device = text_features.device if device is None else torch.device(device)
    num_text = text_features.shape[1] if num_text is None else num_text
    if not 0 <= num_text <= text_features.shape[1]:
        raise ValueError(f"num_text {num_text} outside [0, {text_features.shape[1]}] text rows")
    text_rows = num_text if text_rows is None else text_rows
    if text_rows < num_text:
        raise ValueError(f"text_rows {text_rows} is below num_text {num_text}")
    c, t, h, w = latent_shape
    if h % PATCH or w % PATCH:
        raise ValueError(f"video latent height {h} and width {w} must be even")
    video_channels = c * PATCH * PATCH if video_channels is None else video_channels
    audio_channels = 0 if audio_channels is None else audio_channels
    widths = (video_channels, audio_channels, text_features.shape[2])
    in_channels = max(widths) if in_channels is None else in_channels
    if max(widths) > in_channels:
        raise ValueError(f"feature widths {widths} exceed in_channels {in_channels}")
    n_video = t * (h // PATCH) * (w // PATCH)
    valid = n_video + num_audio + num_text
    total = n_video + num_audio + text_rows
    x = torch.zeros(total, in_channels, device=device)
    x[n_video + num_audio : valid, : widths[2]] = text_features[0, :num_text].float().to(device)
    modality = torch.cat([
        torch.full((n_video,), VIDEO, dtype=torch.int64),
        torch.full((num_audio,), AUDIO, dtype=torch.int64),
        torch.full((text_rows,), TEXT, dtype=torch.int64),
    ]).to(device)
    coords = build_coords(t, h // PATCH, w // PATCH, num_audio, num_text, coords_style)
    if text_rows > num_text:
        pad = torch.zeros(text_rows - num_text, 9)
        pad[:, 3:9] = 1.0  # size 1, ref 1: a finite rotary scale, whatever the style
        coords = torch.cat([coords, pad], dim=0)
    spans = [(m, s, e) for m, s, e in (
        (VIDEO, 0, n_video), (AUDIO, n_video, n_video + num_audio), (TEXT, n_video + num_audio, total)
    ) if e > s]
    ranges = local_attention_ranges(n_video, total, t, frame_receptive_field)
    return PackedInputs(x, coords.to(device), modality, spans, ranges, (c, t, h, w), n_video, num_audio, num_text,
                        text_rows - num_text)


def write_latents(packed: PackedInputs, video_latent: torch.Tensor, audio_latent: torch.Tensor) -> torch.Tensor:
    """Write one step's video tokens (channel-major patches, §8.1) and the first ``num_audio`` audio rows
    into ``packed.x`` in place; returns ``packed.x``.

    Raises:
        ValueError: the video latent's shape is not ``[1, *latent_shape]``, fewer than ``num_audio``
            audio rows, or a feature width exceeds ``x``'s.
    """
    if tuple(video_latent.shape[1:]) != packed.latent_shape or video_latent.shape[0] != 1:
        raise ValueError(f"video latent {tuple(video_latent.shape)} does not match the packed geometry "
                         f"[1, {', '.join(map(str, packed.latent_shape))}]")
    nv, na = packed.num_video, packed.num_audio
    if not 0 <= na <= audio_latent.shape[1]:
        raise ValueError(f"num_audio {na} outside [0, {audio_latent.shape[1]}] audio rows")
    video_tokens = patchify_video(video_latent.float())
    width = packed.x.shape[1]
    if video_tokens.shape[1] > width or audio_latent.shape[2] > width:
        raise ValueError(f"feature widths {(video_tokens.shape[1], audio_latent.shape[2])} exceed in_channels {width}")
    packed.x[:nv, : video_tokens.shape[1]] = video_tokens
    packed.x[nv : nv + na, : audio_latent.shape[2]] = audio_latent[0, :na].float()
    return packed.x


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
    text_rows: int | None = None,
) -> PackedInputs:
    """Pack one DiT call (PIPELINE.md §8): :func:`packed_layout` then :func:`write_latents`.

    Args:
        video_latent: fp32 ``[1, C, T, H, W]``.
        audio_latent: fp32 ``[1, A_rows, C_audio]``; the first ``num_audio`` rows are used.
        text_features: fp32 ``[1, L_rows, C_text]`` or ``[L_rows, C_text]``; the first
            ``num_text`` rows are used (the zero padding to 640 is dropped, §8.3).
        num_audio, num_text: token counts (default: all rows).
        in_channels: width of ``x`` (default ``max`` of the three feature widths).
        coords_style: ``v2`` for the base/distill model, ``v1`` for the SR model.
        frame_receptive_field: local-attention window in latent frames.
        text_rows: pad the text to this many rows (see :func:`packed_layout`).

    Raises:
        ValueError: a count exceeds the rows given, or a feature width exceeds ``in_channels``.
    """
    if video_latent.dim() != 5 or video_latent.shape[0] != 1:
        raise ValueError(f"video latent must be [1, C, T, H, W], got {tuple(video_latent.shape)}")
    num_audio = audio_latent.shape[1] if num_audio is None else num_audio
    if not 0 <= num_audio <= audio_latent.shape[1]:
        raise ValueError(f"num_audio {num_audio} outside [0, {audio_latent.shape[1]}] audio rows")
    packed = packed_layout(
        tuple(video_latent.shape[1:]), num_audio, text_features, num_text=num_text, text_rows=text_rows,
        in_channels=in_channels, audio_channels=audio_latent.shape[2], coords_style=coords_style,
        frame_receptive_field=frame_receptive_field, device=video_latent.device,
    )
    write_latents(packed, video_latent, audio_latent)
    return packed


def unpack(out: torch.Tensor, packed: PackedInputs, audio_channels: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """DiT output ``[L, Cout]`` -> (video ``[1, C, T, H, W]``, audio ``[1, A, audio_channels]``),
    text rows discarded (PIPELINE.md §9)."""
    nv, na = packed.num_video, packed.num_audio
    video = unpatchify_video(out[:nv], packed.latent_shape)
    audio = out[nv : nv + na, :audio_channels][None]
    return video, audio
