"""Execution backends of the DiT: one interface, :func:`apply_backend` ``(model, name, device) -> BackendInfo``.

Backends change *how* :class:`engine.dit.DiTModel` runs, never its weights or its call signature, so the
sampler, the pipeline and the benchmark drive every backend through the same ``model(x, coords,
modality, ...)`` call (issue 5):

============  =======================================================================================
name          what it does
============  =======================================================================================
``eager``     the reference path: PyTorch SDPA in :func:`engine.dit.attention`, bf16 GEMMs, no compile.
              Applying it undoes any other backend, leaving outputs bit-identical to a fresh model.
``fast``      attention through the fastest kernel available (FlashAttention 3 > 2 > SDPA with
              native GQA, :func:`engine.backends.attention.select_attention_kernel`) via
              ``model.attention_kernel``; local-attention masks fall back to SDPA with the mask.
``compile``   ``fast`` + ``torch.compile`` of every transformer layer, static shapes per segment
              geometry (:mod:`engine.backends.compile`; compile time is paid on the first call).
``fp8``       ``fast`` + FP8 e4m3 GEMMs with dynamic row-wise scales in every block linear
              (:mod:`engine.backends.fp8`; ``torch._scaled_mm`` on Hopper, emulation on CPU).
``tensorrt``  a TensorRT engine built from the fixed-geometry ONNX export replaces the forward
              (:mod:`engine.backends.tensorrt_backend`); needs ``onnx_path``, CUDA and ``tensorrt``.
============  =======================================================================================

Components combine with ``+`` (``fp8+compile``); ``tensorrt`` stands alone.

The modality permutation that upstream performs (a stable argsort of the tokens by modality before
the first layer, kept across all 40 layers and undone for attention, DIT.md §4.2) is already absent
here: :class:`engine.dit.ExpertLinear` and :class:`engine.dit.RMSNorm` apply each expert to the
contiguous span of its modality in the packed ``[video | audio | text]`` order, so no backend has a
gather/scatter to remove.

Text encoding and VAE decoding stay off the DiT's critical path by scheduling, not by a backend: the
prompt is encoded before the segment's denoising loop starts (it can overlap the previous segment's
decode), and the Turbo decoder's sliding windows (CODECS.md §2.4) let the first frames leave before
the whole segment is decoded; ``ops/bench.py`` measures that as ``first_frame_s``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from engine.backends.base import BACKEND_NAMES, BackendInfo, BackendUnavailableError

logger = logging.getLogger(__name__)

__all__ = [
    "BACKEND_NAMES",
    "BackendInfo",
    "BackendUnavailableError",
    "apply_backend",
    "reset_backend",
]

def reset_backend(model: nn.Module) -> None:
    """Return ``model`` to the eager reference path (undo every backend)."""
    from engine.backends.compile import uncompile
    from engine.backends.fp8 import remove_fp8

    model.attention_kernel = None
    uncompile(model)
    remove_fp8(model)
    model.__dict__.pop("forward", None)  # TensorRT forward override
    model.__dict__.pop("_backend_info", None)


def _components(name: str) -> list[str]:
    parts = [p.strip() for p in name.split("+") if p.strip()]
    unknown = [p for p in parts if p not in BACKEND_NAMES]
    if not parts or unknown:
        raise ValueError(f"unknown backend {name!r}; known: {list(BACKEND_NAMES)} (combine with '+')")
    if "tensorrt" in parts and len(parts) > 1:
        raise ValueError("backend 'tensorrt' cannot be combined with others")
    if "eager" in parts and len(parts) > 1:
        raise ValueError("backend 'eager' cannot be combined with others")
    return parts


def apply_backend(
    model: nn.Module,
    name: str,
    device: str | torch.device,
    *,
    attention: str | None = None,
    compile_mode: str | None = None,
    compile_scope: str = "layer",
    compile_backend: str = "inductor",
    compile_fullgraph: bool = False,
    fp8_impl: str = "auto",
    fp8_fast_accum: bool | None = None,
    onnx_path: str | Path | None = None,
    engine_path: str | Path | None = None,
    rebuild_engine: bool = False,
) -> BackendInfo:
    """Set up backend ``name`` on ``model`` (already on ``device``), replacing any previous backend.

    Args:
        model: a :class:`engine.dit.DiTModel`.
        name: one of :data:`BACKEND_NAMES`, or components joined with ``+``.
        device: the model's device.
        attention: force an attention kernel (see :func:`~engine.backends.attention.select_attention_kernel`).
        compile_mode: ``torch.compile`` mode (default :func:`~engine.backends.compile.default_compile_mode`).
        compile_scope: ``layer`` (each transformer layer) or ``model`` (the whole forward).
        compile_backend: ``torch.compile`` backend (``inductor``; ``eager`` checks graph capture only).
        compile_fullgraph: fail on graph breaks.
        fp8_impl: ``scaled_mm``, ``emulate`` or ``auto`` (``scaled_mm`` on FP8-capable CUDA GPUs,
            ``emulate`` elsewhere).
        fp8_fast_accum: ``use_fast_accum`` of the FP8 GEMM (default True on CUDA, as torchao's
            inference default; the emulation ignores it).
        onnx_path: ``tensorrt`` only: the ONNX export to build from.
        engine_path: ``tensorrt`` only: the plan to load or write (default ``onnx_path`` with ``.plan``).
        rebuild_engine: ``tensorrt`` only: rebuild even if the plan exists.

    Raises:
        ValueError: unknown backend name or invalid option.
        BackendUnavailableError: the backend cannot run here (``tensorrt`` without the package or a
            GPU; ``fp8`` with ``fp8_impl="scaled_mm"`` where it is not supported).
    """
    parts = _components(name)
    device = torch.device(device)
    if parts == ["tensorrt"]:
        from engine.backends.tensorrt_backend import require_tensorrt

        require_tensorrt()  # fail at once, before any other check
    reset_backend(model)
    info = BackendInfo(name=name, device=str(device))
    if parts == ["eager"]:
        model._backend_info = info
        return info
    if parts == ["tensorrt"]:
        _apply_tensorrt(model, device, info, onnx_path, engine_path, rebuild_engine)
        model._backend_info = info
        return info

    from engine.backends.attention import select_attention_kernel

    info.attention, model.attention_kernel = select_attention_kernel(device, prefer=attention)
    if device.type == "cuda" and info.attention == "sdpa":
        info.notes.append("no FlashAttention package importable; using PyTorch SDPA (enable_gqa)")
    if "fp8" in parts:
        from engine.backends.fp8 import apply_fp8, scaled_mm_available

        if fp8_impl == "auto":
            fp8_impl = "scaled_mm" if device.type == "cuda" and scaled_mm_available(device) else "emulate"
        elif fp8_impl == "scaled_mm" and not scaled_mm_available(device):
            raise BackendUnavailableError(
                f"fp8_impl 'scaled_mm' needs torch._scaled_mm with row-wise scales on {device} "
                "(CUDA compute capability >= 8.9, e.g. H100/H200/L40S)")
        elif fp8_impl not in ("scaled_mm", "emulate"):
            raise ValueError(f"fp8_impl must be 'auto', 'scaled_mm' or 'emulate', got {fp8_impl!r}")
        fast_accum = (device.type == "cuda") if fp8_fast_accum is None else fp8_fast_accum
        info.fp8, info.fp8_fast_accum = fp8_impl, bool(fast_accum and fp8_impl == "scaled_mm")
        info.modules_changed += apply_fp8(model, fp8_impl, fast_accum=info.fp8_fast_accum)
        if fp8_impl == "emulate":
            info.notes.append("fp8 GEMMs emulated in fp32 (accuracy only; timings are not FP8 timings)")
    if "compile" in parts:
        from engine.backends.compile import compile_layers, default_compile_mode

        info.compile_mode = compile_mode or default_compile_mode(device)
        info.compile_scope = compile_scope
        info.modules_changed += compile_layers(model, mode=info.compile_mode, scope=compile_scope,
                                               fullgraph=compile_fullgraph, backend=compile_backend)
    model._backend_info = info
    logger.info("backend %s on %s: %s", name, device, info)
    return info


def _apply_tensorrt(model, device, info, onnx_path, engine_path, rebuild) -> None:
    from engine.backends.tensorrt_backend import TensorRTDiT, build_engine

    if device.type != "cuda":
        raise BackendUnavailableError(f"backend 'tensorrt' runs on CUDA devices only, got {device}")
    if onnx_path is None and engine_path is None:
        raise ValueError("backend 'tensorrt' needs onnx_path (from `python -m ops.export_onnx`) or engine_path")
    engine_path = Path(engine_path) if engine_path is not None else Path(onnx_path).with_suffix(".plan")
    if rebuild or not engine_path.exists():
        if onnx_path is None:
            raise ValueError(f"TensorRT plan {engine_path} does not exist and no onnx_path was given")
        build_engine(onnx_path, engine_path)
    runner = TensorRTDiT(engine_path, device)

    def forward(x, coords, modality, *, spans=None, local_ranges=None, compute_dtype=None,
                exact_attention=None, intermediates=None, valid_length=None):
        """TensorRT replacement of ``DiTModel.forward`` (fixed geometry; spans are baked into the engine,
        no text padding: export the unpadded length)."""
        if intermediates is not None:
            raise NotImplementedError("the TensorRT backend does not expose intermediates")
        if valid_length is not None and valid_length != x.shape[0]:
            raise NotImplementedError("the TensorRT backend has no key-padding mask; run it without text buckets")
        return runner(x, coords)

    model.forward = forward
    info.attention, info.engine_path = "tensorrt", str(engine_path)
    info.notes.append("TensorRT engine has a fixed geometry; other sequence lengths raise ValueError")
