"""Attention kernels for :attr:`engine.dit.DiTModel.attention_kernel` (DIT.md §4.6 step 6).

Every kernel has the :data:`engine.dit.AttentionKernel` contract: ``(q [L, Hq, D], k [L, Hkv, D],
v [L, Hkv, D], mask [L, L] bool | None) -> [L, Hq, D]`` in the dtype of ``q``, softmax scale
``1/sqrt(D)``, no causal mask, grouped-query attention done natively (query head ``i`` reads K/V
head ``i // (Hq / Hkv)``; no repeated K/V is materialised).

Kernels, fastest first (:func:`select_attention_kernel` picks the first one that is importable):

* ``flash_attn_3``: FlashAttention 3, ``flash_attn_interface.flash_attn_func`` (Hopper only);
* ``flash_attn_2``: FlashAttention 2, ``flash_attn.flash_attn_func`` (Ampere and later);
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention(enable_gqa=True)``, which picks
  PyTorch's own flash / memory-efficient / cuDNN / math backend.

Both FlashAttention APIs take ``(batch, seq, heads, dim)`` tensors in fp16/bf16 on CUDA and have no
arbitrary-mask argument, so the flash kernels fall back to SDPA (with the mask) when a local-attention
mask is given (1080p SR layers, DIT.md §5.3), when the inputs are fp32 (``compute_dtype=float32``) or
when they are not on CUDA.

:func:`math_attention_kernel` spells attention out as two batched matmuls and a softmax. It is the
reference of the tests and the kernel the ONNX export traces (the TorchScript ONNX exporter cannot
convert SDPA with ``enable_gqa``; MatMul-Softmax-MatMul is also the pattern TensorRT fuses).
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from engine.dit import AttentionKernel

logger = logging.getLogger(__name__)

__all__ = [
    "flash_kernel",
    "math_attention_kernel",
    "sdpa_kernel",
    "select_attention_kernel",
]

FlashFn = Callable[..., "torch.Tensor | tuple"]
"""``flash_attn_func(q [B, L, Hq, D], k [B, L, Hkv, D], v [B, L, Hkv, D], causal=False, ...)``."""

_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def sdpa_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *,
                repeat_kv: bool | None = None) -> torch.Tensor:
    """PyTorch SDPA in the input dtype with native GQA (``enable_gqa=True``) and an optional bool mask.

    Unlike :func:`engine.dit.attention` with ``exact=True`` (the CPU default of the eager path) it never
    upcasts: bf16 inputs run the bf16 kernel.

    On CUDA, PyTorch implements GQA only in its flash and math backends, and its flash backend takes no
    mask; so with a mask the K/V heads are repeated and SDPA is called without ``enable_gqa``, which lets
    the memory-efficient backend (masks supported) run instead of the math one. (At 1080p the ``[L, L]``
    mask itself is ~4 GB; a block-sparse kernel such as ``flex_attention`` would be the next step.)
    ``repeat_kv`` forces that choice (None: repeat exactly when masked on CUDA).
    """
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if repeat_kv is None:
        repeat_kv = mask is not None and q.device.type == "cuda"
    if repeat_kv and kh.shape[1] != qh.shape[1]:
        groups = qh.shape[1] // kh.shape[1]
        kh, vh = kh.repeat_interleave(groups, dim=1), vh.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1)


def math_attention_kernel(upcast: bool = True) -> AttentionKernel:
    """Attention as ``softmax(q kᵀ / sqrt(D) + mask) v`` with batched matmuls, GQA by grouping query heads.

    Args:
        upcast: compute in fp32 and round the output once (as :func:`engine.dit.attention` with
            ``exact=True``); otherwise compute in the input dtype.

    The query heads of one K/V group are stacked along the row axis (``[Hkv, G * L, D]``), so K and V
    are read once per group and never repeated.
    """

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        length, hq, dim = q.shape
        hkv = k.shape[1]
        groups = hq // hkv
        out_dtype = q.dtype
        if upcast:
            q, k, v = q.float(), k.float(), v.float()
        # [L, Hkv, G, D] -> [Hkv, G * L, D]; K, V: [L, Hkv, D] -> [Hkv, L, D]
        qg = q.reshape(length, hkv, groups, dim).permute(1, 2, 0, 3).reshape(hkv, groups * length, dim)
        kt = k.permute(1, 2, 0)  # [Hkv, D, L]
        scores = torch.matmul(qg, kt) * (1.0 / math.sqrt(dim))  # [Hkv, G * L, L]
        if mask is not None:
            scores = scores.reshape(hkv, groups, length, length).masked_fill(~mask, float("-inf"))
            scores = scores.reshape(hkv, groups * length, length)
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, v.permute(1, 0, 2))  # [Hkv, G * L, D]
        out = out.reshape(hkv, groups, length, dim).permute(2, 0, 1, 3).reshape(length, hq, dim)
        return out.to(out_dtype)

    return kernel


def flash_kernel(fn: FlashFn, *, devices: Iterable[str] = ("cuda",)) -> AttentionKernel:
    """Wrap a FlashAttention ``flash_attn_func`` (FA2 or FA3) into the :data:`AttentionKernel` contract.

    Args:
        fn: ``flash_attn_func``; called as ``fn(q[None], k[None], v[None], causal=False)`` on
            ``(batch=1, seq, heads, dim)`` tensors. FA3 versions that return ``(out, lse)`` are handled.
        devices: device types the function runs on (tests pass ``("cpu",)`` with a stand-in).

    Falls back to :func:`sdpa_kernel` for a mask, fp32 inputs, or another device.
    """
    devices = tuple(devices)

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None or q.dtype not in _FLASH_DTYPES or q.device.type not in devices:
            return sdpa_kernel(q, k, v, mask)
        out = fn(q.contiguous()[None], k.contiguous()[None], v.contiguous()[None], causal=False)
        if isinstance(out, tuple):  # some FA3 builds return (out, softmax_lse)
            out = out[0]
        return out[0]

    return kernel


def _import_flash(module: str) -> FlashFn | None:
    try:
        return importlib.import_module(module).flash_attn_func
    except (ImportError, AttributeError, OSError) as exc:  # OSError: a wheel built for another CUDA
        logger.debug("attention kernel %s unavailable: %s", module, exc)
        return None


def select_attention_kernel(device: str | torch.device, prefer: str | None = None) -> tuple[str, AttentionKernel]:
    """The fastest attention kernel available on ``device``: ``(name, kernel)``.

    Order on CUDA: ``flash_attn_3`` (compute capability 9.x, package ``flash_attn_interface``),
    ``flash_attn_2`` (package ``flash_attn``), ``sdpa``. On any other device: ``sdpa``.

    Args:
        device: where the model runs.
        prefer: force one of ``flash_attn_3``, ``flash_attn_2``, ``sdpa``, ``math``.

    Raises:
        ValueError: ``prefer`` names an unknown kernel or one that is not importable here.
    """
    device = torch.device(device)
    known = ("flash_attn_3", "flash_attn_2", "sdpa", "math")
    if prefer is not None and prefer not in known:
        raise ValueError(f"unknown attention kernel {prefer!r}; known: {list(known)}")
    if prefer == "sdpa":
        return "sdpa", sdpa_kernel
    if prefer == "math":
        return "math", math_attention_kernel(upcast=False)
    candidates = []
    if device.type == "cuda":
        hopper = torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] == 9
        if hopper or prefer == "flash_attn_3":
            candidates.append(("flash_attn_3", "flash_attn_interface"))
        candidates.append(("flash_attn_2", "flash_attn"))
    for name, module in candidates:
        if prefer is not None and name != prefer:
            continue
        fn = _import_flash(module)
        if fn is not None:
            return name, flash_kernel(fn)
    if prefer is not None:
        raise ValueError(f"attention kernel {prefer!r} is not available on {device} (package not importable)")
    return "sdpa", sdpa_kernel
