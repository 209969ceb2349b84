"""What every DiT execution backend shares: the names, the error for "cannot run here", and the
record of what was set up (:func:`engine.backends.apply_backend` returns it).

Its own module so that backend implementations (``tensorrt_backend``) import it without importing
the dispatcher in :mod:`engine.backends`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["BACKEND_NAMES", "BackendInfo", "BackendUnavailableError"]

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
