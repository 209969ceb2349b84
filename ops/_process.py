"""Subprocess helpers shared by the ops measurement scripts."""

from __future__ import annotations

import asyncio
import signal


async def stop_process(proc: asyncio.subprocess.Process, grace_s: float) -> None:
    """Stop ``proc`` as an orchestrator would: SIGTERM (the server drains), then SIGKILL if it has
    not exited within ``grace_s`` seconds. Returns at once if it already exited."""
    if proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
