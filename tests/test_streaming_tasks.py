"""cancel_and_wait: the one way the server stops the tasks it owns."""

from __future__ import annotations

import asyncio
import logging

import pytest

from streaming.tasks import cancel_and_wait


async def test_tasks_are_cancelled_in_order_awaited_together_and_failures_are_logged(caplog) -> None:
    ended: list[str] = []
    cancelled: list[str] = []

    async def sleeper(name: str, cleanup_s: float) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(name)
            raise
        finally:
            await asyncio.sleep(cleanup_s)  # a task that takes a while to stop is waited for
            ended.append(name)

    async def failing() -> None:
        raise RuntimeError("boom")

    first = asyncio.create_task(sleeper("first", 0.05))
    second = asyncio.create_task(sleeper("second", 0.0))
    broken = asyncio.create_task(failing(), name="broken-task")
    await asyncio.sleep(0.01)
    with caplog.at_level(logging.ERROR, logger="streaming.tasks"):
        await cancel_and_wait(first, None, broken, second)
    # Both were cancelled in the order given; the quick one did not wait behind the slow one.
    assert cancelled == ["first", "second"] and ended == ["second", "first"]
    assert first.cancelled() and second.cancelled()
    assert [r.getMessage() for r in caplog.records] == ["task broken-task failed"]


async def test_cancelling_the_caller_is_not_swallowed() -> None:
    release = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await release.wait()  # takes its time to stop
            raise

    task = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0.01)
    closer = asyncio.create_task(cancel_and_wait(task))
    await asyncio.sleep(0.05)
    assert not closer.done()  # waiting for the task to stop
    closer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closer
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_the_calling_task_is_skipped() -> None:
    """A task may close the object that owns it: cancel_and_wait does not cancel its caller."""
    other = asyncio.create_task(asyncio.sleep(60))

    async def closer() -> str:
        await cancel_and_wait(asyncio.current_task(), other)
        return "closed"

    assert await asyncio.wait_for(closer(), 5) == "closed"
    assert other.cancelled()
