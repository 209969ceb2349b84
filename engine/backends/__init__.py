"""Execution backends of the DiT: one interface, :func:`apply_backend` ``(runner, name, device) -> BackendInfo``.

A backend wraps the runner's step, not the :class:`engine.dit.DiTModel`: it sets what
:class:`engine.runner.DiTRunner` calls per denoising step, :attr:`~engine.runner.DiTRunner.forward`
``(packed: PackedInputs) -> fp32 [L, out_channels]``, and the runner's
:attr:`~engine.runner.DiTRunner.before_call`. The DiT instance itself is never changed (no attribute
set, no submodule swapped, no compiled call, no ``forward`` override), so the pipeline, super-resolution,
offline clips, the parity checks, context parallel and ``ops/bench`` all reach a backend through the one
runner step (issues 5 and 11), and one DiT can serve several runners with different backends:

============  =======================================================================================
name          what the runner's step becomes
============  =======================================================================================
``eager``     the reference path: the DiT with PyTorch SDPA in :func:`engine.dit.attention`, bf16
              GEMMs, no compile (:meth:`engine.runner.DiTRunner.eager_step`). Applying it undoes any
              other backend, leaving outputs bit-identical to a fresh runner.
``fast``      the DiT called with ``attention_kernel=`` the fastest kernel available (FlashAttention
              3 > 2 > SDPA with native GQA, :func:`engine.backends.attention.select_attention_kernel`);
              local-attention masks fall back to SDPA with the mask.
``compile``   ``fast`` + ``torch.compile``: scope ``layer`` compiles every transformer layer of the
              backend's own shadow of the DiT (:func:`engine.backends.base.shadow_module`, sharing the
              DiT's weight tensors); scope ``model`` compiles the step callable itself. Static shapes
              per segment geometry (:mod:`engine.backends.compile`; compile time is paid on the first
              call).
``fp8``       ``fast`` + FP8 e4m3 GEMMs with dynamic row-wise scales: the step calls a shadow of the
              DiT whose block linears are :class:`engine.backends.fp8.Fp8ExpertLinear`
              (:mod:`engine.backends.fp8`; ``torch._scaled_mm`` on Hopper, emulation on CPU).
``tensorrt``  a step that runs a TensorRT engine built from the fixed-geometry ONNX export
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
from typing import TYPE_CHECKING

import torch

from engine.backends.base import BACKEND_NAMES, BackendInfo, BackendUnavailableError

if TYPE_CHECKING:  # engine.runner imports engine.backends.base; the runtime imports are local
    from engine.runner import DiTRunner

logger = logging.getLogger(__name__)

__all__ = [
    "BACKEND_NAMES",
    "BackendInfo",
    "BackendUnavailableError",
    "apply_backend",
    "reset_backend",
]

def reset_backend(runner: DiTRunner) -> BackendInfo:
    """Give ``runner`` back its eager step (:meth:`~engine.runner.DiTRunner.eager_step`) and no
    ``before_call``; whatever a backend built (shadow modules, compiled graphs, FP8 weights, a
    TensorRT engine) is dropped with the old step. Returns the ``eager`` :class:`BackendInfo`."""
    _check_runner(runner)
    runner.forward = runner.eager_step()
    runner.before_call = None
    runner.backend = BackendInfo(name="eager", device=runner.backend.device)
    return runner.backend


def _check_runner(runner) -> None:
    from engine.runner import DiTRunner

    if not isinstance(runner, DiTRunner):
        raise TypeError(f"backends apply to an engine.runner.DiTRunner (the runner's step), got "
                        f"{type(runner).__name__}; wrap the DiT as DiTRunner(dit) first")


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
    runner: DiTRunner,
    name: str,
    device: str | torch.device | None = None,
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
    """Set ``runner``'s step to backend ``name``, replacing any previous backend; the runner's DiT is
    left unchanged. Also sets ``runner.before_call`` (:func:`engine.backends.compile.mark_step` under
    ``compile_mode="reduce-overhead"``, else None) and ``runner.backend`` (the returned record).

    Args:
        runner: the :class:`engine.runner.DiTRunner` whose step is replaced (its DiT on ``device``).
        name: one of :data:`BACKEND_NAMES`, or components joined with ``+``.
        device: the DiT's device (default: where its parameters are).
        attention: force an attention kernel (see :func:`~engine.backends.attention.select_attention_kernel`).
        compile_mode: ``torch.compile`` mode (default :func:`~engine.backends.compile.default_compile_mode`).
        compile_scope: ``layer`` (each transformer layer of the backend's shadow of the DiT) or
            ``model`` (the whole step).
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
        TypeError: ``runner`` is not a :class:`~engine.runner.DiTRunner` (e.g. a bare DiT).
        ValueError: unknown backend name or invalid option (the runner keeps its previous backend).
        BackendUnavailableError: the backend cannot run here (``tensorrt`` without the package or a
            GPU; ``fp8`` with ``fp8_impl="scaled_mm"`` where it is not supported).
    """
    from engine.runner import DiTStep

    _check_runner(runner)
    parts = _components(name)
    device = torch.device(device) if device is not None else next(runner.dit.parameters()).device
    if parts == ["tensorrt"]:
        from engine.backends.tensorrt_backend import require_tensorrt

        require_tensorrt()  # fail at once, before any other check
    if compile_scope not in ("layer", "model"):
        raise ValueError(f"compile scope must be 'layer' or 'model', got {compile_scope!r}")
    info = BackendInfo(name=name, device=str(device))
    if parts == ["eager"]:
        step, before_call = runner.eager_step(), None
    elif parts == ["tensorrt"]:
        step, before_call = _tensorrt_step(device, info, onnx_path, engine_path, rebuild_engine), None
    else:
        step, before_call = _pytorch_step(runner, parts, device, info, DiTStep, attention=attention,
                                          compile_mode=compile_mode, compile_scope=compile_scope,
                                          compile_backend=compile_backend, compile_fullgraph=compile_fullgraph,
                                          fp8_impl=fp8_impl, fp8_fast_accum=fp8_fast_accum)
    runner.forward, runner.before_call, runner.backend = step, before_call, info
    logger.info("backend %s on %s: %s", name, device, info)
    return info


def _fp8_options(device: torch.device, fp8_impl: str, fp8_fast_accum: bool | None) -> tuple[str, bool]:
    from engine.backends.fp8 import scaled_mm_available

    if fp8_impl == "auto":
        fp8_impl = "scaled_mm" if device.type == "cuda" and scaled_mm_available(device) else "emulate"
    elif fp8_impl == "scaled_mm" and not scaled_mm_available(device):
        raise BackendUnavailableError(
            f"fp8_impl 'scaled_mm' needs torch._scaled_mm with row-wise scales on {device} "
            "(CUDA compute capability >= 8.9, e.g. H100/H200/L40S)")
    elif fp8_impl not in ("scaled_mm", "emulate"):
        raise ValueError(f"fp8_impl must be 'auto', 'scaled_mm' or 'emulate', got {fp8_impl!r}")
    fast_accum = (device.type == "cuda") if fp8_fast_accum is None else fp8_fast_accum
    return fp8_impl, bool(fast_accum and fp8_impl == "scaled_mm")


def _pytorch_step(runner, parts, device, info, step_class, *, attention, compile_mode, compile_scope,
                  compile_backend, compile_fullgraph, fp8_impl, fp8_fast_accum):
    """The step of ``fast`` / ``fp8`` / ``compile`` combinations: the DiT (or the backend's shadow of
    it) called with the selected attention kernel; options are checked before anything is built."""
    from engine.backends.attention import select_attention_kernel
    from engine.backends.base import shadow_module

    if "fp8" in parts:
        info.fp8, info.fp8_fast_accum = _fp8_options(device, fp8_impl, fp8_fast_accum)
    info.attention, kernel = select_attention_kernel(device, prefer=attention)
    if device.type == "cuda" and info.attention == "sdpa":
        info.notes.append("no FlashAttention package importable; using PyTorch SDPA (enable_gqa)")
    model = runner.dit
    if "fp8" in parts or ("compile" in parts and compile_scope == "layer"):
        model = shadow_module(runner.dit)  # what this backend changes; the runner's DiT stays as it is
    if "fp8" in parts:
        from engine.backends.fp8 import apply_fp8

        info.modules_changed += apply_fp8(model, info.fp8, fast_accum=info.fp8_fast_accum)
        if info.fp8 == "emulate":
            info.notes.append("fp8 GEMMs emulated in fp32 (accuracy only; timings are not FP8 timings)")
    step = step_class(model, runner.compute_dtype, kernel)
    before_call = None
    if "compile" in parts:
        from engine.backends.compile import compile_layers, compile_step, default_compile_mode, mark_step

        info.compile_mode = compile_mode or default_compile_mode(device)
        info.compile_scope = compile_scope
        options = {"mode": info.compile_mode, "fullgraph": compile_fullgraph, "backend": compile_backend}
        if compile_scope == "layer":
            info.modules_changed += compile_layers(model, **options)
        else:
            step = compile_step(step, **options)
            info.modules_changed += 1
        if info.compile_mode == "reduce-overhead":
            before_call = mark_step
    return step, before_call


def _tensorrt_step(device, info, onnx_path, engine_path, rebuild):
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
    trt = TensorRTDiT(engine_path, device)
    info.attention, info.engine_path = "tensorrt", str(engine_path)
    info.notes.append("TensorRT engine has a fixed geometry; other sequence lengths raise ValueError")
    return trt.step
