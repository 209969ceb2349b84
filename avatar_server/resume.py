"""Session resume: the resume side of a session across WebSockets (docs/PROTOCOL.md,
"Resume"): :class:`Parking` holds a session's resume token, the frames kept while it is
parked and its grace period; :func:`may_park` says when a dropped WebSocket parks it.

A session whose WebSocket drops abnormally is *parked* for ``session_resume_grace_s``: its
frames are kept (bounded), its WebSocket's count is released. ``session.resume`` with its
current resume token hands a new WebSocket to it (``ClientConnection._attach``), answered with
``session.resumed`` and the kept frames; the grace period's end ends it (``resume_timeout``)."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from avatar_server import protocol

logger = logging.getLogger(__name__)

NORMAL_CLOSE_CODES = (1000, 1001)  # a client that closes with these ends its session (no parking)


def may_park(*, token_delivered: bool, session_running: bool, active: bool, draining: bool, client_close_code: int | None) -> bool:
    """A running session whose WebSocket closed abnormally (not 1000/1001 from the client,
    not ended by the server: ``active``) is parked while resume is on and the server is not
    draining, once its resume token was sent (a client that resets before ``session.ready``
    reached it cannot resume)."""
    return (
        token_delivered
        and session_running
        and active
        and not draining
        and client_close_code not in NORMAL_CLOSE_CODES
    )


def token_key(token: str) -> bytes:
    """Resume tokens are looked up by digest, never compared character by character."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class Parking:
    """The resume side of one session: its current resume token (registered, by digest, in
    the server's table of resumable sessions), the frames kept for the client while the
    session is parked, and the grace period's task. Composed by
    :class:`~avatar_server.connection.ClientConnection`, which parks and attaches the session.

    Args:
        registry: the server's ``sha256(resume token) -> connection`` table (shared).
        grace_s: ``session_resume_grace_s`` (0: resume is off, no token is issued).
        max_kept: the most frames kept while parked (older ones are dropped and counted).
    """

    def __init__(self, registry: dict[bytes, Any], *, grace_s: float, max_kept: int) -> None:
        self._registry = registry
        self.grace_s = grace_s
        self._max_kept = max(1, max_kept)
        self.token: str | None = None  # the current resume token
        self._key: bytes | None = None
        self._missed: collections.deque[protocol.ServerMessage] = collections.deque()
        self._dropped = 0
        self.token_delivered = False  # a session.ready/resumed (with its resume token) was sent
        self._grace_task: asyncio.Task[None] | None = None

    @property
    def missed_messages(self) -> tuple[protocol.ServerMessage, ...]:
        """The frames kept for the client that resumes (oldest first)."""
        return tuple(self._missed)

    def rotate_token(self, owner: Any, *, enabled: bool) -> None:
        """A fresh resume token for ``owner`` (the old one stops working); none while resume
        is off or ``enabled`` is false (the connection is closed)."""
        self.forget_token()
        if self.grace_s > 0 and enabled:
            self.token = secrets.token_urlsafe(32)
            self._key = token_key(self.token)
            self._registry[self._key] = owner

    def forget_token(self) -> None:
        """The current token stops working (idempotent)."""
        if self._key is not None:
            self._registry.pop(self._key, None)
        self._key = self.token = None

    def keep(self, message: protocol.ServerMessage) -> None:
        """Keep a frame for the client that resumes; ``stats`` are not kept. Over ``max_kept``
        (half of ``max_send_queue_messages``, so that the replay fits the send queue) the
        oldest frame is dropped and counted."""
        if isinstance(message, protocol.Stats):
            return
        if len(self._missed) >= self._max_kept:
            self._missed.popleft()
            self._dropped += 1
        self._missed.append(message)

    def take_missed(self) -> tuple[list[protocol.ServerMessage], int]:
        """The kept frames (oldest first) and how many were dropped; both reset."""
        missed, dropped = list(self._missed), self._dropped
        self._missed.clear()
        self._dropped = 0
        return missed, dropped

    def start_grace(self, on_expiry: Callable[[float], Awaitable[None]]) -> None:
        """Start the grace period: ``on_expiry(grace_s)`` runs once it passes."""

        async def grace() -> None:
            await asyncio.sleep(self.grace_s)
            await on_expiry(self.grace_s)

        self._grace_task = asyncio.get_running_loop().create_task(grace(), name="resume-grace")

    @property
    def grace_task(self) -> asyncio.Task[None] | None:
        """The running grace period's task, if any."""
        return self._grace_task

    def stop_grace(self) -> asyncio.Task[None] | None:
        """Cancel the grace period; returns its task (to await on close) or ``None``."""
        task, self._grace_task = self._grace_task, None
        if task is not None:
            task.cancel()
        return task
