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
    """The engine of ``settings.engine``; the model pipeline is imported only when needed."""
    if settings.engine == "testpattern":
        from engine.testpattern import TestPatternEngine

        return TestPatternEngine(generate_delay_s=settings.testpattern_delay_s)
    try:
        from engine.pipeline import build_engine
    except ImportError as exc:
        raise EngineUnavailableError(
            f"engine preset {settings.engine!r} needs engine.pipeline, which cannot be imported ({exc}); "
            "use --engine testpattern to run without the model"
        ) from exc
    checkpoint_dir = None if settings.checkpoint_dir is None else str(settings.checkpoint_dir)
    try:
        return build_engine(
            settings.engine, checkpoint_dir=checkpoint_dir, device=settings.device, seed=settings.seed, sr=settings.sr
        )
    except ValueError as exc:
        raise EngineUnavailableError(f"engine preset {settings.engine!r}: {exc}") from exc
