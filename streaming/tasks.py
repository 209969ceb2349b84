"""The one way ``streaming`` stops the asyncio tasks it owns."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

logger = logging.getLogger(__name__)


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel each task and wait for it to end, one after the other in the order given
    (``None`` entries are skipped).

    A task that ends with an exception other than its cancellation is logged with its name:
    closing goes on. Cancelling the caller while it waits propagates as usual.
    """
    for task in tasks:
        if task is None:
            continue
        task.cancel()
        await asyncio.wait([task])
        if not task.cancelled() and task.exception() is not None:
            logger.error("task %s failed", task.get_name(), exc_info=task.exception())
