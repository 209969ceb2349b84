"""daVinci-MagiHuman single-stream DiT (DIT.md), one file, every layer call visible.

Architecture facts (DIT.md §1-§5):

* one token sequence ``[video | audio | text]``, self-attention only, no cross-attention, no
  timestep input, no AdaLN;
* "sandwich" layers (``mm_layers``) hold one expert per modality (0 video, 1 audio, 2 text) for
  every norm and linear; the other layers share one set of weights;
* grouped-query attention with a per-head sigmoid gate, q/k RMSNorm, and an element-wise
  Fourier rotary embedding on 96 of 128 head dims (time, height, width bands);
* MLPs: gelu7 (non-gated) in the first layers, swiglu7 (interleaved gate/linear) elsewhere;
* RMSNorm with gain ``1 + w``; fp32 residual stream; every block GEMM and the attention in
  bf16 (§6).

Deliberate deviations from the reference implementation (none changes the numerics beyond the
tolerances of fixtures/upstream/README.md §1.5):

* tokens are never permuted. Upstream stably sorts tokens by modality and keeps them sorted
  across layers; here each expert is applied to the contiguous runs of its modality in the
  original order (with the standard packing that is three slices), which selects the same
  expert per token and leaves per-token ops unchanged (DIT.md §4.2).
* local attention (1080p SR) is one masked softmax instead of two log-sum-exp-merged bf16
  partial attentions, so it skips one bf16 rounding (README §7.12).
* ``compute_dtype=torch.float32`` runs the same bf16-valued weights with every bf16 cast
  replaced by fp32: the fixtures' ``*_fp32path`` target, and a fast path on CPUs without bf16
  matrix units.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import DiTConfig

GELU7_ALPHA = 1.702  # DIT.md §4.4
ACT_LIMIT = 7.0  # DIT.md §4.4

Span = tuple[int, int, int]
"""A run of tokens of one modality: ``(modality, start, end)``, end exclusive."""


def modality_spans(modality: torch.Tensor) -> list[Span]:
    """Split a modality-id vector ``[L]`` int64 into contiguous runs ``(modality, start, end)``.

    With the standard packing (DIT.md §3) the result is at most three spans: video, audio, text.
    """
    ids, counts = torch.unique_consecutive(modality.cpu(), return_counts=True)
    spans, start = [], 0
    for m, n in zip(ids.tolist(), counts.tolist(), strict=True):
        spans.append((int(m), start, start + int(n)))
        start += int(n)
    return spans


@dataclass
class AttentionRanges:
    """Frame-local attention as (query range, key range) pairs of token indices, half-open.

    ``q_ranges``/``k_ranges``: int ``[P, 2]`` as built by :func:`engine.packing.local_attention_ranges`
    (PIPELINE.md §8.5, DIT.md §5.3). A query attends to the union of the key ranges of every pair
    whose query range contains it.
    """

    q_ranges: torch.Tensor
    k_ranges: torch.Tensor

    def mask(self, length: int, device: torch.device) -> torch.Tensor:
        """Boolean attention mask ``[L, L]`` (True = attend)."""
        mask = torch.zeros(length, length, dtype=torch.bool, device=device)
        for (q0, q1), (k0, k1) in zip(self.q_ranges.tolist(), self.k_ranges.tolist(), strict=True):
            mask[q0:q1, k0:k1] = True
        return mask


def attention_masks(length: int, device: torch.device, local_ranges: AttentionRanges | None,
                    valid_length: int | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The bool ``[L, L]`` masks (True = attend) of the global and the local-attention layers.

    Global: None without padding, else queries before ``valid_length`` see only keys before it.
    Local: the frame-local ranges (:class:`AttentionRanges`) and the padding rule together, or
    None without ``local_ranges``.

    Raises:
        ValueError: ``valid_length`` outside ``[1, L]``.
    """
    pad = None
    if valid_length is not None and valid_length != length:
        if not 0 < valid_length <= length:
            raise ValueError(f"valid_length {valid_length} outside [1, {length}]")
        pad = torch.ones(length, length, dtype=torch.bool, device=device)
        pad[:valid_length, valid_length:] = False
    local = None
    if local_ranges is not None:
        local = local_ranges.mask(length, device)
        if pad is not None:
            local &= pad
    return pad, local


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with gain ``1 + w`` and one weight per expert (DIT.md §4.1).

    ``weight``: fp32 ``[num_experts * dim]``, chunk ``e`` for modality ``e``. Computed in fp32,
    returned in the input dtype.
    """

    def __init__(self, dim: int, num_experts: int = 1, eps: float = 1e-6):
        super().__init__()
        self.dim, self.num_experts, self.eps = dim, num_experts, eps
        self.weight = nn.Parameter(torch.zeros(num_experts * dim, dtype=torch.float32))

    def gain(self, expert: int) -> torch.Tensor:
        return 1.0 + self.weight[expert * self.dim : (expert + 1) * self.dim].float()

    def _norm(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.gain(expert)
        return y.to(x.dtype)

    def forward(self, x: torch.Tensor, spans: list[Span] | None = None) -> torch.Tensor:
        """``x``: ``[L, dim]`` or ``[L, H, dim]``; ``spans`` select experts along dim 0."""
        if self.num_experts == 1 or spans is None:
            return self._norm(x, 0)
        return torch.cat([self._norm(x[s:e], m) for m, s, e in spans], dim=0)


class ExpertLinear(nn.Module):
    """Bias-free linear with one weight block per expert, ``weight [E * out, in]`` bf16 (DIT.md §4.2-§4.3).

    In bf16 compute the input is cast to bf16 and the GEMM output is bf16 (fp32 accumulation
    inside the kernel); in fp32 compute both are fp32 on the same bf16-valued weights.
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int = 1):
        super().__init__()
        self.in_features, self.out_features, self.num_experts = in_features, out_features, num_experts
        self.weight = nn.Parameter(torch.empty(num_experts * out_features, in_features, dtype=torch.bfloat16))

    def _expert_weight(self, expert: int, dtype: torch.dtype) -> torch.Tensor:
        return self.weight[expert * self.out_features : (expert + 1) * self.out_features].to(dtype)

    def forward(self, x: torch.Tensor, spans: list[Span] | None, dtype: torch.dtype) -> torch.Tensor:
        """``x`` ``[L, in]`` -> ``[L, out]`` in ``dtype`` (bf16 or fp32)."""
        x = x.to(dtype)
        if self.num_experts == 1 or spans is None:
            return F.linear(x, self._expert_weight(0, dtype))
        return torch.cat([F.linear(x[s:e], self._expert_weight(m, dtype)) for m, s, e in spans], dim=0)


class FourierRope(nn.Module):
    """Element-wise Fourier rotary table from 9 coordinate columns (DIT.md §4.5).

    ``bands`` is a persistent fp32 buffer ``[head_dim // 8]`` = ``1 / 10000^(k/B)``; a
    checkpoint's stored values (possibly bf16-rounded) overwrite it on load.
    """

    def __init__(self, head_dim: int):
        super().__init__()
        num_bands = head_dim // 8
        exponent = torch.arange(num_bands, dtype=torch.float32) / num_bands
        self.register_buffer("bands", 1.0 / (torch.tensor(10000.0) ** exponent), persistent=True)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """``coords`` fp32 ``[L, 9]`` = (pos t,h,w, size t,h,w, ref t,h,w) -> ``[L, 6 B]`` = [sin | cos].

        Raises:
            ValueError: a non-finite scale (``size == 1`` with ``ref != 1``), as upstream asserts.
        """
        coords = coords.float()
        pos, size, ref = coords[:, 0:3], coords[:, 3:6], coords[:, 6:9]
        scale = (ref - 1) / (size - 1)
        scale = torch.where((ref == 1) & (size == 1), torch.ones_like(scale), scale)
        if not torch.isfinite(scale).all():
            raise ValueError("rotary coordinates give a non-finite scale (size 1 with ref != 1)")
        center = torch.stack(
            [torch.zeros_like(size[:, 0]), (size[:, 1] - 1) / 2, (size[:, 2] - 1) / 2], dim=1
        )
        # angle = ((c - m) * s) * band, in this multiplication order (DIT.md §4.5).
        angles = ((pos - center) * scale).unsqueeze(-1) * self.bands.float()  # [L, 3, B]
        angles = angles.flatten(1)  # axis-major: t bands, h bands, w bands
        return torch.cat([angles.sin(), angles.cos()], dim=1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``6 B`` dims of every head, non-interleaved halves (DIT.md §4.5).

    ``x`` fp32 ``[L, H, D]``; ``rope`` fp32 ``[L, 6 B]``. Dims ``6 B .. D`` pass through.
    """
    half = rope.shape[-1] // 2
    sin, cos = rope[:, None, :half], rope[:, None, half:]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


AttentionKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""``(q [L, Hq, D], k [L, Hkv, D], v [L, Hkv, D], mask [L, L] bool | None) -> [L, Hq, D]``, the
contract of an attention backend (FlashAttention 3/2, SDPA) passed to :meth:`DiTModel.forward`
(``attention_kernel=``) by the runner's step."""


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, exact: bool
) -> torch.Tensor:
    """Bidirectional grouped-query attention, softmax scale ``1/sqrt(D)`` (DIT.md §4.6 step 6).

    ``q`` ``[L, Hq, D]``, ``k``/``v`` ``[L, Hkv, D]`` in the compute dtype; query head ``i`` uses
    K/V head ``i // (Hq / Hkv)`` (no repeated K/V is materialised by SDPA's ``enable_gqa``).
    ``mask`` bool ``[L, L]`` or None. ``exact``: compute in fp32 from the given (bf16-rounded)
    values and round the output once, as the reference's attention stand-in does; otherwise the
    native-dtype kernel (FlashAttention / efficient SDPA on GPU). Returns ``[L, Hq, D]``.
    """
    out_dtype = q.dtype
    if exact:
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, enable_gqa=True,
    )
    return out[0].transpose(0, 1).to(out_dtype)


class Attention(nn.Module):
    """Pre-norm gated GQA self-attention block (DIT.md §4.6)."""

    def __init__(self, config: DiTConfig, num_experts: int, local: bool):
        super().__init__()
        self.config, self.local = config, local
        d, hd = config.hidden_size, config.head_dim
        self.pre_norm = RMSNorm(d, num_experts, config.norm_eps)
        self.linear_qkv = ExpertLinear(d, config.qkv_out_features, num_experts)
        self.linear_proj = ExpertLinear(d, d, num_experts)
        self.q_norm = RMSNorm(hd, num_experts, config.norm_eps)
        self.k_norm = RMSNorm(hd, num_experts, config.norm_eps)

    def forward(self, h, spans, rope, mask, dtype, exact_attention, kernel: AttentionKernel | None = None):
        """``h`` fp32 ``[L, d]`` -> attention branch output ``[L, d]`` in ``dtype`` (bf16 values).

        ``mask``: bool ``[L, L]`` (True = attend) or None, this layer's mask (local window and/or text
        padding, chosen by :meth:`DiTModel.forward`). ``kernel`` replaces the default SDPA attention (it
        must implement GQA itself)."""
        cfg = self.config
        hq, hkv, hd = cfg.num_heads_q, cfg.num_heads_kv, cfg.head_dim
        a = self.pre_norm(h, spans).to(dtype)  # §4.6.1: bf16(RMSNorm(h))
        qkvg = self.linear_qkv(a, spans, dtype).float()  # §4.6.2: bf16 GEMM, upcast
        q = qkvg[:, : hq * hd].view(-1, hq, hd)
        k = qkvg[:, hq * hd : (hq + hkv) * hd].view(-1, hkv, hd)
        v = qkvg[:, (hq + hkv) * hd : (hq + 2 * hkv) * hd].view(-1, hkv, hd)
        q, k = self.q_norm(q, spans), self.k_norm(k, spans)  # §4.6.4: fp32 per-head RMSNorm
        q, k = apply_rope(q, rope), apply_rope(k, rope)  # §4.6.5: fp32 rotary
        layer_mask = mask
        if kernel is not None:
            o = kernel(q.to(dtype), k.to(dtype), v.to(dtype), layer_mask)
        else:
            o = attention(q.to(dtype), k.to(dtype), v.to(dtype), layer_mask, exact_attention)
        if cfg.enable_attn_gating:  # §4.6.7: fp32 product, then bf16
            gate = torch.sigmoid(qkvg[:, (hq + 2 * hkv) * hd :]).unsqueeze(-1)
            o = (o.float() * gate).to(dtype)
        return self.linear_proj(o.reshape(o.shape[0], hq * hd), spans, dtype)


class MLP(nn.Module):
    """Pre-norm MLP: gelu7 (non-gated) or swiglu7 (interleaved gate/linear) (DIT.md §4.4, §4.7)."""

    def __init__(self, config: DiTConfig, num_experts: int, gelu7: bool):
        super().__init__()
        d = config.hidden_size
        self.gelu7 = gelu7
        inner = config.gelu_intermediate if gelu7 else config.swiglu_intermediate
        self.pre_norm = RMSNorm(d, num_experts, config.norm_eps)
        self.up_gate_proj = ExpertLinear(d, inner if gelu7 else 2 * inner, num_experts)
        self.down_proj = ExpertLinear(inner, d, num_experts)

    @staticmethod
    def activation(u: torch.Tensor, gelu7: bool) -> torch.Tensor:
        """fp32 activation of the up projection ``u`` (DIT.md §4.4)."""
        if gelu7:
            u = u.clamp(max=ACT_LIMIT)
            return u * torch.sigmoid(GELU7_ALPHA * u)
        gate = u[..., 0::2].clamp(max=ACT_LIMIT)
        lin = u[..., 1::2].clamp(-ACT_LIMIT, ACT_LIMIT)
        return gate * torch.sigmoid(GELU7_ALPHA * gate) * (lin + 1)

    def forward(self, h, spans, dtype):
        """``h`` fp32 ``[L, d]`` -> MLP branch output fp32 ``[L, d]`` (bf16-rounded in bf16 compute)."""
        m = self.pre_norm(h, spans).to(dtype)
        u = self.up_gate_proj(m, spans, dtype).float()
        z = self.activation(u, self.gelu7).to(dtype)
        return self.down_proj(z, spans, dtype).float()


class TransformerLayer(nn.Module):
    """``h += attn(h); h += mlp(h)`` with an fp32 residual stream (DIT.md §5.1-§5.2)."""

    def __init__(self, config: DiTConfig, index: int):
        super().__init__()
        experts = 3 if index in config.mm_layers else 1
        self.attention = Attention(config, experts, local=index in config.local_attn_layers)
        self.mlp = MLP(config, experts, gelu7=index in config.gelu7_layers)

    def forward(self, h, spans, rope, mask, dtype, exact_attention, taps=None, kernel=None):
        attn_out = self.attention(h, spans, rope, mask, dtype, exact_attention, kernel)
        h = h + attn_out.float()
        mlp_out = self.mlp(h, spans, dtype)
        if taps is not None:
            taps["attn_out"], taps["mlp_out"] = attn_out.float(), mlp_out
        return h + mlp_out


class Adapter(nn.Module):
    """Per-modality fp32 input embedders and the rotary table (DIT.md §3 steps 1-2)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        d = config.hidden_size
        self.video_embedder = nn.Linear(config.video_in_channels, d, dtype=torch.float32)
        self.text_embedder = nn.Linear(config.text_in_channels, d, dtype=torch.float32)
        self.audio_embedder = nn.Linear(config.audio_in_channels, d, dtype=torch.float32)
        self.rope = FourierRope(config.head_dim)

    def forward(self, x: torch.Tensor, spans: list[Span]) -> torch.Tensor:
        embedders = (self.video_embedder, self.audio_embedder, self.text_embedder)
        rows = [embedders[m](x[s:e, : embedders[m].in_features].float()) for m, s, e in spans]
        return torch.cat(rows, dim=0)


class Block(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(config, i) for i in range(config.num_layers))


class DiTModel(nn.Module):
    """The MagiHuman DiT. State-dict keys equal the released checkpoint's (DIT_STATE_DICT.tsv).

    Construct on the meta device for the 15 B model without allocating memory::

        with torch.device("meta"):
            model = DiTModel(full_config())

    Args:
        config: architecture (:class:`engine.config.DiTConfig`).
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        config.validate()
        self.config = config
        d = config.hidden_size
        self.adapter = Adapter(config)
        self.block = Block(config)
        self.final_norm_video = RMSNorm(d, 1, config.norm_eps)
        self.final_norm_audio = RMSNorm(d, 1, config.norm_eps)
        self.final_linear_video = nn.Linear(d, config.video_in_channels, bias=False, dtype=torch.float32)
        self.final_linear_audio = nn.Linear(d, config.audio_in_channels, bias=False, dtype=torch.float32)

    def forward(
        self,
        x: torch.Tensor,
        coords: torch.Tensor,
        modality: torch.Tensor,
        *,
        spans: list[Span] | None = None,
        local_ranges: AttentionRanges | None = None,
        compute_dtype: torch.dtype = torch.bfloat16,
        exact_attention: bool | None = None,
        intermediates: dict | None = None,
        valid_length: int | None = None,
        attention_kernel: AttentionKernel | None = None,
        rope: torch.Tensor | None = None,
        masks: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity of every video and audio token.

        Args:
            x: fp32 ``[L, in_channels]`` packed token features (PIPELINE.md §8.4).
            coords: fp32 ``[L, 9]`` rotary coordinates.
            modality: int64 ``[L]``, 0 video / 1 audio / 2 text.
            spans: precomputed :func:`modality_spans` of ``modality`` (saves a host sync).
            local_ranges: frame-local attention ranges, used only by ``local_attn_layers``.
            compute_dtype: ``torch.bfloat16`` (reference numerics, DIT.md §6) or
                ``torch.float32`` (every bf16 cast replaced by fp32: the fixtures' fp32 path).
            exact_attention: compute attention in fp32 from the rounded inputs (the reference's
                CPU stand-in); default True on CPU, False (native bf16 kernel) on CUDA.
            intermediates: if a dict is given, it receives ``rope``, ``adapter_out``,
                ``layer0_attn_out``, ``layer0_mlp_out`` and ``layer{i}_out`` (fp32).
            valid_length: tokens ``valid_length .. L`` are padding (a text bucket,
                :func:`engine.packing.packed_layout`): no token before ``valid_length`` attends to
                them (a key-padding mask in every layer), so the rows before it equal the unpadded
                call's within float summation order; padding rows attend to everything (finite,
                discarded). None or ``L``: no padding, no mask in the global layers.
            attention_kernel: the attention of every layer for this call (:data:`AttentionKernel`:
                FlashAttention, SDPA, ... from :mod:`engine.backends.attention`, chosen by the runner's
                backend, :func:`engine.backends.apply_backend`); None: :func:`attention` (SDPA, upcast
                per ``exact_attention``).
            rope: precomputed ``self.adapter.rope(coords)``, fp32 ``[L, 6 B]`` (static over a segment,
                :meth:`engine.runner.DiTRunner.prepare`); skips the table and its finiteness check, the
                one host synchronisation of a call (issue 17). None: computed from ``coords``.
            masks: precomputed ``(global, local)`` bool ``[L, L]`` masks (:func:`attention_masks`, or any
                masks of that shape; True = attend); ``local_ranges`` and ``valid_length`` are then not
                used. None: built from them at every call.

        Returns:
            fp32 ``[L, out_channels]``: video rows hold ``video_in`` values, audio rows their
            ``audio_in`` values in the first columns (rest zero), text rows zero (DIT.md §3).
        """
        cfg = self.config
        if spans is None:
            spans = modality_spans(modality)
        if exact_attention is None:
            exact_attention = x.device.type != "cuda"
        if rope is None:
            rope = self.adapter.rope(coords)
        h = self.adapter(x, spans)
        if masks is None:
            masks = attention_masks(x.shape[0], x.device, local_ranges if cfg.local_attn_layers else None,
                                    valid_length)
        global_mask, local_mask = masks
        if intermediates is not None:
            intermediates["rope"], intermediates["adapter_out"] = rope, h
        for i, layer in enumerate(self.block.layers):
            taps = {} if (intermediates is not None and i == 0) else None
            mask = local_mask if layer.attention.local else global_mask
            h = layer(h, spans, rope, mask, compute_dtype, exact_attention, taps, attention_kernel)
            if intermediates is not None:
                if taps:
                    intermediates["layer0_attn_out"] = taps["attn_out"]
                    intermediates["layer0_mlp_out"] = taps["mlp_out"]
                intermediates[f"layer{i}_out"] = h
        out = h.new_zeros(h.shape[0], cfg.out_channels)
        for m, s, e in spans:
            if m == 0:
                out[s:e, : cfg.video_in_channels] = self.final_linear_video(self.final_norm_video(h[s:e]))
            elif m == 1:
                out[s:e, : cfg.audio_in_channels] = self.final_linear_audio(self.final_norm_audio(h[s:e]))
        return out


def default_init_std(name: str, shape: torch.Size) -> float:
    """Init std for seeded random weights: 0.1 for norms (gain ``1 + w``), ``1/sqrt(fan_in)``
    for linear weights, 0.02 for biases. Untrained: the output is noise by design."""
    if "norm" in name:
        return 0.1
    if name.endswith(".bias"):
        return 0.02
    return 1.0 / math.sqrt(shape[-1])


@torch.no_grad()
def init_seeded(model: nn.Module, seed: int, std_for=default_init_std) -> None:
    """Fill every parameter with ``randn(shape) * std`` from a ``torch.Generator(seed)`` in
    ``named_parameters()`` order (fp32 draws on CPU, cast to the parameter's dtype and device),
    the scheme of fixtures/upstream/README.md §1.2. The rotary bands buffer is left as computed.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        value = torch.randn(param.shape, generator=gen, dtype=torch.float32) * std_for(name, param.shape)
        param.copy_(value.to(param.dtype))


@torch.no_grad()
def init_seeded_on_device(model: nn.Module, seed: int, device: torch.device, chunk_elems: int = 1 << 26) -> None:
    """Fill every parameter with ``randn * std`` (:func:`default_init_std`) drawn on ``device`` from one
    ``torch.Generator(device)``, ``chunk_elems`` at a time (at most 256 MB of fp32 scratch).

    Same distribution as :func:`init_seeded`, not the same values (other generator)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        std = default_init_std(name, param.shape)
        flat = param.view(-1)
        for start in range(0, flat.numel(), chunk_elems):
            n = min(chunk_elems, flat.numel() - start)
            flat[start : start + n].copy_(torch.randn(n, generator=gen, device=device).mul_(std))


def seeded_dit(config: DiTConfig, seed: int = 0, device: str | torch.device = "cpu", *,
               draw_on_device: bool = False) -> DiTModel:
    """The DiT with seeded, untrained weights, eval mode, no gradients, on ``device``.

    ``draw_on_device=False``: built on the CPU and filled by :func:`init_seeded` (the preview models, the
    fixtures' scheme), then moved. ``draw_on_device=True``: built on the meta device, materialised with
    ``to_empty`` on ``device`` and filled by :func:`init_seeded_on_device` (the 15 B model on a GPU
    without 30 GB of host memory); the rotary bands are recomputed.
    """
    device = torch.device(device)
    if not draw_on_device:
        model = DiTModel(config)
        init_seeded(model, seed)
        return model.eval().requires_grad_(False).to(device)
    with torch.device("meta"):
        model = DiTModel(config)
    model = model.to_empty(device=device)
    init_seeded_on_device(model, seed, device)
    with torch.no_grad():  # to_empty left the rotary band buffer uninitialised
        model.adapter.rope.bands.copy_(FourierRope(config.head_dim).bands.to(device))
    return model.eval().requires_grad_(False)
