"""``torch.compile`` of the runner's step, with static shapes per segment geometry.

Two scopes, both owned by the runner's backend, neither changing the shared DiT:

* ``layer`` (default): set-up (packing, rotary table, span bookkeeping, the sampler) stays eager and
  only the per-layer hot function is compiled (STYLE.md §4), on the backend's own
  :func:`engine.backends.base.shadow_module` of the DiT (:func:`compile_layers`); the runner's step
  calls that shadow. Each :class:`engine.dit.TransformerLayer` is compiled with ``dynamic=False``: one
  graph per (layer kind, sequence length), i.e. per segment geometry and text length. The 40 layers
  come in 4 kinds (gelu7/swiglu7 × sandwich/shared), and with PyTorch's inlining of built-in modules
  the parameters are graph inputs, so layers of one kind share a compiled graph. This scope stays
  (rather than compiling the whole step) for compile time: Dynamo would otherwise trace 40 layers
  into one graph per shape and recompile all of them for every new sequence length.
* ``model``: ``torch.compile`` of the step callable itself (:func:`compile_step`): one graph per
  shape for the whole DiT call (longer compiles; graph breaks where the step does host work).

Modes:

* ``max-autotune-no-cudagraphs`` (CUDA default): Triton autotuning of GEMM/fused kernels, no CUDA
  graphs; the safest choice when the layer mixes in FlashAttention custom ops or FP8 ``_scaled_mm``.
* ``reduce-overhead``: CUDA graphs (cudagraph trees, one capture per layer graph) to remove launch
  gaps in the 8-step loop. The runtime copies inputs into static buffers, and a replay may overwrite
  the outputs of the previous one; the residual stream consumes each layer's output at once, and the
  caller marks every DiT forward as a new step (:func:`mark_step`). Not measured yet (no GPU here).
* ``default`` (CPU default): Inductor's C++/OpenMP code generation without autotuning.

Compile time is paid on the first call per geometry; the benchmark reports it separately
(``compile_s``). Caching across runs (documented here because it is environment, not code):

* ``TORCHINDUCTOR_CACHE_DIR`` (default ``/tmp/torchinductor_$USER``) holds the FX-graph cache
  (``TORCHINDUCTOR_FX_GRAPH_CACHE=1``, on by default), the AOTAutograd cache and autotuning results;
  point it at a persistent volume so a restarted server skips code generation and autotuning.
* ``torch.compiler.save_cache_artifacts()`` / ``load_cache_artifacts(blob)`` ("mega-cache") pack every
  cache entry of this process into one blob that can be shipped with the deployment;
  :func:`save_compile_cache` / :func:`load_compile_cache` wrap them.
* Dynamo's guards are not cached across processes: the first call of a fresh process still traces
  (seconds), even with a warm Inductor cache.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from engine.packing import PackedInputs

logger = logging.getLogger(__name__)

__all__ = [
    "compile_layers",
    "compile_step",
    "default_compile_mode",
    "load_compile_cache",
    "mark_step",
    "save_compile_cache",
    "set_compile_cache_dir",
]

RECOMPILE_LIMIT = 64  # 4 layer kinds x several geometries; PyTorch's default of 8 would fall back to eager


def default_compile_mode(device: str | torch.device) -> str:
    """``max-autotune-no-cudagraphs`` on CUDA, ``default`` elsewhere."""
    return "max-autotune-no-cudagraphs" if torch.device(device).type == "cuda" else "default"


def _raise_recompile_limit(limit: int) -> None:
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed in PyTorch 2.6
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), limit))
            return


def _compile_options(mode: str, fullgraph: bool, backend: str) -> dict:
    _raise_recompile_limit(RECOMPILE_LIMIT)
    kwargs = {"dynamic": False, "fullgraph": fullgraph, "backend": backend}
    if mode != "default" and backend == "inductor":
        kwargs["mode"] = mode
    return kwargs


def compile_layers(model: nn.Module, *, mode: str, fullgraph: bool = False, backend: str = "inductor") -> int:
    """Compile every transformer layer of ``model`` in place (:meth:`torch.nn.Module.compile`, which
    sets the module's compiled call, so the model's own ``forward`` loop keeps calling its layers
    unchanged). Returns the number of layers compiled.

    Changes ``model``: the ``compile`` backend calls it on its shadow of the DiT
    (:func:`engine.backends.base.shadow_module`), never on the runner's DiT.

    Args:
        mode: ``torch.compile`` mode (``default`` = none given).
        fullgraph: fail on graph breaks instead of splitting the graph.
        backend: ``torch.compile`` backend; tests use ``eager`` to check graph capture without codegen.
    """
    kwargs = _compile_options(mode, fullgraph, backend)
    layers = list(model.block.layers)
    for layer in layers:
        layer.compile(**kwargs)
    return len(layers)


def compile_step(step: Callable[[PackedInputs], torch.Tensor], *, mode: str, fullgraph: bool = False,
                 backend: str = "inductor") -> Callable[[PackedInputs], torch.Tensor]:
    """``torch.compile`` of a runner step ``(packed) -> fp32 [L, out_channels]`` (scope ``model``);
    returns the compiled callable, ``step`` itself is unchanged. Arguments as :func:`compile_layers`."""
    return torch.compile(step, **_compile_options(mode, fullgraph, backend))


def mark_step() -> None:
    """Start a new CUDA-graph step (``torch.compiler.cudagraph_mark_step_begin``); call before every DiT
    forward when the layers are compiled with ``mode="reduce-overhead"``."""
    torch.compiler.cudagraph_mark_step_begin()


def set_compile_cache_dir(path: str | Path) -> Path:
    """Keep Inductor's on-disk caches (FX graphs, AOTAutograd, autotuning, Triton kernels) in ``path``
    so that a restarted server skips code generation and autotuning (see the module doc).

    Inductor reads its cache root from the ``TORCHINDUCTOR_CACHE_DIR`` environment variable each time
    it needs it (``torch._inductor.runtime.cache_dir_utils.cache_dir``); this function is the one place
    the engine sets it, from the caller's setting. Call it before the first compile. Returns the
    absolute directory (created).
    """
    path = Path(path).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    logger.info("torch.compile caches in %s", path)
    return path


def save_compile_cache(path: str | Path) -> bool:
    """Write this process's compile caches (``torch.compiler.save_cache_artifacts``) to ``path``.

    Returns False when there is nothing to save.
    """
    result = torch.compiler.save_cache_artifacts()
    if result is None:
        return False
    blob, _info = result
    Path(path).write_bytes(blob)
    logger.info("saved compile cache artifacts (%d bytes) to %s", len(blob), path)
    return True


def load_compile_cache(path: str | Path) -> bool:
    """Load caches written by :func:`save_compile_cache`; False when ``path`` does not exist."""
    path = Path(path)
    if not path.exists():
        return False
    torch.compiler.load_cache_artifacts(path.read_bytes())
    logger.info("loaded compile cache artifacts from %s", path)
    return True
