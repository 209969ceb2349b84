"""What every DiT execution backend shares: the names, the error for "cannot run here", the
record of what was set up (:func:`engine.backends.apply_backend` returns it), and
:func:`shadow_module`, the copy of the DiT's module tree a backend changes instead of the DiT.

Its own module so that backend implementations (``tensorrt_backend``) import it without importing
the dispatcher in :mod:`engine.backends`.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

from torch import nn

__all__ = ["BACKEND_NAMES", "BackendInfo", "BackendUnavailableError", "shadow_module"]

BACKEND_NAMES = ("eager", "fast", "compile", "fp8", "tensorrt")


class BackendUnavailableError(RuntimeError):
    """A backend cannot run here (missing package or device); the message says what to install or use."""


@dataclass
class BackendInfo:
    """What :func:`apply_backend` set up.

    Attributes:
        name: the requested backend name (``eager``, ``fast``, ``fp8+compile``, ...).
        device: the device it was set up for.
        attention: attention kernel in use (``default`` = :func:`engine.dit.attention`, ``sdpa``,
            ``flash_attn_2``, ``flash_attn_3``, ``tensorrt``).
        compile_mode: ``torch.compile`` mode, or None.
        compile_scope: ``layer`` or ``model`` when compiled.
        fp8: FP8 GEMM implementation (``scaled_mm`` / ``emulate``), or None.
        fp8_fast_accum: ``use_fast_accum`` of the FP8 GEMM.
        modules_changed: number of modules compiled or swapped.
        engine_path: TensorRT plan in use, or None.
        notes: human-readable remarks (fallbacks taken, things not measured).
    """

    name: str
    device: str
    attention: str = "default"
    compile_mode: str | None = None
    compile_scope: str | None = None
    fp8: str | None = None
    fp8_fast_accum: bool = False
    modules_changed: int = 0
    engine_path: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def shadow_module(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s tree (same classes, same attributes) whose parameters and buffers are the
    very tensor objects of ``module``: no weight memory is copied.

    Every container a module keeps in its ``__dict__`` (``_parameters``, ``_buffers``, ``_modules``,
    the hook dicts, ...) is a new container, and every submodule is itself a shadow, so what a backend
    does to the shadow -- swap a submodule (FP8 linears), set a compiled call (``Module.compile``),
    register a hook -- leaves ``module`` exactly as it was. In-place writes to the shared tensors
    (loading new weights) are seen by both. A shadow holds the weights alive while it is referenced.
    """
    clone = copy.copy(module)  # new instance; its __dict__ is a shallow copy
    for name, value in vars(module).items():
        if isinstance(value, (dict, set)):
            clone.__dict__[name] = copy.copy(value)  # OrderedDict / dict / set: new container, same items
    clone.__dict__["_modules"] = {name: None if child is None else shadow_module(child)
                                  for name, child in module._modules.items()}
    return clone
