"""The one task-cancellation helper of the server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable


async def cancel_and_wait(tasks: Iterable[asyncio.Task | None], *, reverse: bool = False) -> None:
    """Cancel ``tasks`` (``None`` entries and the calling task are skipped), then wait for each
    to finish, swallowing its cancellation or exception (they were logged where they ran).

    Args:
        tasks: the tasks, in the order they were started.
        reverse: cancel the last started first (a runner's teardown order).
    """
    current = asyncio.current_task()
    pending = [task for task in tasks if task is not None and task is not current]
    if reverse:
        pending.reverse()
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
