"""Idle super-resolution of buffered segments, and the fixed output size.

With an SR model (``engine.sr_width`` set, and the engine's SR method,
``engine.super_resolve(segment, cancel)``) and ``sr`` on, a session's video is sent at the SR
size (``sr_width x sr_height``, 540p on the real model, twice the base size on the preview
preset) from its first frame to its last:

* :class:`SegmentSuperResolver` re-renders segments that are queued but have not started playing
  through the engine's SR stage while the engine has spare time: it runs as background
  work of the :class:`~streaming.engine_client.EdfJobQueue` (only while no generation is queued;
  a generation request that needs the engine preempts it). A re-render starts only when the
  segment's playout is further away than the measured SR time plus a margin, and is
  cancelled when its segment is :data:`CUTOFF_S` from playing, so super-resolution never
  delays a segment. A finished re-render replaces the segment's frames in the buffer.
* frames that were not super-resolved are resized to the output size as they are pulled
  (:func:`streaming.frames.fit_frame`).

The continuation of a segment is never changed by super-resolution: generation always continues
from the base-size frames and latents.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine.api import CancelledError, Segment
from streaming.clock import MediaClock
from streaming.playout import PlayoutBuffer, QueuedSegment
from streaming.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

CUTOFF_S = 0.1  # a re-render still running this close to its segment's start is cancelled
START_MARGIN_S = 0.2  # a re-render starts only this much ahead of its estimated end
_MAX_FAILURES = 3


@dataclass(frozen=True)
class SuperResolutionResult:
    """What happened to one re-render: ``done``, ``cancelled``, ``late`` (finished after its
    segment started or was dropped) or ``failed``; ``seconds`` of engine time."""

    result: str
    seconds: float
    media_s: float


class SegmentSuperResolver:
    """Re-renders a session's queued segments at the SR size in the engine's spare time
    (module docstring).

    Args:
        super_resolve: ``async (segment, cancel, *, deadline_s, estimate_s) -> Segment``,
            normally :meth:`streaming.engine_client.EngineWorker.super_resolve`.
        buffer: the session's playout buffer (segments carry their engine
            :class:`~engine.api.Segment` in ``source``).
        clock: the session's media clock (nothing is re-rendered before playback has started).
        on_result: called on the event loop after each attempt.
    """

    def __init__(
        self,
        *,
        super_resolve: Callable[..., object],
        buffer: PlayoutBuffer,
        clock: MediaClock,
        on_result: Callable[[SuperResolutionResult], None] | None = None,
    ) -> None:
        self._super_resolve = super_resolve
        self.buffer = buffer
        self.clock = clock
        self.on_result = on_result
        self.seconds_per_media_s: float | None = None  # measured SR cost
        self.counts = {"done": 0, "cancelled": 0, "late": 0, "failed": 0}
        self._task: asyncio.Task[None] | None = None
        self._current: QueuedSegment | None = None
        self._cancel: threading.Event | None = None
        self._failures = 0

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    def estimate_s(self, seg: QueuedSegment) -> float:
        """Expected engine time to super-resolve ``seg``, s: measured, or at first four times its
        generation time (the SR stage works on four times the pixels)."""
        media_s = seg.num_frames / seg.fps
        if self.seconds_per_media_s is not None:
            return self.seconds_per_media_s * media_s
        source = seg.source
        generate_s = float(source.timings_s.get("total", 0.0)) if isinstance(source, Segment) else 0.0
        return max(4.0 * generate_s, 0.05)

    def poke(self) -> None:
        """Start re-rendering the next segment that can be done in time (one at a time)."""
        if self.busy or self._failures >= _MAX_FAILURES or not self.clock.started:
            return
        now_s = time.monotonic()
        for seg in self.buffer.queued():
            if seg.super_resolved or seg.dropped or not isinstance(seg.source, Segment):
                continue
            start_s = self.clock.wall_time_s(seg.start_frame / seg.fps)
            estimate_s = self.estimate_s(seg)
            if start_s - now_s > estimate_s + START_MARGIN_S + CUTOFF_S:
                self._task = asyncio.get_running_loop().create_task(
                    self._run(seg, start_s, estimate_s), name="segment-super-resolution"
                )
                return

    def check(self) -> None:
        """Cancel the re-render in flight if its segment was dropped (interrupt, preemption)."""
        if self._current is not None and self._cancel is not None and self._current.dropped:
            self._cancel.set()

    async def close(self) -> None:
        """Cancel the re-render in flight and wait for its task to end."""
        if self._cancel is not None:
            self._cancel.set()
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self, seg: QueuedSegment, start_s: float, estimate_s: float) -> None:
        cancel = threading.Event()
        self._current, self._cancel = seg, cancel
        loop = asyncio.get_running_loop()
        timer = loop.call_later(max(0.0, start_s - CUTOFF_S - time.monotonic()), cancel.set)
        began_s = time.monotonic()
        media_s = seg.num_frames / seg.fps
        try:
            resolved = await self._super_resolve(seg.source, cancel, deadline_s=start_s, estimate_s=estimate_s)
        except CancelledError:
            if not seg.dropped and media_s > 0:
                # Cut off (or preempted) before it finished: it takes longer than estimated.
                rate = 1.5 * (time.monotonic() - began_s) / media_s
                self.seconds_per_media_s = max(self.seconds_per_media_s or 0.0, rate)
            self._report("cancelled", began_s, media_s)
            return
        except Exception:
            self._failures += 1
            logger.exception("segment super-resolution failed (%d of %d before it stops)", self._failures, _MAX_FAILURES)
            self._report("failed", began_s, media_s)
            return
        finally:
            timer.cancel()
            self._current = self._cancel = None
        elapsed_s = time.monotonic() - began_s
        if media_s > 0:
            rate = elapsed_s / media_s
            previous = self.seconds_per_media_s
            self.seconds_per_media_s = rate if previous is None else max(rate, 0.7 * previous + 0.3 * rate)
        if seg.started or seg.dropped or resolved.num_frames != seg.num_frames:
            self._report("late", began_s, media_s)
            return
        seg.frames = resolved.frames
        seg.super_resolved = True
        seg.source = resolved
        self._report("done", began_s, media_s)

    def _report(self, result: str, began_s: float, media_s: float) -> None:
        self.counts[result] += 1
        if self.on_result is not None:
            self.on_result(SuperResolutionResult(result, time.monotonic() - began_s, media_s))
