"""One media clock per session: media time (seconds since the stream began) <-> wall time.

Both outgoing tracks pace themselves against the same :class:`MediaClock`, so a video frame
and the audio chunk at the same media time leave at the same wall time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class MediaClock:
    """Maps media time to the monotonic wall clock.

    The clock starts on the first :meth:`start` call (the first track that asks for a frame);
    media time 0 is that instant. Later :meth:`start` calls are no-ops.

    Args:
        monotonic_s: the time source, ``time.monotonic`` unless a test injects a fake one.
    """

    def __init__(self, monotonic_s: Callable[[], float] = time.monotonic) -> None:
        self._monotonic_s = monotonic_s
        self._start_s: float | None = None

    @property
    def started(self) -> bool:
        return self._start_s is not None

    @property
    def start_s(self) -> float | None:
        """Monotonic wall time of media time 0, or ``None`` before :meth:`start`."""
        return self._start_s

    def start(self) -> float:
        """Start the clock if it has not started; returns the monotonic start time in seconds."""
        if self._start_s is None:
            self._start_s = self._monotonic_s()
        return self._start_s

    def now_s(self) -> float:
        """Current monotonic wall time in seconds."""
        return self._monotonic_s()

    def media_time_s(self, wall_s: float | None = None) -> float:
        """Media time at monotonic wall time ``wall_s`` (default: now); 0 before the start."""
        if self._start_s is None:
            return 0.0
        return (self._monotonic_s() if wall_s is None else wall_s) - self._start_s

    def media_time_ms(self, wall_s: float | None = None) -> float:
        return 1000.0 * self.media_time_s(wall_s)

    def wall_time_s(self, media_s: float) -> float:
        """Monotonic wall time at which media time ``media_s`` is due."""
        return self.start() + media_s

    def index_at(self, period_s: float, wall_s: float | None = None) -> int:
        """Index of the media period of length ``period_s`` running at ``wall_s`` (floor)."""
        # A tiny epsilon keeps exact multiples (e.g. 0.04 * 3) from rounding down.
        return max(0, int(self.media_time_s(wall_s) / period_s + 1e-9))

    async def sleep_until_media_s(self, media_s: float) -> None:
        """Sleep until media time ``media_s`` is due (returns at once when it is past)."""
        delay_s = self.wall_time_s(media_s) - self._monotonic_s()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
