"""FP8 (e4m3) GEMMs with dynamic row-wise scaling for the DiT's block linears (DIT.md §4.3).

Every :class:`engine.dit.ExpertLinear` (qkv, proj, up/gate, down of all 40 layers: 99.9 % of the
FLOPs that are not attention) is replaced by an :class:`Fp8ExpertLinear` (:func:`apply_fp8`, a module
transform in the manner of torchao's ``quantize_``). The ``fp8`` backend applies it to its own
:func:`engine.backends.base.shadow_module` of the DiT, never to the DiT itself: the runner's step calls
the shadow, the DiT keeps its bf16 linears, and dropping the shadow (another backend, ``reset_backend``)
is all it takes to return to the bf16 path.

* weights: quantised once per expert, one scale per output row (``w ≈ q_w · s_w``,
  ``s_w = amax(|w_row|) / 448``);
* activations: quantised on every call, one scale per token row (dynamic, ``s_x = amax(|x_row|) / 448``);
* GEMM ``y = (q_x q_wᵀ) · s_x · s_wᵀ`` with fp32 accumulation and the scales applied to the
  accumulator, output bf16 — ``torch._scaled_mm`` with row-wise scales (cuBLASLt / CUTLASS on
  Hopper; PyTorch also has a CPU implementation), or the emulation below.

``torch._scaled_mm`` needs the reduction size ``K`` and the output size ``N`` to be multiples of 16
(the full model has ``N = 7208`` for qkv and ``K = 13652`` for the swiglu down projection), so the
quantised weights are zero-padded to multiples of 16 and activations are zero-padded along ``K``;
padded output columns are sliced off. Padding with zeros does not change the result.

Implementations (``impl``):

* ``scaled_mm``: ``torch._scaled_mm`` (Hopper/Ada GPUs with compute capability >= 8.9; CPU builds
  of PyTorch that implement it);
* ``emulate``: the reference emulation — quantise to ``float8_e4m3fn``, matmul the fp8 values in
  fp32, multiply by both scales, round to bf16. Exact up to fp32 summation order relative to the
  kernel; used on CPU to measure the accuracy cost of FP8 without an FP8 GPU.

This module is our own small FP8 path (no torchao): ``ExpertLinear`` is a custom module with
expert-sliced weights, which torchao's ``nn.Linear`` swaps do not see.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from engine.dit import ExpertLinear, Span

__all__ = [
    "E4M3_MAX",
    "Fp8ExpertLinear",
    "Fp8Impl",
    "Fp8Weight",
    "apply_fp8",
    "dequantize_rowwise",
    "fp8_gemm",
    "fp8_linear_reference",
    "quantize_rowwise",
    "scaled_mm_available",
]

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
_MIN_SCALE = 1e-12  # all-zero rows: any positive scale reproduces zeros
_ALIGN = 16  # torch._scaled_mm: K and N multiples of 16

Fp8Impl = Literal["scaled_mm", "emulate"]


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x [M, K]`` to e4m3 with one scale per row: ``x ≈ q.float() * scale``.

    Returns:
        ``(q [M, K] float8_e4m3fn, scale [M, 1] float32)``; the largest-magnitude element of each row
        maps to ±448 exactly.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = (amax / E4M3_MAX).clamp(min=_MIN_SCALE)
    q = (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


def dequantize_rowwise(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 ``q * scale`` (inverse of :func:`quantize_rowwise` up to the e4m3 rounding)."""
    return q.float() * scale


def _pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = -x.shape[-1] % multiple
    return F.pad(x, (0, pad)) if pad else x


@dataclass
class Fp8Weight:
    """One expert's quantised weight: ``q [N_pad, K_pad]`` e4m3 (row-major; ``q.t()`` is the column-major
    operand ``_scaled_mm`` wants), ``scale [1, N_pad]`` fp32, and the unpadded ``out_features``/``in_features``."""

    q: torch.Tensor
    scale: torch.Tensor
    out_features: int
    in_features: int

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> Fp8Weight:
        """Quantise a ``[N, K]`` weight (any float dtype), zero-padding N and K to multiples of 16."""
        n, k = weight.shape
        w = _pad_last(weight, _ALIGN)
        pad_rows = -n % _ALIGN
        if pad_rows:
            w = torch.cat([w, w.new_zeros(pad_rows, w.shape[1])], dim=0)
        q, scale = quantize_rowwise(w)
        return cls(q.contiguous(), scale.t().contiguous(), n, k)


def fp8_gemm(x: torch.Tensor, w: Fp8Weight, impl: Fp8Impl, *, fast_accum: bool = False) -> torch.Tensor:
    """``x [M, K] @ wᵀ`` through e4m3 with row-wise scales; returns bf16 ``[M, N]``.

    Args:
        x: activations (bf16 or fp32), quantised here per row (dynamic scaling).
        w: the quantised weight.
        impl: ``scaled_mm`` or ``emulate`` (see module doc).
        fast_accum: ``use_fast_accum`` of ``torch._scaled_mm`` (Hopper's faster, less precise
            accumulation); ignored by the emulation.
    """
    qx, sx = quantize_rowwise(_pad_last(x, _ALIGN))
    if impl == "scaled_mm":
        out = torch._scaled_mm(qx, w.q.t(), scale_a=sx, scale_b=w.scale, out_dtype=torch.bfloat16,
                               use_fast_accum=fast_accum)
    elif impl == "emulate":
        out = (torch.matmul(qx.float(), w.q.float().t()) * sx * w.scale).to(torch.bfloat16)
    else:
        raise ValueError(f"fp8 impl must be 'scaled_mm' or 'emulate', got {impl!r}")
    return out[:, : w.out_features]


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Reference of the whole FP8 linear in plain fp32 math: dequantise both operands, matmul, round to bf16."""
    qx, sx = quantize_rowwise(x)
    qw, sw = quantize_rowwise(weight)
    return (dequantize_rowwise(qx, sx) @ dequantize_rowwise(qw, sw).t()).to(torch.bfloat16)


def scaled_mm_available(device: str | torch.device) -> bool:
    """Whether ``torch._scaled_mm`` with row-wise scales runs on ``device`` (probed with a 16x16 GEMM)."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available() or torch.cuda.get_device_capability(device) < (8, 9):
            return False
    try:
        a = torch.ones(16, 16, device=device).to(E4M3)
        s = torch.ones(16, 1, device=device)
        torch._scaled_mm(a, a.t(), scale_a=s, scale_b=s.t(), out_dtype=torch.bfloat16)
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


class Fp8ExpertLinear(nn.Module):
    """FP8 stand-in for an :class:`ExpertLinear`: same call ``(x [L, in], spans, dtype) -> [L, out]`` in
    ``dtype``, through :func:`fp8_gemm` on one :class:`Fp8Weight` per expert.

    The output is bf16-rounded (the kernel's output dtype) and returned in ``dtype``, like the bf16 GEMM.
    The quantised weights are plain attributes, not parameters or buffers: they are derived from the
    bf16 weight and stay out of every state dict.

    Args:
        linear: the bf16 linear to quantise (read once; not kept).
        impl: ``scaled_mm`` or ``emulate``.
        fast_accum: ``use_fast_accum`` of ``torch._scaled_mm``.
    """

    def __init__(self, linear: ExpertLinear, impl: Fp8Impl, *, fast_accum: bool = False):
        super().__init__()
        out = linear.out_features
        self.in_features, self.out_features, self.num_experts = linear.in_features, out, linear.num_experts
        with torch.no_grad():
            self.weights = [Fp8Weight.from_weight(linear.weight[e * out : (e + 1) * out])
                            for e in range(linear.num_experts)]
        self.impl, self.fast_accum = impl, fast_accum

    def forward(self, x: torch.Tensor, spans: list[Span] | None, dtype: torch.dtype) -> torch.Tensor:
        """``x`` ``[L, in]`` (bf16 or fp32) -> ``[L, out]`` in ``dtype``."""
        if self.num_experts == 1 or spans is None:
            return fp8_gemm(x, self.weights[0], self.impl, fast_accum=self.fast_accum).to(dtype)
        parts = [fp8_gemm(x[s:e], self.weights[m], self.impl, fast_accum=self.fast_accum) for m, s, e in spans]
        return torch.cat(parts, dim=0).to(dtype)


def apply_fp8(model: nn.Module, impl: Fp8Impl, *, fast_accum: bool = False) -> int:
    """Replace every :class:`ExpertLinear` inside ``model`` by an :class:`Fp8ExpertLinear`, in place;
    returns the number of modules replaced.

    A module transform: call it on a module tree you own -- the ``fp8`` backend calls it on its
    :func:`engine.backends.base.shadow_module` of the DiT, so the DiT itself keeps its bf16 linears.
    Call after the weights are on their device.
    """
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ExpertLinear):
                setattr(parent, name, Fp8ExpertLinear(child, impl, fast_accum=fast_accum))
                count += 1
    return count
