"""EdfJobQueue: earliest deadline first on one thread, background work only when idle,
preemption of background work that would make a deadline slip, cancellation; and the
job queue in front of sessions sharing one engine."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from engine.api import CancelledError, SegmentKind, SegmentRequest
from engine.testpattern import TestPatternEngine
from streaming.engine_client import EdfJobQueue, EngineWorker
from streaming.session import LoopConfig, SessionRunner
from tests.test_streaming_session import wait_until


def blocking_job(log: list, name: str, seconds: float = 0.0, cancel: threading.Event | None = None) -> str:
    """Sleeps ``seconds`` (cut short by ``cancel``, then raising as an engine does)."""
    log.append(("start", name, threading.current_thread().name))
    if cancel is not None:
        if cancel.wait(seconds):
            log.append(("cancelled", name))
            raise CancelledError(name)
    else:
        time.sleep(seconds)
    log.append(("end", name))
    return name


async def test_jobs_run_in_deadline_order_on_one_thread() -> None:
    jobs = EdfJobQueue("test")
    log: list = []
    gate = threading.Event()
    try:
        now = time.monotonic()
        first = jobs.submit(gate.wait, deadline_s=now)[0]  # holds the thread while the rest queue
        await wait_until(lambda: jobs.busy)
        futures = [
            jobs.submit(blocking_job, log, name, deadline_s=now + offset)[0]
            for name, offset in (("late", 3.0), ("soon", 1.0), ("middle", 2.0), ("soonest", 0.5))
        ]
        assert jobs.queue_length == 4
        gate.set()
        results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        await asyncio.wrap_future(first)
    finally:
        jobs.close()
    assert results == ["late", "soon", "middle", "soonest"]
    starts = [entry for entry in log if entry[0] == "start"]
    assert [name for _, name, _ in starts] == ["soonest", "soon", "middle", "late"]
    assert {thread for _, _, thread in starts} == {"engine-test"}
    assert threading.current_thread().name != "engine-test"


async def test_background_runs_only_when_no_foreground_job_waits() -> None:
    jobs = EdfJobQueue("test")
    log: list = []
    gate = threading.Event()
    try:
        now = time.monotonic()
        jobs.submit(gate.wait, deadline_s=now)
        # background has the earliest deadline of all, yet waits for the foreground queue
        bg = jobs.submit(blocking_job, log, "upgrade", deadline_s=now - 10, background=True)[0]
        fg = [jobs.submit(blocking_job, log, f"gen{i}", deadline_s=now + i)[0] for i in range(3)]
        gate.set()
        await asyncio.gather(*(asyncio.wrap_future(f) for f in [bg, *fg]))
    finally:
        jobs.close()
    assert [name for kind, name, *_ in log if kind == "start"] == ["gen0", "gen1", "gen2", "upgrade"]


async def test_foreground_preempts_background_that_would_make_it_late() -> None:
    jobs = EdfJobQueue("test")
    log: list = []
    try:
        cancel = threading.Event()
        bg, _ = jobs.submit(
            blocking_job, log, "upgrade", 5.0, cancel, deadline_s=time.monotonic() + 10, cancel=cancel,
            background=True, estimate_s=5.0,
        )
        await wait_until(lambda: bool(log))
        started = time.monotonic()
        # needed in 0.5 s; the upgrade would hold the engine for ~5 s more: it is cancelled
        result = await jobs.run(blocking_job, log, "urgent", deadline_s=time.monotonic() + 0.5, estimate_s=0.1)
        waited = time.monotonic() - started
        with pytest.raises(CancelledError):
            await asyncio.wrap_future(bg)
        assert result == "urgent" and waited < 2.0
        assert jobs.background_preempted == 1

        # an upgrade that ends well before the new job's deadline is left to finish
        cancel2 = threading.Event()
        log.clear()
        bg2, _ = jobs.submit(
            blocking_job, log, "short-upgrade", 0.2, cancel2, deadline_s=time.monotonic() + 10, cancel=cancel2,
            background=True, estimate_s=0.2,
        )
        await wait_until(lambda: bool(log))
        await jobs.run(blocking_job, log, "relaxed", deadline_s=time.monotonic() + 5.0, estimate_s=0.1)
        assert await asyncio.wrap_future(bg2) == "short-upgrade"
        assert jobs.background_preempted == 1
        assert [e[:2] for e in log if e[0] != "start"] == [("end", "short-upgrade"), ("end", "relaxed")]
    finally:
        jobs.close()


async def test_cancelling_the_awaiting_task_skips_or_cancels_the_job() -> None:
    jobs = EdfJobQueue("test")
    log: list = []
    gate = threading.Event()
    try:
        jobs.submit(gate.wait, deadline_s=time.monotonic())
        waiting = asyncio.ensure_future(jobs.run(blocking_job, log, "never", deadline_s=time.monotonic()))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        # a job whose cancel event is set before it starts ends with the engine's CancelledError
        event = threading.Event()
        future, _ = jobs.submit(blocking_job, log, "skipped", deadline_s=time.monotonic(), cancel=event)
        event.set()
        gate.set()
        with pytest.raises(CancelledError):
            await asyncio.wrap_future(future)
        assert await jobs.run(blocking_job, log, "after", deadline_s=time.monotonic()) == "after"
    finally:
        jobs.close()
    assert [name for kind, name, *_ in log if kind == "start"] == ["after"]


async def test_close_cancels_queued_jobs_and_the_thread_ends() -> None:
    jobs = EdfJobQueue("test")
    log: list = []
    cancel = threading.Event()
    running, _ = jobs.submit(blocking_job, log, "long", 30.0, cancel, deadline_s=0, cancel=cancel)
    queued, _ = jobs.submit(blocking_job, log, "queued", deadline_s=1)
    await wait_until(lambda: bool(log))
    jobs.close()
    for future in (running, queued):
        with pytest.raises(CancelledError):
            await asyncio.wait_for(asyncio.wrap_future(future), 2.0)
    await asyncio.sleep(0.05)
    assert not jobs.alive
    with pytest.raises(RuntimeError):
        jobs.submit(blocking_job, log, "late", deadline_s=0)


class OrderEngine(TestPatternEngine):
    """Test pattern that records which session each generate call served."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.served: list[str] = []

    def generate(self, request, cancel=None):
        self.served.append(request.identity.appearance)
        return super().generate(request, cancel)


async def test_session_with_the_earliest_playout_deadline_is_served_first() -> None:
    """Two sessions on one engine: the one whose buffer runs dry first gets the engine first,
    whatever order the requests arrived in."""
    engine = OrderEngine(generate_delay_s=0.05)
    worker = EngineWorker(engine)
    image = np.zeros((64, 64, 3), np.uint8)
    relaxed_id = await worker.prepare_identity(image, "relaxed")
    urgent_id = await worker.prepare_identity(image, "urgent")
    cfg = LoopConfig(playout_target_ms=1000.0, idle_segment_seconds=1.0)
    relaxed = SessionRunner(worker=worker, identity=relaxed_id, on_event=lambda e: None, config=cfg)
    urgent = SessionRunner(worker=worker, identity=urgent_id, on_event=lambda e: None, config=cfg)
    gate = threading.Event()
    try:
        worker.jobs.submit(gate.wait, deadline_s=0)  # hold the engine while both ask
        for runner, media_s in ((relaxed, 10.0), (urgent, 0.5)):
            runner.clock.start()
            # the relaxed session has 10 s of media queued; the urgent one 0.5 s
            runner.buffer.append(
                np.zeros((round(25 * media_s), 128, 224, 3), np.uint8), np.zeros(round(48_000 * media_s), np.float32),
                48_000, kind=SegmentKind.IDLE,
            )
        relaxed.config = LoopConfig(playout_target_ms=20_000.0, idle_segment_seconds=1.0)
        relaxed.start()  # asks first
        await asyncio.sleep(0.05)
        urgent.start()
        await asyncio.sleep(0.05)
        assert worker.jobs.queue_length == 2
        gate.set()
        await wait_until(lambda: len(engine.served) >= 2)
    finally:
        await relaxed.close()
        await urgent.close()
        worker.close()
    assert engine.served[:2] == ["urgent", "relaxed"]


async def test_background_job_that_overruns_its_estimate_is_cancelled_in_time() -> None:
    jobs = EdfJobQueue("test")
    log: list = []
    try:
        cancel = threading.Event()
        bg, _ = jobs.submit(
            blocking_job, log, "upgrade", 10.0, cancel, deadline_s=time.monotonic() + 20, cancel=cancel,
            background=True, estimate_s=0.2,  # claims 0.2 s, would take 10 s
        )
        await wait_until(lambda: bool(log))
        started = time.monotonic()
        # fits behind the upgrade's estimate, so it waits; at its latest start the upgrade is cut
        result = await jobs.run(blocking_job, log, "gen", deadline_s=started + 0.8, estimate_s=0.2)
        waited = time.monotonic() - started
        with pytest.raises(CancelledError):
            await asyncio.wrap_future(bg)
    finally:
        jobs.close()
    assert result == "gen" and 0.3 < waited < 1.5, waited
    assert jobs.background_preempted == 1


async def test_running_for_s_measures_the_running_job_on_the_schedulers_clock() -> None:
    clock = [100.0]
    jobs = EdfJobQueue("test", monotonic_s=lambda: clock[0])
    gate = threading.Event()
    try:
        assert jobs.running_for_s == 0.0
        future = jobs.submit(gate.wait, deadline_s=clock[0])[0]
        await wait_until(lambda: jobs.busy)
        assert jobs.running_for_s == 0.0
        clock[0] += 42.5
        assert jobs.running_for_s == 42.5
        gate.set()
        await asyncio.wrap_future(future)
        await wait_until(lambda: not jobs.busy)
        assert jobs.running_for_s == 0.0
    finally:
        jobs.close()


async def test_foreground_utilization_counts_finished_and_running_foreground_jobs_only() -> None:
    clock = [1000.0]
    jobs = EdfJobQueue("test", monotonic_s=lambda: clock[0])

    async def run_for(seconds: float, *, background: bool = False) -> None:
        gate = threading.Event()
        future = jobs.submit(gate.wait, deadline_s=clock[0], background=background)[0]
        await wait_until(lambda: jobs.busy)
        clock[0] += seconds
        gate.set()
        await asyncio.wrap_future(future)
        await wait_until(lambda: not jobs.busy)

    try:
        with pytest.raises(ValueError, match="window_s"):
            jobs.foreground_utilization(0)
        clock[0] += 10.0
        await run_for(3.0)                    # busy 1010-1013
        clock[0] += 2.0                       # idle 1013-1015
        await run_for(5.0, background=True)   # 1015-1020: background, not counted
        assert jobs.foreground_utilization(10.0) == pytest.approx(3.0 / 10.0)  # window 1010-1020
        assert jobs.foreground_utilization(100.0) == pytest.approx(3.0 / 100.0)  # before: idle
        assert jobs.foreground_utilization(8.0) == pytest.approx(1.0 / 8.0)  # 1012-1020: 1 s busy
        # a running foreground job counts up to now
        gate = threading.Event()
        future = jobs.submit(gate.wait, deadline_s=clock[0])[0]
        await wait_until(lambda: jobs.busy)
        clock[0] += 4.0                       # running 1020-1024
        assert jobs.foreground_utilization(10.0) == pytest.approx(4.0 / 10.0)  # 1014-1024: the running 4 s
        gate.set()
        await asyncio.wrap_future(future)
        await wait_until(lambda: not jobs.busy)  # the worker has recorded the job's end
        clock[0] += 30.0
        assert jobs.foreground_utilization(10.0) == 0.0  # everything left the window
    finally:
        jobs.close()


async def test_generate_streams_chunks_on_the_loop_before_the_result() -> None:
    """The engine calls ``on_chunk`` in the worker thread; the session's callback runs on the event
    loop, in order, every chunk before ``generate`` returns (issue 17)."""
    engine = TestPatternEngine(chunk_frames=4, chunk_delay_s=0.01)
    worker = EngineWorker(engine)
    loop_thread = threading.current_thread().name
    seen: list[tuple[int, str]] = []
    try:
        identity = await worker.prepare_identity(np.zeros((64, 64, 3), np.uint8), "")
        request = SegmentRequest(identity=identity, seconds=1.0)
        chunks: list = []

        def on_chunk(chunk) -> None:
            seen.append((chunk.start_frame, threading.current_thread().name))
            chunks.append(chunk)

        segment = await worker.generate(request, threading.Event(), on_chunk=on_chunk)
    finally:
        worker.close()
    assert worker.streams
    assert seen == [(start, loop_thread) for start in range(0, 25, 4)]
    assert np.array_equal(np.concatenate([c.frames for c in chunks]), segment.frames)


async def test_engine_without_on_chunk_delivers_whole_segments() -> None:
    """An engine whose ``generate`` has no ``on_chunk`` (e.g. context parallel) is still served."""
    engine = OrderEngine()
    worker = EngineWorker(engine)
    called: list = []
    try:
        identity = await worker.prepare_identity(np.zeros((64, 64, 3), np.uint8), "x")
        segment = await worker.generate(SegmentRequest(identity=identity, seconds=0.5), threading.Event(),
                                        on_chunk=called.append)
    finally:
        worker.close()
    assert not worker.streams and called == [] and segment.num_frames == 13 and engine.served == ["x"]
