"""Session resume: park / attach / replay of a session across WebSockets (docs/PROTOCOL.md,
"Resume"), the part of :class:`~avatar_server.connection.ClientConnection` that
:class:`ResumeMixin` holds.

A session whose WebSocket drops abnormally is *parked* for ``session_resume_grace_s``: its
frames are kept (bounded), its WebSocket's count is released. ``session.resume`` with its
current resume token hands a new WebSocket to it (:meth:`ResumeMixin._attach`), answered with
``session.resumed`` and the kept frames; the grace period's end ends it (``resume_timeout``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from typing import TYPE_CHECKING

from avatar_server import protocol
from avatar_server.errors import ClientError
from avatar_server.limits import LimitError
from streaming.tasks import cancel_and_wait

if TYPE_CHECKING:
    from avatar_server.connection import ClientConnection, WebSocketLink

logger = logging.getLogger(__name__)

NORMAL_CLOSE_CODES = (1000, 1001)  # a client that closes with these ends its session (no parking)


def _states():
    """:class:`~avatar_server.connection.ConnectionState` (imported late: connection imports this module)."""
    from avatar_server.connection import ConnectionState

    return ConnectionState


def token_key(token: str) -> bytes:
    """Resume tokens are looked up by digest, never compared character by character."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class ResumeMixin:
    """Park, resume and replay for :class:`~avatar_server.connection.ClientConnection` (its
    attributes: ``app``, ``link``, ``state``, ``session``, ``limits``, the outbox and tasks)."""

    @property
    def missed_messages(self) -> tuple[protocol.ServerMessage, ...]:
        """The frames kept for the client that resumes (oldest first)."""
        return tuple(self._missed)

    def _may_park(self, link: WebSocketLink) -> bool:
        """A running session whose WebSocket closed abnormally (not 1000/1001 from the
        client, not ended by the server) is parked while resume is on, once its resume token
        was sent (a client that resets before ``session.ready`` reached it holds no slot)."""
        return (
            self.resume_token is not None
            and self._token_delivered  # a client that never got its token cannot resume
            and self.session is not None
            and self.state is _states().ACTIVE
            and not self.app.draining
            and link.client_close_code not in NORMAL_CLOSE_CODES
        )

    def _park(self) -> None:
        """Detach the session from its dropped WebSocket: frames not yet sent and those sent
        from now on are kept (:meth:`send`), the WebSocket's count is released, and the grace
        period starts. Synchronous, so that nothing is sent to the old WebSocket after it."""
        self._move(_states().PARKED)
        if self._sender is not None:
            self._sender.cancel()
            self._tasks.append(self._sender)  # awaited on close
            self._sender = None
        while not self._outbox.empty():
            message = self._outbox.get_nowait()
            if message is not None:
                self._keep_missed(message)
        self.limits.detach()
        self.app.connections.discard(self)
        grace_s = self.app.settings.session_resume_grace_s
        self._grace_task = asyncio.get_running_loop().create_task(self._resume_grace(grace_s), name="resume-grace")
        logger.info(
            "session %s parked: its WebSocket closed (code %s); waiting %g s for session.resume",
            self.session_id,
            self.link.client_close_code,
            grace_s,
        )

    async def _resume_grace(self, grace_s: float) -> None:
        await asyncio.sleep(grace_s)
        await self.end_session(
            "resume_timeout", f"session ended: no session.resume within session_resume_grace_s = {grace_s:g}"
        )

    def _keep_missed(self, message: protocol.ServerMessage) -> None:
        """Keep a frame for the client that resumes; ``stats`` are not kept. Over the bound
        (half of ``max_send_queue_messages``, so that the replay fits the send queue) the
        oldest frame is dropped and counted."""
        if isinstance(message, protocol.Stats):
            return
        if len(self._missed) >= max(1, self.app.settings.limits.max_send_queue_messages // 2):
            self._missed.popleft()
            self._missed_dropped += 1
        self._missed.append(message)

    def _rotate_resume_token(self) -> None:
        """A fresh resume token (the old one stops working); none while resume is off."""
        if self._resume_key is not None:
            self.app.resumable.pop(self._resume_key, None)
            self._resume_key = self.resume_token = None
        if self.app.settings.session_resume_grace_s > 0 and not self.closed:
            self.resume_token = secrets.token_urlsafe(32)
            self._resume_key = token_key(self.resume_token)
            self.app.resumable[self._resume_key] = self

    async def _retire(self) -> None:
        """This connection handed its WebSocket (and its outbox) to the session it resumed:
        stop its own sender and watchdog; its WebSocket count now belongs to that session."""
        self._move(_states().RETIRED)
        self.app.connections.discard(self)
        await cancel_and_wait(self._sender)
        await self._release_limits()

    async def _session_resume(self, message: protocol.SessionResume) -> None:
        """``session.resume``: hand this WebSocket to the session whose resume token it names
        (parked, or still attached to a WebSocket the server has not yet seen drop, which is
        then dropped). This connection's read loop stops; the session's takes over.

        Raises:
            SessionInputError: ``resume_failed`` (unknown or expired token, a token of this
                connection's grant for another session, shutting down), ``session_exists``
                (this connection already has a session).
            LimitError: ``too_many_sessions`` (this address or token is at its limit).
        """
        app = self.app
        if self.session is not None or self._holds_slot:
            raise ClientError("session_exists", "type: this connection already has a session", field="type")
        if app.draining:
            app.metrics.session_resumes.labels("failed").inc()
            raise ClientError("resume_failed", "resume_token: the server is shutting down", field="resume_token")
        target = app.resume_target(message.resume_token)
        grant = self.grant
        if (
            target is None
            or target is self
            or target.ending
            or target.session is None
            or (grant.session_id is not None and grant.session_id != target.session_id)
        ):
            app.metrics.session_resumes.labels("failed").inc()
            raise ClientError("resume_failed", "resume_token: unknown or expired", field="resume_token")
        try:
            target.limits.check_adopt(self.limits)
        except LimitError:
            app.metrics.session_resumes.labels("failed").inc()
            raise
        # From here on nothing awaits until the session is attached (no resume or end in between).
        if not target.parked:  # its old WebSocket is still open (the server has not seen it drop)
            old_link = target.link
            target._park()
            old_link.abort()
        if self._sender is not None:  # stops at its next await; what it has not taken stays queued
            self._sender.cancel()
        target._attach(self)
        self._successor = target
        app.metrics.session_resumes.labels("resumed").inc()

    def _attach(self, other: ClientConnection) -> None:
        """Take over ``other``'s WebSocket, its outbox and its limits' WebSocket side; answer
        ``session.resumed`` with a new token, then replay the frames kept while parked."""
        assert self.parked and self.session is not None
        if self._grace_task is not None:
            self._grace_task.cancel()
            self._tasks.append(self._grace_task)  # awaited on close
            self._grace_task = None
        self.limits.adopt(other.limits)
        self.grant = other.grant
        self.link, self._outbox = other.link, other._outbox
        self._move(_states().ACTIVE)
        self.app.connections.add(self)
        self.last_control_s = time.monotonic()
        self._rotate_resume_token()
        missed, dropped = list(self._missed), self._missed_dropped
        self._missed.clear()
        self._missed_dropped = 0
        logger.info(
            "session %s resumed (%d messages replayed, %d dropped)", self.session_id, len(missed), dropped
        )
        assert self.resume_token is not None
        self.send(
            protocol.SessionResumed(
                resume_token=self.resume_token,
                peer_connection=None if self.pc is None else self.pc.connectionState,
                recording_id=self.recording.recording_id,
                missed_messages=len(missed),
                dropped_messages=dropped,
                **self._session_fields(),
            )
        )
        for frame in missed:
            self.send(frame)
