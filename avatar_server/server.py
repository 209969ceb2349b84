"""Entry points kept here while other modules move: :func:`create_engine` (the engine of
``settings.engine``); :func:`build_app`, :func:`create_app` and :class:`AvatarServer` live in
:mod:`avatar_server.app` and are re-exported for existing imports."""

from __future__ import annotations

from avatar_server.app import AvatarServer, build_app, create_app
from avatar_server.settings import Settings
from engine.api import SegmentEngine

__all__ = ["AvatarServer", "EngineUnavailableError", "build_app", "create_app", "create_engine"]


class EngineUnavailableError(RuntimeError):
    """The configured engine preset cannot be built on this installation."""


def create_engine(settings: Settings) -> SegmentEngine:
    """The engine of ``settings`` through the one dispatcher, :func:`engine.factory.create_engine`
    (imported only when needed: ``--help`` and the test pattern need no model code); with
    ``settings.cp > 1`` the same engine on that many context-parallel ranks
    (:class:`engine.context_parallel.ContextParallelEngine`).

    Raises:
        EngineUnavailableError: the preset cannot be built here (message names the preset and why).
    """
    checkpoint_dir = None if settings.checkpoint_dir is None else str(settings.checkpoint_dir)
    try:
        if settings.cp > 1:
            from engine.context_parallel import ContextParallelEngine

            return ContextParallelEngine.from_preset(
                settings.engine, settings.cp, checkpoint_dir=checkpoint_dir, device=settings.device,
                seed=settings.seed, sr=settings.sr, backend=settings.backend,
            )
        from engine.factory import create_engine as build

        return build(
            settings.engine, checkpoint_dir=checkpoint_dir, device=settings.device, seed=settings.seed,
            sr=settings.sr, backend=settings.backend, testpattern_delay_s=settings.testpattern_delay_s,
            compile_cache_dir=settings.compile_cache_dir,
        )
    except ImportError as exc:
        raise EngineUnavailableError(
            f"engine preset {settings.engine!r} needs the model code, which cannot be imported ({exc}); "
            "use --engine testpattern to run without the model"
        ) from exc
    except ValueError as exc:
        raise EngineUnavailableError(f"engine preset {settings.engine!r}: {exc}") from exc
