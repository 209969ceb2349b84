"""Ulysses context parallelism of the DiT forward: one sequence over ``cp`` ranks, exact to one rank.

Every rank holds the full weights and ``1/cp`` of the tokens. All per-token work (adapter, RMSNorms,
the sandwich layers' per-modality projections, MLPs, rotary) runs on each rank's local tokens; the
attention of every layer turns the sequence shard into a head shard with one all-to-all, attends over
the whole sequence for ``Hq/cp`` query heads, and turns the result back with a second all-to-all
(DeepSpeed-Ulysses, Jacobs et al. 2023, arXiv:2309.14509; the reference implementation's
``engine_config.cp_size``, CHECKPOINTS.md and PIPELINE.md §2, 1 in all its examples).

Layout (all tensors in the engine's packed order ``[video | audio | text]``, DIT.md §3):

* the sequence of ``L`` tokens is padded at the end to ``Lp = ceil(L / cp) * cp`` so every shard has
  ``Lp / cp`` tokens; rank ``r`` holds global tokens ``[r Lp/cp, (r+1) Lp/cp)``. Padding tokens are
  zero text tokens with rotary coordinates ``(0,0,0, 1,1,1, 1,1,1)`` (identity rotation). They are
  never attention keys: after the first all-to-all every rank holds all ``Lp`` positions of its heads
  and attends over the first ``L`` only (cheaper than a key mask, and keeps FlashAttention usable);
  the padding rows of the attention output are zeros and the model's output rows for them are dropped.
* rotary tables come from each token's own (global) coordinates, and the frame-local attention mask
  of the 1080p SR layers (DIT.md §5.3) is built once for the global ``L x L`` sequence, so both are
  those of the one-rank forward.
* heads: ``cp`` must divide the query heads, and either divide the K/V heads (each rank gets
  ``Hkv/cp`` K/V heads, none repeated) or be a multiple of them (each K/V head is repeated ``cp/Hkv``
  times so that every rank gets the one K/V head its query heads read). Other degrees are refused
  (:func:`check_degree`): for the released model (40/8 heads) the degrees are 1, 2, 4, 8.
* one all-to-all carries q, k and v together (one latency per layer instead of three), one carries
  the attention output back; both in the compute dtype.

Two ways to run it:

* :func:`forward_replicated` / :class:`ContextParallelDiT`: every rank calls the forward with the
  same full inputs and gets the full output (tests, ``python -m engine.parity DIR --cp N``).
* :class:`DistributedDiT` on rank 0 + :func:`serve_forwards` on the other ranks: rank 0 runs the
  whole engine (sampler, codecs) and, at each DiT call, sends each rank its token shard; the outputs
  are gathered on rank 0. :class:`ContextParallelEngine` runs a :class:`engine.api.SegmentEngine` this
  way on ``cp`` worker processes (``serve --cp N``): rank 0's runner steps call a
  :class:`DistributedDiT` (:func:`distributed_step`), with the module and attention kernel the runner's
  backend chose (:func:`engine.backends.apply_backend`); each other rank runs its own runners'
  module and kernel on its shard.

Deviation from the issue text (named): the sampling loop runs on rank 0 only, and the other ranks
mirror its DiT calls. The per-step cost is one scatter of the packed inputs and one gather of the
velocity (each ``~L x 192`` values for video rows, measured by ``ops/bench_cp.py``), against
``2 x num_layers`` all-to-alls of the attention; it keeps one RNG stream, one sampler and the SR
upgrade path unchanged.

Collectives run with the process group's timeout (``init_process_group(timeout=...)``; gloo and NCCL
honour it), so a rank that dies or hangs makes the others raise within that time.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import os
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from engine.config import DiTConfig
from engine.dit import AttentionKernel, AttentionRanges, DiTModel, Span, attention
from engine.runner import DiTRunner, DiTStep

logger = logging.getLogger(__name__)

TEXT = 2  # modality id of the padding tokens (DIT.md §3)
PAD_COORDS = (0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)  # identity rotation (DIT.md §4.5: scale 1, angle 0)


class ContextParallelError(RuntimeError):
    """A context-parallel job failed on some rank (dead, hung past the collective timeout, or raised)."""


# ---------------------------------------------------------------------------------------------
# degrees and shapes


def allowed_degrees(config: DiTConfig, limit: int = 64) -> list[int]:
    """The context-parallel degrees ``<= limit`` that :func:`check_degree` accepts for ``config``."""
    ok = []
    for cp in range(1, limit + 1):
        try:
            check_degree(config, cp)
        except ValueError:
            continue
        ok.append(cp)
    return ok


def check_degree(config: DiTConfig, cp: int) -> None:
    """Raise ``ValueError`` with the reason unless ``cp`` splits the heads evenly.

    ``cp`` must divide ``num_heads_q``, and divide ``num_heads_kv`` (no K/V repetition) or be a
    multiple of it (each K/V head repeated ``cp / num_heads_kv`` times).

    Raises:
        ValueError: ``cp < 1``, or the heads do not split (the message names the heads and the
            degrees that would).
    """
    if not isinstance(cp, int) or cp < 1:
        raise ValueError(f"cp {cp!r} must be an integer >= 1")
    hq, hkv = config.num_heads_q, config.num_heads_kv
    if hq % cp:
        reason = f"cp {cp} does not divide the {hq} query heads"
    elif hkv % cp and cp % hkv:
        reason = f"cp {cp} neither divides the {hkv} key/value heads nor is a multiple of them"
    else:
        return
    ok = [d for d in range(1, hq + 1) if hq % d == 0 and (hkv % d == 0 or d % hkv == 0)]
    raise ValueError(f"{reason}; degrees that split this model's heads ({hq} query, {hkv} key/value): {ok}")


@dataclass(frozen=True)
class HeadLayout:
    """Heads per rank after the sequence-to-head all-to-all.

    Attributes:
        cp: context-parallel degree.
        heads_q: query heads per rank, ``Hq / cp``.
        heads_kv: K/V heads per rank after repetition, ``max(Hkv / cp, 1)``.
        kv_repeat: times each K/V head is repeated before the all-to-all (1 when ``cp | Hkv``).
    """

    cp: int
    heads_q: int
    heads_kv: int
    kv_repeat: int

    @classmethod
    def for_config(cls, config: DiTConfig, cp: int) -> HeadLayout:
        check_degree(config, cp)
        hkv = config.num_heads_kv
        repeat = cp // hkv if cp > hkv else 1
        return cls(cp, config.num_heads_q // cp, hkv * repeat // cp, repeat)


@dataclass(frozen=True)
class ShardPlan:
    """How ``length`` tokens are split over ``cp`` ranks (padding at the end of the sequence).

    Attributes:
        length: real tokens ``L``.
        cp: number of ranks.
    """

    length: int
    cp: int

    @property
    def padded_length(self) -> int:
        """``Lp = ceil(L / cp) * cp``."""
        return math.ceil(self.length / self.cp) * self.cp

    @property
    def local_length(self) -> int:
        """Tokens per rank, ``Lp / cp``."""
        return self.padded_length // self.cp

    @property
    def pad(self) -> int:
        return self.padded_length - self.length

    def bounds(self, rank: int) -> tuple[int, int]:
        """Global token range ``[start, end)`` of ``rank`` in the padded sequence."""
        return rank * self.local_length, (rank + 1) * self.local_length

    def padded_spans(self, spans: list[Span]) -> list[Span]:
        """``spans`` of the real tokens plus the padding as text (merged into a trailing text span)."""
        out = list(spans)
        if self.pad:
            if out and out[-1][0] == TEXT and out[-1][2] == self.length:
                out[-1] = (TEXT, out[-1][1], self.padded_length)
            else:
                out.append((TEXT, self.length, self.padded_length))
        return out

    def local_spans(self, spans: list[Span], rank: int) -> list[Span]:
        """The modality runs of ``rank``'s tokens, in local indices (``spans`` of the real tokens)."""
        start, end = self.bounds(rank)
        local = []
        for m, s, e in self.padded_spans(spans):
            s2, e2 = max(s, start), min(e, end)
            if e2 > s2:
                local.append((m, s2 - start, e2 - start))
        return local


def pad_inputs(x: torch.Tensor, coords: torch.Tensor, plan: ShardPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Append ``plan.pad`` padding tokens: ``x`` ``[L, C]`` -> ``[Lp, C]`` (zeros), ``coords`` ``[L, 9]``
    -> ``[Lp, 9]`` (:data:`PAD_COORDS`)."""
    if not plan.pad:
        return x, coords
    pad_x = x.new_zeros(plan.pad, x.shape[1])
    pad_c = torch.tensor(PAD_COORDS, dtype=coords.dtype, device=coords.device).expand(plan.pad, 9)
    return torch.cat([x, pad_x]), torch.cat([coords, pad_c])


def modality_of(spans: list[Span], length: int, device) -> torch.Tensor:
    """int64 ``[length]`` modality ids from ``spans``."""
    out = torch.empty(length, dtype=torch.int64, device=device)
    for m, s, e in spans:
        out[s:e] = m
    return out


def comm_bytes_per_layer(config: DiTConfig, length: int, cp: int, dtype: torch.dtype) -> dict[str, int]:
    """Bytes one rank sends to other ranks in one layer's two all-to-alls (fused q/k/v, then output).

    Per rank and layer: ``(cp-1)/cp`` of its ``Lp/cp`` tokens x (``Hq + 2 Hkv_rep`` heads out, ``Hq``
    back) x ``head_dim`` x element size, ``Hkv_rep = Hkv x kv_repeat``. Returns ``qkv``, ``out``,
    ``total`` (per rank) and ``all_ranks`` (summed over ranks).
    """
    layout = HeadLayout.for_config(config, cp)
    plan = ShardPlan(length, cp)
    elem = torch.empty((), dtype=dtype).element_size()
    per_head = plan.local_length * config.head_dim * elem * (cp - 1) // cp
    hkv = config.num_heads_kv * layout.kv_repeat
    qkv = per_head * (config.num_heads_q + 2 * hkv)
    out = per_head * config.num_heads_q
    return {"qkv": qkv, "out": out, "total": qkv + out, "all_ranks": (qkv + out) * cp}


# ---------------------------------------------------------------------------------------------
# the attention kernel


@dataclass
class CommStats:
    """Counters of the collectives one rank ran.

    Attributes:
        calls: collectives run.
        bytes_sent: bytes sent to other ranks (``(cp-1)/cp`` of each all-to-all's input; scatter and
            gather count what crosses between ranks).
        seconds: wall time inside collectives (including waiting for the slowest rank); on CUDA only
            when ``sync`` is set (the device is synchronised around each collective).
        sync: synchronise the device around collectives so ``seconds`` is the collective's own time.
    """

    calls: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0
    sync: bool = False
    by_kind: dict[str, list[float]] = field(default_factory=dict)

    def add(self, kind: str, nbytes: int, seconds: float) -> None:
        self.calls += 1
        self.bytes_sent += nbytes
        self.seconds += seconds
        entry = self.by_kind.setdefault(kind, [0, 0, 0.0])
        entry[0] += 1
        entry[1] += nbytes
        entry[2] += seconds

    def reset(self) -> None:
        self.calls, self.bytes_sent, self.seconds = 0, 0, 0.0
        self.by_kind.clear()


class _Timed:
    def __init__(self, stats: CommStats | None, kind: str, nbytes: int, device: torch.device):
        self.stats, self.kind, self.nbytes, self.device = stats, kind, nbytes, device

    def __enter__(self):
        if self.stats is not None:
            if self.stats.sync and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.stats is not None and exc[0] is None:
            if self.stats.sync and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.stats.add(self.kind, self.nbytes, time.perf_counter() - self.t0)
        return False


class UlyssesAttention:
    """An :data:`engine.dit.AttentionKernel` over a sequence shard: all-to-all to heads, attention over
    the whole (unpadded) sequence, all-to-all back.

    Called with ``q`` ``[Lp/cp, Hq, D]``, ``k``/``v`` ``[Lp/cp, Hkv, D]`` (this rank's tokens, compute
    dtype) and ``mask`` (``[L, L]`` bool for the global sequence, or None); returns ``[Lp/cp, Hq, D]``.

    Args:
        layout: heads per rank (:class:`HeadLayout`).
        plan: token split (:class:`ShardPlan`).
        inner: the attention computed on the head shard (``[L, Hq/cp, D]``...), e.g. FlashAttention.
        group: process group (None: the default group).
        stats: optional :class:`CommStats` to count bytes and time.
        key_mask: optional bool ``[L]`` of the global sequence, False for tokens that must not be
            attention keys (e.g. text padded to a length bucket); combined with ``mask``.
    """

    def __init__(self, layout: HeadLayout, plan: ShardPlan, inner: AttentionKernel, group=None,
                 stats: CommStats | None = None, key_mask: torch.Tensor | None = None):
        self.layout, self.plan, self.inner, self.group, self.stats = layout, plan, inner, group, stats
        self.key_mask = key_mask

    def _all_to_all(self, send: torch.Tensor, kind: str) -> torch.Tensor:
        """``send`` ``[cp, ...]`` (chunk j goes to rank j) -> ``[cp, ...]`` (chunk j came from rank j)."""
        recv = torch.empty_like(send)
        cp = self.layout.cp
        nbytes = send.numel() * send.element_size() * (cp - 1) // cp
        with _Timed(self.stats, kind, nbytes, send.device):
            dist.all_to_all_single(recv, send, group=self.group)
        return recv

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        lay, plan = self.layout, self.plan
        cp, ll, dim = lay.cp, q.shape[0], q.shape[-1]
        if lay.kv_repeat > 1:
            k = k.repeat_interleave(lay.kv_repeat, dim=1)
            v = v.repeat_interleave(lay.kv_repeat, dim=1)
        hq, hkv = lay.heads_q, lay.heads_kv
        # [Ll, cp, h, D] per tensor, heads of rank j at index j; one fused send buffer [cp, Ll, hq+2hkv, D]
        send = torch.cat([q.reshape(ll, cp, hq, dim), k.reshape(ll, cp, hkv, dim), v.reshape(ll, cp, hkv, dim)],
                         dim=2).transpose(0, 1).contiguous()
        recv = self._all_to_all(send, "all_to_all_qkv").reshape(cp * ll, hq + 2 * hkv, dim)  # global token order
        length = plan.length  # padding tokens (the tail) are not keys and not computed
        qh, kh, vh = recv[:length, :hq], recv[:length, hq:hq + hkv], recv[:length, hq + hkv:]
        if self.key_mask is not None:
            keys = self.key_mask[None, :]
            mask = keys.expand(length, length) if mask is None else mask & keys
        o = self.inner(qh, kh, vh, mask)  # [L, hq, D]
        if plan.pad:
            o = torch.cat([o, o.new_zeros(plan.pad, hq, dim)])
        back = self._all_to_all(o.reshape(cp, ll, hq, dim).contiguous(), "all_to_all_out")  # [cp(src heads), Ll, hq, D]
        return back.transpose(0, 1).reshape(ll, cp * hq, dim)


class _GlobalRanges(AttentionRanges):
    """Local-attention ranges whose :meth:`mask` is the global ``[L, L]`` mask whatever length is asked
    (:meth:`DiTModel.forward` asks for the shard's length)."""

    def __init__(self, ranges: AttentionRanges, length: int, device):
        super().__init__(ranges.q_ranges, ranges.k_ranges)
        self._mask = ranges.mask(length, device)

    def mask(self, length: int, device: torch.device) -> torch.Tensor:
        return self._mask


# ---------------------------------------------------------------------------------------------
# forward over a group


def forward_shard(
    model: DiTModel,
    x_local: torch.Tensor,
    coords_local: torch.Tensor,
    *,
    plan: ShardPlan,
    spans: list[Span],
    local_ranges: AttentionRanges | None,
    compute_dtype: torch.dtype,
    exact_attention: bool | None = None,
    group=None,
    stats: CommStats | None = None,
    intermediates: dict | None = None,
    key_mask: torch.Tensor | None = None,
    attention_kernel: AttentionKernel | None = None,
) -> torch.Tensor:
    """This rank's part of a context-parallel DiT forward; every rank of ``group`` must call it.

    Args:
        model: the DiT (full weights on every rank).
        x_local: fp32 ``[Lp/cp, in_channels]``: this rank's slice of the padded packed inputs.
        coords_local: fp32 ``[Lp/cp, 9]``: their rotary coordinates (global positions).
        plan: the split (:class:`ShardPlan` of the real length and ``cp``).
        spans: modality runs of the real global sequence (:func:`engine.dit.modality_spans`).
        local_ranges: frame-local attention ranges of the global sequence (used by
            ``local_attn_layers`` only), or None.
        compute_dtype, exact_attention: as :meth:`DiTModel.forward`.
        group: process group of ``cp`` ranks (None: default group).
        stats: optional :class:`CommStats`.
        intermediates: optional dict receiving the local rows of :meth:`DiTModel.forward`'s taps.
        key_mask: optional bool ``[L]`` (global), False for tokens that are no attention key.
        attention_kernel: the kernel attending over the gathered sequence for this rank's heads (the
            runner backend's choice, :data:`engine.dit.AttentionKernel`); None: :func:`engine.dit.attention`.

    Returns:
        fp32 ``[Lp/cp, out_channels]``: the output rows of this rank's tokens (padding rows included).

    Raises:
        ValueError: the degree does not split the heads, or the shard has the wrong length.
        RuntimeError / DistBackendError: a collective failed (a peer died or timed out).
    """
    cp = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if plan.cp != cp:
        raise ValueError(f"plan is for cp {plan.cp}, the group has {cp} ranks")
    if x_local.shape[0] != plan.local_length:
        raise ValueError(f"x_local has {x_local.shape[0]} rows, the shard has {plan.local_length}")
    layout = HeadLayout.for_config(model.config, cp)
    if key_mask is not None and tuple(key_mask.shape) != (plan.length,):
        raise ValueError(f"key_mask shape {tuple(key_mask.shape)} must be ({plan.length},)")
    if exact_attention is None:
        exact_attention = x_local.device.type != "cuda"
    base = attention_kernel
    if base is None:
        def base(q, k, v, mask, _exact=exact_attention):
            return attention(q, k, v, mask, _exact)
    ranges = None
    if model.config.local_attn_layers and local_ranges is not None:
        ranges = _GlobalRanges(local_ranges, plan.length, x_local.device)
    local_spans = plan.local_spans(spans, rank)
    modality = modality_of(local_spans, plan.local_length, x_local.device)
    if key_mask is not None:
        key_mask = key_mask.to(device=x_local.device, dtype=torch.bool)
    ulysses = UlyssesAttention(layout, plan, base, group, stats, key_mask)
    return DiTModel.forward(model, x_local, coords_local, modality, spans=local_spans, local_ranges=ranges,
                            compute_dtype=compute_dtype, exact_attention=exact_attention,
                            intermediates=intermediates, attention_kernel=ulysses)


def _all_gather_rows(local: torch.Tensor, length: int, group=None, stats: CommStats | None = None) -> torch.Tensor:
    cp = dist.get_world_size(group)
    parts = [torch.empty_like(local) for _ in range(cp)]
    nbytes = local.numel() * local.element_size() * (cp - 1)
    with _Timed(stats, "all_gather_out", nbytes, local.device):
        dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts)[:length]


def forward_replicated(
    model: DiTModel,
    x: torch.Tensor,
    coords: torch.Tensor,
    *,
    spans: list[Span],
    local_ranges: AttentionRanges | None = None,
    compute_dtype: torch.dtype = torch.bfloat16,
    exact_attention: bool | None = None,
    group=None,
    stats: CommStats | None = None,
    intermediates: dict | None = None,
    key_mask: torch.Tensor | None = None,
    attention_kernel: AttentionKernel | None = None,
) -> torch.Tensor:
    """Context-parallel forward when every rank holds the same full inputs: ``x`` fp32 ``[L, in]``,
    ``coords`` fp32 ``[L, 9]`` -> fp32 ``[L, out_channels]`` on every rank (all-gathered).

    ``intermediates`` (if given) receives the full-length taps of :meth:`DiTModel.forward`
    (``rope``, ``adapter_out``, ``layer{i}_out``, ...), all-gathered too. ``key_mask``: optional bool
    ``[L]``, False for tokens that are no attention key (:class:`UlyssesAttention`);
    ``attention_kernel``: as :func:`forward_shard`.
    """
    cp = dist.get_world_size(group)
    rank = dist.get_rank(group)
    plan = ShardPlan(x.shape[0], cp)
    xp, cp_coords = pad_inputs(x, coords, plan)
    start, end = plan.bounds(rank)
    taps: dict | None = {} if intermediates is not None else None
    out = forward_shard(model, xp[start:end], cp_coords[start:end], plan=plan, spans=spans,
                        local_ranges=local_ranges, compute_dtype=compute_dtype, exact_attention=exact_attention,
                        group=group, stats=stats, intermediates=taps, key_mask=key_mask,
                        attention_kernel=attention_kernel)
    if intermediates is not None:
        for key, value in taps.items():
            intermediates[key] = _all_gather_rows(value, plan.length, group)
    return _all_gather_rows(out, plan.length, group, stats)


def padding_key_mask(length: int, valid_length: int | None, key_mask: torch.Tensor | None,
                     device: torch.device) -> torch.Tensor | None:
    """``key_mask`` (bool ``[L]``) with the padding of a text bucket removed as keys: tokens
    ``valid_length .. L`` (:meth:`DiTModel.forward`'s ``valid_length``) are no attention key. For
    the tokens before ``valid_length`` this is exactly the one-process mask (they never see padding);
    padding rows differ but are dropped by ``unpack``.

    Raises:
        ValueError: ``valid_length`` outside ``[1, L]``.
    """
    if valid_length is None or valid_length == length:
        return key_mask
    if not 0 < valid_length <= length:
        raise ValueError(f"valid_length {valid_length} outside [1, {length}]")
    valid = torch.arange(length, device=device) < valid_length
    return valid if key_mask is None else (key_mask.to(device) & valid)


class ContextParallelDiT(DiTModel):
    """A :class:`DiTModel` whose ``forward`` is split over the ranks of ``group`` (default: the default
    process group). Every rank calls it with the same full inputs and gets the full output, so it is a
    drop-in for code that builds a ``DiTModel`` (``python -m engine.parity DIR --cp N`` runs the
    parity checks through it). Same signature and shapes as :meth:`DiTModel.forward`."""

    group = None

    def forward(self, x, coords, modality, *, spans=None, local_ranges=None, compute_dtype=torch.bfloat16,
                exact_attention=None, intermediates=None, key_mask=None, valid_length=None,
                attention_kernel=None):
        from engine.dit import modality_spans

        key_mask = padding_key_mask(x.shape[0], valid_length, key_mask, x.device)
        if spans is None:
            spans = modality_spans(modality)
        return forward_replicated(self, x, coords, spans=spans, local_ranges=local_ranges,
                                  compute_dtype=compute_dtype, exact_attention=exact_attention, group=self.group,
                                  intermediates=intermediates, key_mask=key_mask, attention_kernel=attention_kernel)


# ---------------------------------------------------------------------------------------------
# rank 0 drives, the other ranks follow

_FORWARD, _DONE = 1, 2
_HEADER = 9  # op, model index, L, in_channels, dtype code, exact (-1 None), n_spans, n_ranges, has key mask
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}


class _Channel:
    """Rank 0's side of the per-call protocol (header broadcast, input scatter, output gather)."""

    def __init__(self, device: torch.device, group=None, stats: CommStats | None = None):
        self.device, self.group, self.stats = torch.device(device), group, stats
        self.broken = False
        self.calls = 0

    def _check(self) -> None:
        if self.broken:
            raise ContextParallelError("the context-parallel group failed earlier; the ranks must be restarted")

    def forward(self, model: DiTModel, index: int, x, coords, spans, local_ranges, compute_dtype, exact,
                key_mask=None, attention_kernel=None) -> torch.Tensor:
        self._check()
        try:
            return _drive_forward(model, index, x, coords, spans, local_ranges, compute_dtype, exact, key_mask,
                                  self.device, self.group, self.stats, attention_kernel)
        except (ValueError, TypeError):
            raise
        except Exception as exc:
            self.broken = True
            raise ContextParallelError(f"rank 0: a collective of the DiT forward failed: {exc}") from exc
        finally:
            self.calls += 1

    def finish(self) -> None:
        """Release the other ranks from the current job (they return from :func:`serve_forwards`)."""
        self._check()
        header = torch.zeros(_HEADER, dtype=torch.int64, device=self.device)
        header[0] = _DONE
        try:
            dist.broadcast(header, 0, group=self.group)
        except Exception as exc:
            self.broken = True
            raise ContextParallelError(f"rank 0: ending the job failed: {exc}") from exc


def _drive_forward(model, index, x, coords, spans, local_ranges, compute_dtype, exact, key_mask, device, group,
                   stats, attention_kernel=None):
    cp = dist.get_world_size(group)
    plan = ShardPlan(x.shape[0], cp)
    check_degree(model.config, cp)
    if x.shape[1] != model.config.in_channels:
        raise ValueError(f"x has {x.shape[1]} columns, the model's in_channels is {model.config.in_channels}")
    if key_mask is not None and tuple(key_mask.shape) != (plan.length,):
        raise ValueError(f"key_mask shape {tuple(key_mask.shape)} must be ({plan.length},)")
    ranges = local_ranges if (model.config.local_attn_layers and local_ranges is not None) else None
    n_ranges = 0 if ranges is None else int(ranges.q_ranges.shape[0])
    header = torch.tensor([_FORWARD, index, plan.length, x.shape[1], _DTYPE_CODES[compute_dtype],
                           -1 if exact is None else int(exact), len(spans), n_ranges, int(key_mask is not None)],
                          dtype=torch.int64, device=device)
    meta = [v for span in spans for v in span]
    if ranges is not None:
        meta += torch.cat([ranges.q_ranges, ranges.k_ranges], dim=1).flatten().tolist()
    with _Timed(stats, "broadcast_meta", 0, device):
        dist.broadcast(header, 0, group=group)
        dist.broadcast(torch.tensor(meta, dtype=torch.int64, device=device), 0, group=group)
        if key_mask is not None:
            key_mask = key_mask.to(device=device, dtype=torch.uint8).contiguous()
            dist.broadcast(key_mask, 0, group=group)
    xp, cp_coords = pad_inputs(x.float(), coords.float(), plan)
    rows = torch.cat([xp, cp_coords], dim=1).to(device)
    return _shard_and_run(model, list(rows.chunk(cp)), plan, spans, ranges, compute_dtype, exact, key_mask, device,
                          group, stats, attention_kernel)


def _shard_and_run(model, chunks, plan, spans, ranges, compute_dtype, exact, key_mask, device, group, stats,
                   attention_kernel=None):
    """Scatter ``[x | coords]`` rows from rank 0, run the shard, gather outputs on rank 0."""
    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    local = torch.empty(plan.local_length, model.config.in_channels + 9, dtype=torch.float32, device=device)
    nbytes = local.numel() * local.element_size() * (cp - 1) if rank == 0 else 0
    with _Timed(stats, "scatter_inputs", nbytes, device):
        dist.scatter(local, [c.contiguous() for c in chunks] if rank == 0 else None, src=0, group=group)
    out = forward_shard(model, local[:, :-9], local[:, -9:], plan=plan, spans=spans, local_ranges=ranges,
                        compute_dtype=compute_dtype, exact_attention=exact, group=group, stats=stats,
                        key_mask=key_mask, attention_kernel=attention_kernel)
    parts = [torch.empty_like(out) for _ in range(cp)] if rank == 0 else None
    with _Timed(stats, "gather_out", out.numel() * out.element_size() if rank else 0, device):
        dist.gather(out.contiguous(), parts, dst=0, group=group)
    return torch.cat(parts)[: plan.length] if rank == 0 else out


def serve_forwards(models: list[DiTModel | DiTRunner | None], *, device, group=None,
                   stats: CommStats | None = None) -> int:
    """A non-zero rank's side of a job: run every forward rank 0 starts until it ends the job.

    ``models[i]`` is the model of index ``i`` (0 the base DiT, 1 the SR DiT): a DiT (default attention)
    or a :class:`engine.runner.DiTRunner`, whose backend's module and attention kernel run the shard
    (:func:`step_parts`). The input width of each call is read from the header, so every model must
    accept it. Returns the number of forwards run.

    Raises:
        RuntimeError / DistBackendError: a collective failed or timed out (rank 0 died or hung).
        ContextParallelError: rank 0 asked for a model this rank does not have.
    """
    device = torch.device(device)
    parts = [None if m is None else step_parts(m) for m in models]
    count = 0
    while True:
        header = torch.empty(_HEADER, dtype=torch.int64, device=device)
        dist.broadcast(header, 0, group=group)
        op, index, length, in_width, dtype_code, exact, n_spans, n_ranges, has_key_mask = header.tolist()
        if op == _DONE:
            return count
        meta = torch.empty(3 * n_spans + 4 * n_ranges, dtype=torch.int64, device=device)
        dist.broadcast(meta, 0, group=group)
        values = meta.tolist()
        key_mask = None
        if has_key_mask:
            key_mask = torch.empty(length, dtype=torch.uint8, device=device)
            dist.broadcast(key_mask, 0, group=group)
        spans = [tuple(values[3 * i: 3 * i + 3]) for i in range(n_spans)]
        ranges = None
        if n_ranges:
            table = torch.tensor(values[3 * n_spans:], dtype=torch.int32).view(n_ranges, 4)
            ranges = AttentionRanges(table[:, :2].contiguous(), table[:, 2:].contiguous())
        model, kernel = parts[index] if index < len(parts) and parts[index] is not None else (None, None)
        if model is None:
            raise ContextParallelError(f"rank 0 asked for model {index}, which this rank did not build")
        plan = ShardPlan(length, dist.get_world_size(group))
        if in_width != model.config.in_channels:
            raise ContextParallelError(f"input width {in_width} differs from model {index}'s {model.config.in_channels}")
        _shard_and_run(model, None, plan, spans, ranges, _DTYPES[dtype_code], None if exact < 0 else bool(exact),
                       key_mask, device, group, stats, kernel)
        count += 1


class DistributedDiT:
    """Rank 0's stand-in for a :class:`DiTModel` inside an engine: same call and ``config``; each call
    sends every rank its token shard, runs the forward on all ranks and returns the gathered output.

    Args:
        model: the DiT on rank 0.
        index: which model the other ranks run (0 base DiT, 1 SR DiT).
        channel: the rank-0 protocol shared by the models of one engine.
    """

    def __init__(self, model: DiTModel, index: int, channel: _Channel):
        self.model, self.index, self.channel = model, index, channel
        self.config = model.config

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def __call__(self, x, coords, modality, *, spans=None, local_ranges=None, compute_dtype=torch.bfloat16,
                 exact_attention=None, intermediates=None, key_mask=None, valid_length=None,
                 attention_kernel=None) -> torch.Tensor:
        """``x`` fp32 ``[L, in]``, ``coords`` ``[L, 9]``, ``modality`` ``[L]`` -> fp32 ``[L, out]`` (as
        :meth:`DiTModel.forward`; ``intermediates`` are not supported). ``key_mask``: optional bool ``[L]``,
        False for tokens that are no attention key; ``valid_length``: text padding from this index on
        (:func:`padding_key_mask`); ``attention_kernel``: rank 0's kernel (the other ranks use their
        own runners' kernels, :func:`serve_forwards`)."""
        from engine.dit import modality_spans

        key_mask = padding_key_mask(x.shape[0], valid_length, key_mask, x.device)
        if intermediates is not None:
            raise ValueError("intermediates are not collected by a context-parallel forward here")
        if spans is None:
            spans = modality_spans(modality)
        return self.channel.forward(self.model, self.index, x, coords, [tuple(int(v) for v in s) for s in spans],
                                    local_ranges, compute_dtype, exact_attention, key_mask, attention_kernel)


def step_parts(model: DiTModel | DiTRunner) -> tuple[DiTModel, AttentionKernel | None]:
    """What a rank runs for ``model``: ``(module, attention kernel)``; for a runner, the module and kernel
    of its step (:class:`engine.runner.DiTStep`: the DiT or its backend's shadow of it).

    Raises:
        ValueError: the runner's step does not call a DiT module (``tensorrt``, ``compile`` with scope
            ``model``): such a step cannot be split over ranks.
    """
    if not isinstance(model, DiTRunner):
        return model, None
    step = model.forward
    if not isinstance(step, DiTStep):
        raise ValueError(f"context parallel needs a runner step that calls the DiT (backends eager, fast, fp8, "
                         f"compile with scope 'layer'); backend {model.backend.name!r} "
                         f"(compile scope {model.backend.compile_scope!r}) replaces the whole call")
    return step.model, step.attention_kernel


def distributed_step(runner: DiTRunner, index: int, channel: _Channel) -> DiTStep:
    """Rank 0's step for ``runner``: its backend's module behind a :class:`DistributedDiT` (model
    ``index``), with the same compute dtype and attention kernel. Raises as :func:`step_parts`."""
    model, kernel = step_parts(runner)
    return DiTStep(DistributedDiT(model, index, channel), runner.compute_dtype, kernel)


# ---------------------------------------------------------------------------------------------
# the engine on cp worker processes

EngineFactory = Callable[..., Any]
"""``factory(device=str) -> MagiHumanEngine``: picklable (a module-level function or a
``functools.partial`` of one), called once in every rank's process with ``cpu`` or ``cuda:<rank>``."""


def _to_cpu(obj):
    """Move every tensor inside ``obj`` (dataclasses, dicts, lists, tuples) to the CPU for the pipe."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _to_cpu(getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def full_preset_dits(checkpoint_dir: str, *, sr: bool = False, device: str = "cpu"):
    """The distilled DiT (and the ``540p_sr`` DiT with ``sr``) of the checkpoint root, without the text
    encoder and the VAEs (T5Gemma alone is ~18 GB), eval mode.

    Returns:
        an object with ``dit`` and ``sr_dit`` (:class:`DiTModel` or None) on ``device``.

    Raises:
        engine.stack.StackError: the root lacks the DiT directories (checked before reading weights).
    """
    from types import SimpleNamespace

    from engine.checkpoint import load_dit
    from engine.stack import resolve_stack

    files = resolve_stack(checkpoint_dir, variant="distill", sr="540p_sr" if sr else None, use_turbo=True)
    dit = load_dit(files.dits["distill"], variant="distill", device=device, progress=False)
    sr_dit = load_dit(files.dits["540p_sr"], variant="540p_sr", device=device, progress=False) if sr else None
    return SimpleNamespace(dit=dit.eval(), sr_dit=sr_dit.eval() if sr_dit is not None else None)


def full_preset_workers(checkpoint_dir: str, *, sr: bool = False, backend: str = "eager", device: str = "cpu"):
    """What a non-zero rank of the ``full`` preset needs: :func:`full_preset_dits` and a
    :class:`engine.runner.DiTRunner` per DiT with ``backend`` applied (:func:`engine.backends.apply_backend`).

    Returns:
        an object with ``dit``, ``sr_dit``, ``runner`` and ``sr_runner`` (None without ``sr``).
    """
    from engine.backends import apply_backend

    models = full_preset_dits(checkpoint_dir, sr=sr, device=device)
    runners = []
    for model in (models.dit, models.sr_dit):
        runner = None if model is None else DiTRunner(model)
        if runner is not None:
            apply_backend(runner, backend, torch.device(device))
        runners.append(runner)
    models.runner, models.sr_runner = runners
    return models


def _rank_main(rank: int, cp: int, init_file: str, factories: tuple[EngineFactory, Callable[..., Any]],
               device_kind: str, timeout_s: float, threads: int, conn, cancel) -> None:
    """Body of one rank's process: build the engine (rank 0: ``factories[0]``, others ``factories[1]``),
    then serve jobs from the parent's pipe until ``exit`` or a broken group."""
    try:
        if device_kind == "cuda":
            torch.cuda.set_device(rank)
            device = f"cuda:{rank}"
        else:
            torch.set_num_threads(threads)
            device = "cpu"
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo", init_method=f"file://{init_file}",
                                rank=rank, world_size=cp, timeout=dt.timedelta(seconds=timeout_s))
        engine = factories[0 if rank == 0 else 1](device=device)
        models = [engine.runner, getattr(engine, "sr_runner", None)]  # the runners carry each DiT's backend
        for model in models:
            if model is not None:
                check_degree(model.config, cp)
                step_parts(model)  # refuse a step that cannot be split before reporting ready
        info = None
        channel = _Channel(device)
        if rank == 0:
            for index, runner in enumerate(models):
                if runner is not None:
                    runner.forward = distributed_step(runner, index, channel)
            info = {k: getattr(engine, k, None) for k in ("name", "width", "height", "fps", "sample_rate",
                                                          "max_segment_seconds", "sr_width", "sr_height",
                                                          "notice", "max_text_tokens")}
        conn.send(("ready", info))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        conn.send(("error", type(exc).__name__, f"rank {rank}: {exc}", traceback.format_exc(), True))
        return
    torch.set_grad_enabled(False)
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg[0] == "exit":
            break
        if msg[0] == "follow":
            try:
                conn.send(("ok", serve_forwards(models, device=device)))
            except Exception as exc:  # noqa: BLE001
                conn.send(("error", type(exc).__name__, f"rank {rank}: {exc}", traceback.format_exc(), True))
                return
            continue
        _, method, args, collective = msg
        reply = None
        try:
            kwargs = {"cancel": cancel} if method in ("generate", "super_resolve") else {}
            reply = ("ok", _to_cpu(getattr(engine, method)(*args, **kwargs)))
        except Exception as exc:  # noqa: BLE001 - sent to the parent, which re-raises
            reply = ("error", type(exc).__name__, f"rank 0: {exc}", traceback.format_exc(), channel.broken)
        if collective and not channel.broken:
            try:
                channel.finish()
            except ContextParallelError as exc:
                reply = ("error", type(exc).__name__, str(exc), traceback.format_exc(), True)
        conn.send(reply)
        if channel.broken:
            return
    dist.destroy_process_group()


class ContextParallelEngine:
    """A :class:`engine.api.SegmentEngine` whose DiT forwards run on ``cp`` ranks (``serve --cp N``).

    ``cp`` worker processes are spawned (``torch.multiprocessing``, ``spawn``); each builds the engine
    with ``factory`` and joins one process group (NCCL on ``cuda``, rank ``r`` on GPU ``r``; gloo on
    ``cpu``) through a file store in a private temporary directory. Rank 0 runs the whole segment
    (text encoder, sampler, decoders) and every DiT forward is split over all ranks
    (:class:`DistributedDiT`); the other ranks follow with :func:`serve_forwards`. The calling process
    only sends requests and receives segments (tensors moved to the CPU), so a rank failure never
    blocks it:

    * collectives run with ``timeout_s``: a rank that dies or hangs makes the others raise within
      ``timeout_s``, and a dead process is seen within 0.1 s; the job then raises
      :class:`ContextParallelError` naming the rank, all ranks are killed, and the next call starts
      fresh ranks (weights loaded again);
    * :class:`engine.api.EngineInputError` and :class:`engine.api.CancelledError` from rank 0 are
      re-raised as themselves; the ranks stay up.

    Constructor for the CLI (``serve --cp N``)::

        ContextParallelEngine.from_preset(preset, cp, checkpoint_dir=..., device=..., seed=..., sr=..., backend=...)

    Args:
        factory: :data:`EngineFactory` (rank 0, and the other ranks unless ``worker_factory``).
        worker_factory: optional ``f(device=str)`` for ranks 1.. returning an object with ``runner`` and
            ``sr_runner`` (:class:`engine.runner.DiTRunner` or None, e.g. :func:`full_preset_workers`):
            same DiT weights and backend as ``factory``'s engine.
        cp: number of ranks (>= 1; must split the DiT's heads, :func:`check_degree`).
        device: ``cpu`` or ``cuda`` (needs ``cp`` GPUs).
        timeout_s: collective timeout in seconds (bounds detection of a hung rank).
        start_timeout_s: longest wait for all ranks to build their engine.
        threads_per_rank: torch CPU threads per rank (default: this process's threads / cp, >= 1).

    Raises:
        ValueError: ``cp`` does not split the heads, or another rank start error (message from the rank).
        ContextParallelError: a rank did not start within ``start_timeout_s`` or died while starting.
    """

    def __init__(self, factory: EngineFactory, cp: int, *, device: str = "cpu", timeout_s: float = 60.0,
                 start_timeout_s: float = 600.0, threads_per_rank: int | None = None,
                 worker_factory: Callable[..., Any] | None = None):
        if not isinstance(cp, int) or cp < 1:
            raise ValueError(f"cp {cp!r} must be an integer >= 1")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device {device!r} must be 'cpu' or 'cuda'")
        if device == "cuda" and torch.cuda.device_count() < cp:
            raise ValueError(f"cp {cp} needs {cp} GPUs, {torch.cuda.device_count()} visible")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s {timeout_s} must be > 0")
        self.cp, self.device, self.timeout_s, self.start_timeout_s = cp, device, timeout_s, start_timeout_s
        self._factory = factory
        self._worker_factory = worker_factory or factory
        self._threads = threads_per_rank or max(1, torch.get_num_threads() // cp)
        self._ctx = torch.multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._procs: list = []
        self._conns: list = []
        self._tmpdir: tempfile.TemporaryDirectory | None = None
        self._cancel = self._ctx.Event()
        self.restarts = 0
        self._start()

    @classmethod
    def from_preset(cls, preset: str, cp: int, *, checkpoint_dir: str | None = None, device: str = "cpu",
                    seed: int = 0, sr: bool = False, backend: str = "eager", timeout_s: float = 60.0,
                    **kwargs) -> ContextParallelEngine:
        """The engine of :func:`engine.factory.create_engine` (``preview`` or ``full``) on ``cp`` ranks.

        For ``full`` the ranks other than 0 load only the DiT(s) (:func:`full_preset_workers`).

        Raises:
            ValueError: unknown preset, ``testpattern`` (no DiT), or a degree the preset's heads refuse.
        """
        import functools

        from engine.config import get_config
        from engine.factory import create_engine

        if preset not in ("preview", "full"):
            raise ValueError(f"preset {preset!r} has no DiT to split; context parallelism needs preview or full")
        check_degree(get_config(preset), cp)
        factory = functools.partial(create_engine, preset, checkpoint_dir=checkpoint_dir, seed=seed, sr=sr,
                                    backend=backend)
        if preset == "full" and checkpoint_dir:
            kwargs.setdefault("worker_factory", functools.partial(full_preset_workers, checkpoint_dir, sr=sr,
                                                                  backend=backend))
        return cls(factory, cp, device=device, timeout_s=timeout_s, **kwargs)

    # -- process management -------------------------------------------------------------
    def _start(self) -> None:
        self._tmpdir = tempfile.TemporaryDirectory(prefix="avatar-cp-")
        init_file = os.path.join(self._tmpdir.name, "store")
        self._procs, self._conns = [], []
        for rank in range(self.cp):
            parent, child = self._ctx.Pipe()
            proc = self._ctx.Process(
                target=_rank_main, name=f"cp-rank-{rank}", daemon=True,
                args=(rank, self.cp, init_file, (self._factory, self._worker_factory), self.device, self.timeout_s, self._threads, child,
                      self._cancel if rank == 0 else None))
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
        replies = self._wait(set(range(self.cp)), self.start_timeout_s, "start")
        errors = [r for r in replies.values() if r[0] != "ready"]
        if errors:
            self._kill()
            kind, message = errors[0][1], errors[0][2]
            if kind == "ValueError":
                raise ValueError(message)
            raise ContextParallelError(f"starting {self.cp} ranks failed: {message}")
        info = replies[0][1]
        for key, value in info.items():
            setattr(self, key, value)
        self.name = f"{info['name']}-cp{self.cp}"

    def _kill(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
        for proc in self._procs:
            proc.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def close(self) -> None:
        """Stop every rank (exit message, then kill after 5 s)."""
        with self._lock:
            for conn in self._conns:
                try:
                    conn.send(("exit",))
                except OSError:
                    pass
            for proc in self._procs:
                proc.join(timeout=5)
            self._kill()

    def __del__(self):
        try:
            self._kill()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    @property
    def pids(self) -> list[int]:
        """Process ids of the ranks (rank order)."""
        return [p.pid for p in self._procs]

    def _dead_reply(self, rank: int, what: str) -> tuple:
        proc = self._procs[rank]
        if proc.is_alive():
            return ("error", "EOFError", f"rank {rank} of {self.cp} closed its pipe during {what}", "", True)
        return ("error", "RankDied", f"rank {rank} of {self.cp} died (exit code {proc.exitcode}) during {what}", "",
                True)

    def _wait(self, pending: set[int], timeout_s: float | None, what: str, cancel=None) -> dict[int, tuple]:
        """Collect one reply per pending rank; a dead rank or (``timeout_s``) a silent one is an error
        reply. After the first error reply the others get no further wait."""
        from multiprocessing.connection import wait

        replies: dict[int, tuple] = {}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            if cancel is not None and cancel.is_set():
                self._cancel.set()
            ready = wait([self._conns[r] for r in pending], timeout=0.1)
            for conn in ready:
                rank = self._conns.index(conn)
                try:
                    replies[rank] = conn.recv()
                except (EOFError, OSError):
                    self._procs[rank].join(timeout=1.0)
                    replies[rank] = self._dead_reply(rank, what)
                pending.discard(rank)
            for rank in list(pending):
                if not self._procs[rank].is_alive():
                    replies[rank] = self._dead_reply(rank, what)
                    pending.discard(rank)
            if any(r[0] == "error" and r[4] for r in replies.values()):
                for rank in pending:
                    replies[rank] = ("error", "Abandoned", f"rank {rank} did not answer", "", True)
                break
            if deadline is not None and time.monotonic() > deadline:
                for rank in pending:
                    replies[rank] = ("error", "Timeout", f"rank {rank} did not answer {what} within {timeout_s} s",
                                     "", True)
                break
        return replies

    # -- jobs ---------------------------------------------------------------------------------
    def _job(self, method: str, args: tuple, collective: bool, cancel=None):
        from engine.api import CancelledError, EngineInputError

        with self._lock:
            if not self._procs or not all(p.is_alive() for p in self._procs):
                logger.warning("context-parallel ranks %s are not running; starting %d fresh ranks",
                               [r for r, p in enumerate(self._procs) if not p.is_alive()], self.cp)
                self._kill()
                self.restarts += 1
                self._start()
            self._cancel.clear()
            ranks = set(range(self.cp)) if collective else {0}
            for rank in sorted(ranks - {0}):
                self._conns[rank].send(("follow",))
            self._conns[0].send(("call", method, args, collective))
            replies = self._wait(ranks, None, method, cancel)
            broken = [r for r in replies.values() if r[0] == "error" and r[4]]
            if broken:
                self._kill()
                causes = [r for r in broken if r[1] in ("RankDied", "EOFError")] or broken
                details = "; ".join(r[2] for r in causes)
                logger.error("context-parallel %s failed: %s", method, details)
                raise ContextParallelError(f"context-parallel {method} on {self.cp} ranks failed: {details}")
            reply = replies[0]
            if reply[0] == "ok":
                return reply[1]
            kind, message = reply[1], reply[2].removeprefix("rank 0: ")
            if kind == "EngineInputError":
                raise EngineInputError(message)
            if kind == "CancelledError":
                raise CancelledError(message)
            raise ContextParallelError(f"context-parallel {method} failed on rank 0: {kind}: {message}\n{reply[3]}")

    def prepare_identity(self, image, appearance: str):
        """:meth:`engine.api.SegmentEngine.prepare_identity` on rank 0 (no DiT call)."""
        return self._job("prepare_identity", (image, appearance), collective=False)

    def generate(self, request, cancel: threading.Event | None = None):
        """:meth:`engine.api.SegmentEngine.generate` with the DiT split over the ranks. Blocking.

        Raises:
            EngineInputError, CancelledError: as the engine's.
            ContextParallelError: a rank died, hung past ``timeout_s`` or failed; the ranks restart on
                the next call.
        """
        return self._job("generate", (request,), collective=True, cancel=cancel)

    @property
    def can_super_resolve(self) -> bool:
        """Rank 0's engine has an SR DiT (``sr_width``/``sr_height`` set)."""
        return getattr(self, "sr_width", None) is not None

    def super_resolve(self, segment, cancel: threading.Event | None = None):
        """The engine's :meth:`~engine.pipeline.MagiHumanEngine.super_resolve` with the SR DiT split
        over the ranks (same errors as :meth:`generate`)."""
        return self._job("super_resolve", (segment,), collective=True, cancel=cancel)

    def count_text_tokens(self, text: str) -> int:
        """:meth:`engine.api.SegmentEngine.count_text_tokens` of rank 0's engine (no DiT call)."""
        return self._job("count_text_tokens", (text,), collective=False)
