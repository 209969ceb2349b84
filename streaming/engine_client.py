"""The engine client shared by all sessions: one engine, one worker thread, an EDF job queue.

:class:`EngineWorker` owns the engine and its single worker thread (one per engine, shared by
all sessions): the engine's GPU work never runs on the event loop.

:class:`EdfJobQueue` (earliest deadline first) replaces a FIFO executor in front of the engine. Every job carries a
*deadline*: the monotonic wall time by which its result is needed. For a segment that is the
moment the segment must start playing (its media start time on the session's clock mapped to
wall time), so a session whose buffer is about to run dry is served before one that has
seconds of media queued, whatever order the requests came in (Liu & Layland 1973: EDF is
optimal for one processor whenever any order meets every deadline).

*Background* jobs (the idle super-resolution of buffered segments) run only while no
foreground job is queued. A foreground job that arrives while a background job runs cancels
it unless the background job is expected to end in time for the new job to still meet its
deadline (``estimate_s`` of both, plus :data:`PREEMPT_MARGIN_S`); a cancelled background job
ends with :class:`~engine.api.CancelledError` from the engine at its next step.

A foreground ``generate`` can stream: :meth:`EngineWorker.generate` takes an ``on_chunk``
callback that gets every :class:`~engine.api.SegmentChunk` on the event loop (the engine calls
it in the worker thread; the worker hands it over with ``loop.call_soon_threadsafe``, in order and
before the call's result). Background jobs (super-resolution) never stream.

Jobs are blocking callables ``fn(*args)`` run in the worker thread; an ``asyncio`` caller
awaits :meth:`EdfJobQueue.run`. Cancelling the awaiting task sets the job's cancel event, and
a job that has not started yet is skipped (its future raises
:class:`~engine.api.CancelledError`, as a job cancelled while it runs does).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import heapq
import inspect
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.api import CancelledError, Identity, Segment, SegmentChunk, SegmentEngine, SegmentRequest

PREEMPT_MARGIN_S = 0.1


@dataclass(order=True)
class _Job:
    deadline_s: float
    seq: int
    fn: Callable[..., Any] = field(compare=False)
    args: tuple[Any, ...] = field(compare=False)
    cancel: threading.Event = field(compare=False)
    future: concurrent.futures.Future[Any] = field(compare=False)
    background: bool = field(default=False, compare=False)
    estimate_s: float = field(default=0.0, compare=False)
    started_s: float | None = field(default=None, compare=False)


def _skip(job: _Job) -> None:
    """End a job that never ran as the engine ends a cancelled one."""
    if not job.future.done():
        job.future.set_exception(CancelledError("cancelled before it started"))


class EdfJobQueue:
    """Earliest-deadline-first queue feeding one worker thread (see the module docstring).

    Args:
        name: thread name suffix (``engine-<name>``).
        monotonic_s: the clock deadlines refer to (``time.monotonic``).
    """

    def __init__(self, name: str = "engine", monotonic_s: Callable[[], float] = time.monotonic) -> None:
        self._monotonic_s = monotonic_s
        self._cond = threading.Condition()
        self._foreground: list[_Job] = []
        self._background: list[_Job] = []
        self._seq = itertools.count()
        self._running: _Job | None = None
        self._closed = False
        # (start, end) of finished foreground jobs, oldest first, for foreground_utilization;
        # bounded (segments last >= 0.1 s, so 4,096 cover minutes) even if nobody asks
        self._busy: collections.deque[tuple[float, float]] = collections.deque(maxlen=4096)
        self.jobs_done = 0
        self.background_preempted = 0
        self._thread = threading.Thread(target=self._work, name=f"engine-{name}", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------------- state
    @property
    def queue_length(self) -> int:
        """Foreground jobs waiting (not counting the one running)."""
        with self._cond:
            return sum(1 for job in self._foreground if not job.cancel.is_set())

    @property
    def background_length(self) -> int:
        with self._cond:
            return sum(1 for job in self._background if not job.cancel.is_set())

    @property
    def alive(self) -> bool:
        """The worker thread runs (it only ends on :meth:`close`)."""
        return self._thread.is_alive() and not self._closed

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._running is not None

    @property
    def running_for_s(self) -> float:
        """Seconds the job running now has run (on the queue's clock); 0.0 when idle.

        A value far above any job's expected duration means the engine is stalled (a hung
        kernel, a deadlocked driver): every session waits behind it, and since a Python
        thread cannot be killed the server can only report it (``/healthz``) and be restarted.
        """
        with self._cond:
            running = self._running
            if running is None or running.started_s is None:
                return 0.0
            return max(0.0, self._monotonic_s() - running.started_s)

    def foreground_utilization(self, window_s: float) -> float:
        """Fraction of the last ``window_s`` seconds the worker spent on foreground jobs
        (segments, identities; the running one included), in [0, 1]. Background work (idle
        super-resolution) is left out: it only uses time that foreground work leaves, and is
        preempted for it. A queue younger than ``window_s`` counts the time before it
        existed as idle, so a fresh server reads low until it has a window of evidence.

        Raises:
            ValueError: ``window_s`` is not positive.
        """
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        now = self._monotonic_s()
        low = now - window_s
        with self._cond:
            while self._busy and self._busy[0][1] <= low:
                self._busy.popleft()
            busy = sum(end - max(start, low) for start, end in self._busy if end > low)
            running = self._running
            if running is not None and not running.background and running.started_s is not None:
                busy += now - max(running.started_s, low)
        return min(1.0, busy / window_s)

    # ----------------------------------------------------------------------------- submit
    def submit(
        self,
        fn: Callable[..., Any],
        *args: Any,
        deadline_s: float,
        cancel: threading.Event | None = None,
        background: bool = False,
        estimate_s: float = 0.0,
    ) -> tuple[concurrent.futures.Future[Any], threading.Event]:
        """Queue ``fn(*args)``; returns its future and its cancel event (thread-safe)."""
        job = _Job(
            deadline_s=deadline_s,
            seq=next(self._seq),
            fn=fn,
            args=args,
            cancel=cancel if cancel is not None else threading.Event(),
            future=concurrent.futures.Future(),
            background=background,
            estimate_s=estimate_s,
        )
        with self._cond:
            if self._closed:
                raise RuntimeError("job queue is closed")
            heapq.heappush(self._background if background else self._foreground, job)
            if not background:
                self._maybe_preempt(job)
            self._cond.notify()
        return job.future, job.cancel

    async def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        deadline_s: float,
        cancel: threading.Event | None = None,
        background: bool = False,
        estimate_s: float = 0.0,
    ) -> Any:
        """Submit and await the result; cancelling the awaiting task cancels the job."""
        future, event = self.submit(
            fn, *args, deadline_s=deadline_s, cancel=cancel, background=background, estimate_s=estimate_s
        )
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            event.set()
            with self._cond:
                self._cond.notify()
            raise

    def _maybe_preempt(self, job: _Job) -> None:
        """Cancel a running background job that would make ``job`` miss its deadline, now or,
        should it overrun its estimate, at the latest moment ``job`` can still start."""
        running = self._running
        if running is None or not running.background or running.cancel.is_set():
            return
        now = self._monotonic_s()
        assert running.started_s is not None
        remaining_s = max(0.0, running.estimate_s - (now - running.started_s))
        latest_start_s = job.deadline_s - job.estimate_s - PREEMPT_MARGIN_S
        if running.estimate_s <= 0 or now + remaining_s > latest_start_s:
            running.cancel.set()
            self.background_preempted += 1
            return
        timer = threading.Timer(latest_start_s - now, self._preempt_overrun, args=(running, job))
        timer.daemon = True
        timer.start()

    def _preempt_overrun(self, running: _Job, job: _Job) -> None:
        with self._cond:
            if self._running is running and not running.cancel.is_set() and not job.future.done():
                if job.started_s is None and not job.cancel.is_set():
                    running.cancel.set()
                    self.background_preempted += 1

    # ----------------------------------------------------------------------------- worker
    def _next_job(self) -> _Job | None:
        """The next job to run, waiting for one; ``None`` once closed."""
        with self._cond:
            while True:
                for queue in (self._foreground, self._background):
                    while queue and queue[0].cancel.is_set():
                        _skip(heapq.heappop(queue))
                    if queue:
                        job = heapq.heappop(queue)
                        if job.future.set_running_or_notify_cancel():
                            job.started_s = self._monotonic_s()
                            self._running = job
                            return job
                if self._closed:
                    return None
                self._cond.wait()

    def _work(self) -> None:
        while (job := self._next_job()) is not None:
            try:
                result = job.fn(*job.args)
            except BaseException as exc:  # handed to the awaiting caller
                job.future.set_exception(exc)
            else:
                job.future.set_result(result)
            finally:
                with self._cond:
                    if not job.background and job.started_s is not None:
                        self._busy.append((job.started_s, self._monotonic_s()))
                    self._running = None
                    self.jobs_done += 1

    def close(self, wait_s: float = 0.0) -> None:
        """Cancel queued jobs and the running one; the thread ends after it returns (waited
        for up to ``wait_s``: a job still running in a daemon thread at interpreter exit can
        abort the process, e.g. inside PyTorch)."""
        with self._cond:
            self._closed = True
            for queue in (self._foreground, self._background):
                for job in queue:
                    job.cancel.set()
                    _skip(job)
                queue.clear()
            if self._running is not None:
                self._running.cancel.set()
            self._cond.notify_all()
        if wait_s > 0 and threading.current_thread() is not self._thread:
            self._thread.join(wait_s)


def _on_loop(loop: asyncio.AbstractEventLoop, callback: Callable[[SegmentChunk], None]) -> Callable[[SegmentChunk], None]:
    """``callback`` wrapped to be called from the worker thread: it runs on ``loop``, in call order
    (``call_soon_threadsafe`` is FIFO, and the job's result reaches the loop the same way, after
    them). A loop already closed drops the chunk (its session is gone)."""

    def relay(chunk: SegmentChunk) -> None:
        try:
            loop.call_soon_threadsafe(callback, chunk)
        except RuntimeError:  # the loop is closed
            pass

    return relay


class EngineWorker:
    """An engine and the one worker thread that runs it, shared by every session.

    Requests from all sessions meet in one earliest-deadline-first queue (:attr:`jobs`, an
    :class:`EdfJobQueue`): ``deadline_s`` is the monotonic time by which the result must be
    there (for a segment: when it must start playing; default now). Super-resolution
    (:meth:`super_resolve`) runs only while no generation is queued.

    Args:
        engine: any :class:`~engine.api.SegmentEngine`.

    Attributes:
        streams: the engine's ``generate`` takes ``on_chunk`` (engines without it, e.g. one whose DiT
            runs in other processes, deliver whole segments only).
    """

    def __init__(self, engine: SegmentEngine) -> None:
        self.engine = engine
        self.jobs = EdfJobQueue(engine.name)
        try:
            self.streams = "on_chunk" in inspect.signature(engine.generate).parameters
        except (TypeError, ValueError):  # no signature to read: assume the old one
            self.streams = False

    @property
    def can_super_resolve(self) -> bool:
        """The engine has a super-resolution model (its ``can_super_resolve``; engines without SR
        have no such attribute)."""
        return bool(getattr(self.engine, "can_super_resolve", False))

    async def prepare_identity(self, image: np.ndarray, appearance: str) -> Identity:
        """Run ``engine.prepare_identity`` (uint8 ``[H, W, 3]`` image) in the worker thread, first in line."""
        return await self.jobs.run(self.engine.prepare_identity, image, appearance, deadline_s=time.monotonic())

    async def generate(
        self,
        request: SegmentRequest,
        cancel: threading.Event,
        *,
        deadline_s: float | None = None,
        estimate_s: float = 0.0,
        on_chunk: Callable[[SegmentChunk], None] | None = None,
    ) -> Segment:
        """Run ``engine.generate`` in the worker thread; cancelling the awaiting task sets ``cancel``.

        ``on_chunk`` (optional) is called *on the event loop* with each
        :class:`~engine.api.SegmentChunk` of the segment, in order, all of them before this returns;
        it is not called when the engine cannot stream (:attr:`streams` false). Chunks of a call
        that is then cancelled may still arrive (a few, never the whole segment); the caller decides
        whether to keep them. It must not block.

        Raises:
            engine.api.CancelledError: ``cancel`` was set (before or while it ran).
        """
        args: tuple[Any, ...] = (request, cancel)
        if on_chunk is not None and self.streams:
            args = (request, cancel, _on_loop(asyncio.get_running_loop(), on_chunk))
        return await self.jobs.run(
            self.engine.generate,
            *args,
            deadline_s=time.monotonic() if deadline_s is None else deadline_s,
            cancel=cancel,
            estimate_s=estimate_s,
        )

    async def super_resolve(
        self, segment: Segment, cancel: threading.Event, *, deadline_s: float, estimate_s: float
    ) -> Segment:
        """Re-render ``segment`` at the engine's SR size as background work (only while no
        generation is queued; a generation that needs the engine preempts it).

        Raises:
            engine.api.CancelledError: cancelled or preempted.
        """
        return await self.jobs.run(
            self.engine.super_resolve, segment, cancel, deadline_s=deadline_s, cancel=cancel, background=True, estimate_s=estimate_s
        )

    def close(self, wait_s: float = 0.0) -> None:
        """Cancel all engine work; ``wait_s``: wait that long for the job running now to stop."""
        self.jobs.close(wait_s)
