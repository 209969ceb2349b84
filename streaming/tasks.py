"""The one way the server stops the asyncio tasks it owns (streaming and avatar_server alike)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

logger = logging.getLogger(__name__)


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel each task, then wait for every one of them to end.

    ``None`` entries and the calling task itself are skipped (a task may close the object that
    owns it). All are cancelled first, in the order given (pass them reversed for a runner's
    last-started-first teardown), then awaited together, so one slow task does not delay the
    cancellation of the next. A task that ends with an exception other than its cancellation is
    logged with its name and closing goes on. Cancelling the caller while it waits propagates as
    usual; the tasks it cancelled still end on their own.
    """
    current = asyncio.current_task()
    pending = [task for task in tasks if task is not None and task is not current]
    for task in pending:
        task.cancel()
    if not pending:
        return
    await asyncio.wait(pending)
    for task in pending:
        if not task.cancelled() and task.exception() is not None:
            logger.error("task %s failed", task.get_name(), exc_info=task.exception())
