"""cancel_and_wait: the one way streaming stops the tasks it owns."""

from __future__ import annotations

import asyncio
import logging

import pytest

from streaming.tasks import cancel_and_wait


async def test_tasks_are_cancelled_and_awaited_in_order_and_failures_are_logged(caplog) -> None:
    ended: list[str] = []

    async def sleeper(name: str, cleanup_s: float) -> None:
        try:
            await asyncio.sleep(60)
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
    assert ended == ["first", "second"] and first.cancelled() and second.cancelled()
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
