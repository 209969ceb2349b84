"""One WebSocket connection and the session attached to it.

:class:`ClientConnection` parses the client's frames, owns the session
(:class:`~streaming.session.SessionRunner`) and its peer connection, and sends the server's
frames. A session whose WebSocket drops abnormally is *parked* for
``session_resume_grace_s`` and a new WebSocket may take it over with ``session.resume``.
:class:`WebSocketLink` is the connection's view of its ASGI WebSocket.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from aiortc import RTCPeerConnection, RTCSessionDescription
from starlette.websockets import WebSocket, WebSocketDisconnect

from avatar_server import protocol, sdp
from avatar_server.auth import Grant
from avatar_server.errors import ClientError
from avatar_server.ice import filter_offer, summarize
from avatar_server.images import ImageError, decode_image
from avatar_server.limits import (
    CLOSE_INTERNAL,
    ERROR_SEND_TIMEOUT_S,
    WATCH_PERIOD_S,
    ConnectionLimits,
    EndConnection,
    GuardedMicrophoneTrack,
    GuardedTrack,
    LimitError,
    drain_track,
)
from avatar_server.live import SessionOutputs
from avatar_server.recording import SessionRecording
from avatar_server.resume import Parking, may_park
from avatar_server.transport import TRANSPORT_EXTENSION
from avatar_server.webrtc import close_peer_connection, ice_server_dicts, make_peer_connection
from engine.api import EngineInputError
from streaming import events
from streaming.playout import PLAYOUT_SAMPLE_RATE_HZ
from streaming.session import SessionInputError, SessionRunner
from streaming.tasks import cancel_and_wait
from streaming.webrtc import StereoTrack

if TYPE_CHECKING:
    from avatar_server.app import AvatarServer

logger = logging.getLogger(__name__)

# The field of codes raised by streaming and images (their exceptions carry no field).
ERROR_FIELDS = {
    "image_invalid": "image",
    "image_too_large": "image",
    "utterance_too_long": "text",
    "utterance_ended": "utterance_id",
    "unknown_utterance": "utterance_id",
    "recording_active": "type",
    "no_recording": "type",
}


class ConnectionState(enum.Enum):
    """The lifecycle of a :class:`ClientConnection` (the allowed moves: :data:`TRANSITIONS`).

    * ``CONNECTED``: a WebSocket, no session;
    * ``STARTING``: ``session.start`` holds a slot while the image is prepared;
    * ``ACTIVE``: the session runs with its WebSocket;
    * ``PARKED``: the session runs without a WebSocket, waiting for ``session.resume``;
    * ``ENDING``: the server ends the session (``end_session``), the connection closes next;
    * ``RETIRED``: this WebSocket was handed to the session it resumed;
    * ``CLOSED``: everything is released.
    """

    CONNECTED = "connected"
    STARTING = "starting"
    ACTIVE = "active"
    PARKED = "parked"
    ENDING = "ending"
    RETIRED = "retired"
    CLOSED = "closed"


_S = ConnectionState
TRANSITIONS: dict[ConnectionState, frozenset[ConnectionState]] = {
    _S.CONNECTED: frozenset({_S.STARTING, _S.RETIRED, _S.ENDING, _S.CLOSED}),
    _S.STARTING: frozenset({_S.ACTIVE, _S.CONNECTED, _S.ENDING, _S.CLOSED}),
    _S.ACTIVE: frozenset({_S.PARKED, _S.ENDING, _S.CLOSED}),
    _S.PARKED: frozenset({_S.ACTIVE, _S.ENDING, _S.CLOSED}),
    _S.ENDING: frozenset({_S.CLOSED}),
    _S.RETIRED: frozenset(),
    _S.CLOSED: frozenset(),
}  # a client that closes with these ends its session (no parking)


class LinkClosed(Exception):
    """The WebSocket is closed (by either side); nothing more can be sent or received."""


class WebSocketLink:
    """One accepted ASGI WebSocket as the connection uses it: receive text/bytes frames, send
    text frames, close with a code, abort.

    Attributes:
        client_close_code: the close code the client sent (1005: none; 1006: the connection
            dropped), ``None`` while open or when the server closed first.
        close_code: the close code of either side once closed, else ``None``.
    """

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self._abort = websocket.scope.get("extensions", {}).get(TRANSPORT_EXTENSION, {}).get("abort")
        self.client_close_code: int | None = None
        self.close_code: int | None = None
        self._send_lock = asyncio.Lock()

    @property
    def closed(self) -> bool:
        return self.close_code is not None

    async def receive(self) -> str | bytes:
        """The next frame's payload.

        Raises:
            LinkClosed: the WebSocket closed (``client_close_code`` says how, when the client did).
        """
        if self.closed:
            raise LinkClosed
        message = await self.websocket.receive()
        if message["type"] == "websocket.disconnect":
            code = int(message.get("code", 1005) or 1005)
            if self.close_code is None:
                self.client_close_code = self.close_code = code
            raise LinkClosed
        text = message.get("text")
        return text if text is not None else message.get("bytes") or b""

    async def send(self, text: str) -> None:
        """Send one text frame (waits while the client's TCP window is full).

        Raises:
            LinkClosed: the WebSocket is closed.
        """
        if self.closed:
            raise LinkClosed
        try:
            await self.websocket.send({"type": "websocket.send", "text": text})
        except (OSError, RuntimeError, WebSocketDisconnect):
            raise LinkClosed from None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame (idempotent); the client's answer is awaited by the transport,
        which drops a client that does not answer within ``close_timeout_s``."""
        if self.closed:
            return
        self.close_code = code
        with contextlib.suppress(OSError, RuntimeError, WebSocketDisconnect):
            await self.websocket.send({"type": "websocket.close", "code": code, "reason": reason})

    def abort(self) -> None:
        """Drop the connection without a closing handshake (a client that does not read).
        Served by another ASGI server (no abort hook): nothing more is sent on it."""
        if self.close_code is None:
            self.close_code = 1006
        if self._abort is not None:
            self._abort()


class ClientConnection:
    """One session and the WebSocket attached to it: the session, its peer connection and its
    outgoing frames.

    A connection without a session is just its WebSocket. Once a session runs, the connection
    outlives its WebSocket if that drops abnormally: it is *parked* (:meth:`_park`) for
    ``session_resume_grace_s``, the session running on and its messages kept (bounded), until
    another connection hands it its WebSocket with ``session.resume`` (:meth:`_attach`) or the
    grace period ends it (``resume_timeout``).

    Composed of one object per job, none of which calls back into the connection but through
    the callbacks it is given: :attr:`limits` (:class:`~avatar_server.limits.ConnectionLimits`:
    checks that return decisions, acted on by :meth:`end`), :attr:`resume`
    (:class:`~avatar_server.resume.Parking`), :attr:`recording`
    (:class:`~avatar_server.recording.SessionRecording`) and :attr:`outputs`
    (:class:`~avatar_server.live.SessionOutputs`). Its lifecycle is :attr:`state`
    (:class:`ConnectionState`, moved along :data:`TRANSITIONS` only).
    """

    def __init__(self, app: AvatarServer, link: WebSocketLink, grant: Grant) -> None:
        self.app = app
        self.link = link
        self.grant = grant
        self.session: SessionRunner | None = None
        self.session_id: str | None = None
        self.pc: RTCPeerConnection | None = None
        self._outbox: asyncio.Queue[protocol.ServerMessage | None] = asyncio.Queue(
            maxsize=app.settings.limits.max_send_queue_messages
        )
        self._sender: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.state = ConnectionState.CONNECTED
        self._holds_slot = False  # a session slot is counted in app.sessions_active
        self.started_s = time.monotonic()  # session.ready (reset at session start)
        self.last_control_s = time.monotonic()  # last client message (idle timeout)
        # Session resume: the current token, and what is kept while no WebSocket is attached.
        self.resume = Parking(
            app.resumable,
            grace_s=app.settings.session_resume_grace_s,
            max_kept=app.settings.limits.max_send_queue_messages // 2,  # the replay fits the send queue
        )
        self._successor: ClientConnection | None = None  # the session this WebSocket resumed
        # The per-connection limits: checks that return decisions, acted on by end().
        self.limits = ConnectionLimits(app.settings.limits, app.admission, grant)
        self._limit_tasks: set[asyncio.Task[Any]] = set()  # end() and the limits' watchdog
        self.outputs = SessionOutputs(app, self.send)  # output.start / output.stop (live.py)
        self.recording = SessionRecording(
            settings=app.settings, metrics=app.metrics, limits=self.limits, send=self.send, send_error=self.send_error
        )
        # the dispatch table: one handler per client message type
        self._handlers: dict[type, Callable[[Any], Awaitable[None]]] = {
            protocol.SessionStart: self._session_start,
            protocol.SessionResume: self._session_resume,
            protocol.WebRTCOffer: self._webrtc_offer,
            protocol.Speak: self._on_speak,
            protocol.SpeakEnd: self._on_speak_end,
            protocol.Interrupt: self._on_interrupt,
            protocol.SessionUpdate: self._on_session_update,
            protocol.RecordStart: self._on_record_start,
            protocol.RecordStop: self._on_record_stop,
            protocol.OutputStart: self._on_output_start,
            protocol.OutputStop: self._on_output_stop,
        }
        if (decision := self.limits.check_open()) is not None:
            self.end(decision)
        self._spawn(self._watch(), "connection-watchdog")

    def _move(self, to: ConnectionState) -> None:
        """Change state along :data:`TRANSITIONS` (the parked-sessions gauge follows).

        Raises:
            RuntimeError: the move is not in the table (a bug, not a client's doing).
        """
        if to not in TRANSITIONS[self.state]:
            raise RuntimeError(f"connection {self.session_id}: {self.state.value} -> {to.value} is not allowed")
        if self.state is ConnectionState.PARKED:
            self.app.metrics.sessions_parked.dec()
        if to is ConnectionState.PARKED:
            self.app.metrics.sessions_parked.inc()
        self.state = to

    @property
    def address(self) -> str:
        """The client address this connection (and its session's counts) are kept for."""
        return self.limits.address

    @property
    def resume_token(self) -> str | None:
        """The session's current resume token (``None``: resume is off, or no session)."""
        return self.resume.token

    @property
    def missed_messages(self) -> tuple[protocol.ServerMessage, ...]:
        """The frames kept for the client that resumes (oldest first)."""
        return self.resume.missed_messages

    @property
    def parked(self) -> bool:
        """The session runs without a WebSocket, waiting for ``session.resume``."""
        return self.state is ConnectionState.PARKED

    @property
    def ending(self) -> bool:
        """The server is ending the session, or everything is released."""
        return self.state in (ConnectionState.ENDING, ConnectionState.RETIRED, ConnectionState.CLOSED)

    async def run(self) -> ClientConnection | None:
        """Read the attached WebSocket until it ends; then close the session, park it (an
        abnormal close of a session that may be resumed) or hand the WebSocket on. Returns the
        resumed session that reads this WebSocket from now on (``session.resume``), or ``None``."""
        link = self.link
        self._sender = asyncio.get_running_loop().create_task(self._send_loop(), name="ws-send")
        try:
            while True:
                raw = await link.receive()
                await self._on_frame(raw)
                if self._successor is not None:
                    break
        except LinkClosed:
            pass
        finally:
            await self._websocket_done(link)
        return self._successor

    async def _websocket_done(self, link: WebSocketLink) -> None:
        if self._successor is not None:  # this WebSocket now drives the resumed session
            await self._retire()
        elif self.link is not link or self.parked:
            pass  # another WebSocket took the session over (its resume parked it first)
        elif self._may_park(link):
            self._park()
        else:
            await self.close()

    @property
    def closed(self) -> bool:
        """:meth:`close` ran (or the WebSocket went to a resumed session): nothing is held."""
        return self.state in (ConnectionState.CLOSED, ConnectionState.RETIRED)

    async def close(self) -> None:
        """Close the peer connection, the session, then this connection's tasks (reverse order)."""
        if self.closed:
            return
        ended_by_server = self.state is ConnectionState.ENDING
        self._move(ConnectionState.CLOSED)
        self.app.connections.discard(self)
        self.resume.forget_token()
        await self._release_limits()
        if self.pc is not None:
            await close_peer_connection(self.pc)
        await self.outputs.close()  # live outputs stop before their session
        if self.session is not None:
            await self.recording.finish(self.session)
            await self.session.close()
            logger.info("session %s closed", self.session_id)
            if not ended_by_server:
                self.app.metrics.sessions_ended.labels("closed").inc()
        if self._holds_slot:
            self._holds_slot = False
            self.app.sessions_active -= 1
            self.app.metrics.sessions_active.dec()
        # the calling task (the grace period or the lifetime watch ending the session) is skipped
        await cancel_and_wait(*reversed([*self._tasks, self._sender, self.resume.grace_task]))
        self._tasks.clear()
        await self.link.close()

    def send(self, message: protocol.ServerMessage) -> None:
        """Queue a frame for the client (kept for a resume while the session is parked)."""
        if isinstance(message, protocol.ErrorMessage):
            self.app.metrics.client_errors.labels(message.code).inc()
        if self.parked:
            self.resume.keep(message)
            return
        try:
            self._outbox.put_nowait(message)
        except asyncio.QueueFull:
            self.end(self.limits.send_queue_full())

    def send_error(
        self,
        code: str,
        message: str,
        *,
        field: str | None = None,
        limit: str | None = None,
        in_reply_to: str | None = None,
    ) -> None:
        """Send an ``error`` frame (``field``, ``limit``, ``in_reply_to`` as the frame's fields)."""
        logger.info("client error %s (session %s)", code, self.session_id)
        self.send(
            protocol.ErrorMessage(code=code, message=message, field=field, limit=limit, in_reply_to=in_reply_to)
        )

    async def _send_loop(self) -> None:
        while True:
            message = await self._outbox.get()
            if message is None:
                return
            try:
                async with asyncio.timeout(self.app.settings.limits.send_timeout_s):
                    await self.link.send(message.model_dump_json())
                if isinstance(message, protocol.SessionReady):  # session.resumed too
                    self.resume.token_delivered = True
            except LinkClosed:
                return
            except TimeoutError:
                self.end(self.limits.send_stalled())
                return

    async def _stats_loop(self) -> None:
        interval_s = self.app.settings.stats_interval_s
        metrics = self.app.metrics
        dropped = 0
        while self.session is not None:
            await asyncio.sleep(interval_s)
            stats = self.session.stats()
            metrics.sample_session(stats)
            metrics.video_frames_dropped.inc(stats["frames_dropped"] - dropped)
            dropped = stats["frames_dropped"]
            self.send(protocol.Stats(state=self.session.state, **stats))

    async def _lifetime_watch(self) -> None:
        """End the session after ``session_idle_timeout_s`` without a client message or
        microphone voice, or after ``session_max_duration_s``."""
        settings = self.app.settings
        idle_s, max_s = settings.session_idle_timeout_s, settings.session_max_duration_s
        period_s = min(1.0, idle_s / 4, max_s / 4)
        started_s = time.monotonic()
        while self.session is not None and self.state in (ConnectionState.ACTIVE, ConnectionState.PARKED):
            await asyncio.sleep(period_s)
            session = self.session
            now_s = time.monotonic()
            if session.voice_active:
                self.last_control_s = now_s
            elif session.last_voice_s is not None:
                self.last_control_s = max(self.last_control_s, session.last_voice_s)
            if now_s - started_s >= max_s:
                reason, message = "max_duration", f"session ended: it ran session_max_duration_s = {max_s:g}"
            elif now_s - self.last_control_s >= idle_s:
                reason = "idle_timeout"
                message = f"session ended: no message and no voice for session_idle_timeout_s = {idle_s:g}"
            else:
                continue
            await self.end_session(reason, message, error=True)
            return

    async def end_session(self, reason: str, message: str, *, close_code: int = 1000, error: bool = False) -> None:
        """End this connection's session from the server side: an ``error`` frame (``error``:
        the code is ``reason``), ``session.ended`` with ``reason``, then a WebSocket close
        whose reason names it. The connection then closes as usual. Idempotent."""
        if self.ending:
            return
        was_parked = self.parked
        self._move(ConnectionState.ENDING)
        await self._finish_session(reason, message, close_code=close_code, error=error, was_parked=was_parked)

    async def _finish_session(
        self, reason: str, message: str, *, close_code: int, error: bool, was_parked: bool
    ) -> None:
        """The rest of :meth:`end_session`, once the state is ``ENDING``."""
        logger.info("session %s ended by the server: %s", self.session_id, reason)
        if self.session is not None:
            self.app.metrics.sessions_ended.labels(reason).inc()
            await self.recording.finish(self.session)  # finish the file before saying goodbye
        if was_parked:  # nobody to tell
            await self.close()
            return
        frames = [protocol.SessionEnded(reason=reason, message=message)]
        if error:
            self.app.metrics.client_errors.labels(reason).inc()
            frames.insert(0, protocol.ErrorMessage(code=reason, message=message))
        sender = self._sender
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                # After what was queued before; the send loop stops at None.
                for frame in frames if self.session is not None else []:
                    await self._outbox.put(frame)
                await self._outbox.put(None)
                if sender is not None:
                    await asyncio.shield(sender)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await self.link.close(close_code, f"{reason}: {message}"[:120])

    # ----------------------------------------------------------------------------- resume
    def _may_park(self, link: WebSocketLink) -> bool:
        """Whether the dropped ``link`` parks the session (:func:`~avatar_server.resume.may_park`)."""
        return self.resume_token is not None and may_park(
            token_delivered=self.resume.token_delivered,
            session_running=self.session is not None,
            active=self.state is ConnectionState.ACTIVE,
            draining=self.app.draining,
            client_close_code=link.client_close_code,
        )

    def _park(self) -> None:
        """Detach the session from its dropped WebSocket: frames not yet sent and those sent
        from now on are kept (:meth:`send`), the WebSocket's count is released, and the grace
        period starts. Synchronous, so that nothing is sent to the old WebSocket after it."""
        self._move(ConnectionState.PARKED)
        if self._sender is not None:
            self._sender.cancel()
            self._tasks.append(self._sender)  # awaited on close
            self._sender = None
        while not self._outbox.empty():
            message = self._outbox.get_nowait()
            if message is not None:
                self.resume.keep(message)
        self.limits.detach()
        self.app.connections.discard(self)
        grace_s = self.resume.grace_s
        self.resume.start_grace(self._resume_grace)
        logger.info(
            "session %s parked: its WebSocket closed (code %s); waiting %g s for session.resume",
            self.session_id,
            self.link.client_close_code,
            grace_s,
        )

    async def _resume_grace(self, grace_s: float) -> None:
        await self.end_session(
            "resume_timeout", f"session ended: no session.resume within session_resume_grace_s = {grace_s:g}"
        )

    async def _retire(self) -> None:
        """This connection handed its WebSocket (and its outbox) to the session it resumed:
        stop its own sender and watchdog; its WebSocket count now belongs to that session."""
        self._move(ConnectionState.RETIRED)
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
        if (grace := self.resume.stop_grace()) is not None:
            self._tasks.append(grace)  # awaited on close
        self.limits.adopt(other.limits)
        self.grant = other.grant
        self.link, self._outbox = other.link, other._outbox
        self._move(ConnectionState.ACTIVE)
        self.app.connections.add(self)
        self.last_control_s = time.monotonic()
        self.resume.rotate_token(self, enabled=not self.closed)
        missed, dropped = self.resume.take_missed()
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

    # ----------------------------------------------------------------------------- frames
    async def _on_frame(self, raw: str | bytes) -> None:
        if self.ending:
            return
        wait_s, notice = self.limits.pace()
        if wait_s > 0:  # over the message rate: read more slowly (TCP pushes back)
            if notice is not None:
                self.send_error(notice.code, str(notice))
            await asyncio.sleep(wait_s)
        self.limits.spend()
        if self.ending:
            return
        self.last_control_s = time.monotonic()
        message = protocol.parse_client_message(raw, self.app.settings.limits)
        if isinstance(message, protocol.ErrorMessage):
            self.send(message)
            logger.info("client error %s (session %s)", message.code, self.session_id)
            return
        try:
            self.limits.check_message(message, None if self.session is None else self.session.utterances)
            await self._handlers[type(message)](message)
        except (ImageError, SessionInputError) as exc:
            code = exc.code
            field = getattr(exc, "field", None) or ERROR_FIELDS.get(code)
            self.send_error(code, str(exc), field=field, limit=getattr(exc, "limit", None), in_reply_to=message.id)
        except EngineInputError as exc:
            self.send_error("engine_input", str(exc), in_reply_to=message.id)
        except Exception:
            logger.exception("handling a %s message failed", message.type)
            self.send_error(
                "internal", f"{message.type}: the server failed to handle this message", in_reply_to=message.id
            )

    # ----------------------------------------------------------------------------- handlers
    async def _on_speak(self, message: protocol.Speak) -> None:
        self._require_session("speak").speak(message.utterance_id, message.text, message.language)

    async def _on_speak_end(self, message: protocol.SpeakEnd) -> None:
        self._require_session("speak.end").speak_end(message.utterance_id)

    async def _on_interrupt(self, message: protocol.Interrupt) -> None:
        self._require_session("interrupt").interrupt()

    async def _on_session_update(self, message: protocol.SessionUpdate) -> None:
        self._require_session("session.update").set_mode(mode=message.mode, barge_in=message.barge_in)

    async def _on_record_start(self, message: protocol.RecordStart) -> None:
        session = self._require_session("record.start")
        assert self.session_id is not None
        await self.recording.start(
            session, self.session_id, still_current=lambda: self.session is session and not self.ending
        )

    async def _on_record_stop(self, message: protocol.RecordStop) -> None:
        await self.recording.stop(self._require_session("record.stop"))

    async def _on_output_start(self, message: protocol.OutputStart) -> None:
        await self.outputs.start(self._require_session("output.start"), message)

    async def _on_output_stop(self, message: protocol.OutputStop) -> None:
        self._require_session("output.stop")
        await self.outputs.stop(message)

    def _require_session(self, what: str) -> SessionRunner:
        if self.session is None:
            raise ClientError("no_session", f"type: {what} needs a session; send session.start first", field="type")
        return self.session

    async def _session_start(self, message: protocol.SessionStart) -> None:
        app = self.app
        if self.session is not None or self._holds_slot:
            raise ClientError("session_exists", "type: this connection already has a session", field="type")
        if app.draining:
            app.metrics.sessions_refused.labels("shutting_down").inc()
            raise ClientError("shutting_down", "the server is shutting down; try another instance")
        if app.sessions_active >= app.settings.max_sessions:
            app.metrics.sessions_refused.labels("capacity").inc()
            raise ClientError(
                "capacity", f"server at capacity: max_sessions = {app.settings.max_sessions}; try again later", limit="max_sessions")
        if (overload := app.engine_overload()) is not None:
            app.metrics.sessions_refused.labels("capacity").inc()
            raise ClientError("capacity", f"server at capacity: {overload}; try again later")
        session_id = self.limits.reserve_session(message)
        app.sessions_active += 1
        app.metrics.sessions_active.inc()
        self._holds_slot = True
        self._move(ConnectionState.STARTING)
        try:
            limits = app.settings.limits
            image = await asyncio.to_thread(
                decode_image, message.image, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels
            )
            identity = await app.worker.prepare_identity(image, message.prompt)
            if self.state is not ConnectionState.STARTING:  # closed or ended meanwhile
                raise ClientError("no_session", "session.start: the connection closed while the session started")
        except BaseException:
            if self._holds_slot:
                self._holds_slot = False
                app.sessions_active -= 1
                app.metrics.sessions_active.dec()
            self.limits.release_session()
            if self.state is ConnectionState.STARTING:
                self._move(ConnectionState.CONNECTED)
            raise
        self.session_id = session_id
        self.session = SessionRunner(
            worker=app.worker,
            identity=identity,
            on_event=self._on_session_event,
            config=dataclasses.replace(app.loop_config, mode=message.mode, barge_in=message.barge_in),
            microphone_factory=app.microphone_factory,
        )
        self.session.start()
        self._move(ConnectionState.ACTIVE)
        self.started_s = time.monotonic()
        app.metrics.sessions_started.inc()
        self.resume.rotate_token(self, enabled=not self.closed)
        logger.info("session %s started (image %dx%d)", self.session_id, image.shape[1], image.shape[0])
        self.send(protocol.SessionReady(resume_token=self.resume_token, **self._session_fields()))
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._stats_loop(), name="stats"))
        self._tasks.append(loop.create_task(self._lifetime_watch(), name="session-lifetime"))

    def _session_fields(self) -> dict[str, Any]:
        """What ``session.ready`` and ``session.resumed`` say about the running session."""
        session, app = self.session, self.app
        assert session is not None
        return {
            "session_id": self.session_id,
            "width": session.width,
            "height": session.height,
            "fps": app.engine.fps,
            "sample_rate": PLAYOUT_SAMPLE_RATE_HZ,
            "engine": app.engine.name,
            "notice": app.engine.notice,
            "ice_servers": ice_server_dicts(app.settings.webrtc.ice_servers),
            "sr": session.super_resolver is not None,
            "mode": session.config.mode,
            "barge_in": session.config.barge_in,
            "resume_grace_s": app.settings.session_resume_grace_s,
        }

    def _filter_candidates(self, offer: str) -> str:
        """The offer without the remote ICE candidates the policy refuses (issue 18), counted by reason."""
        settings = self.app.settings
        try:
            policy = settings.webrtc.ice_policy.for_host_addresses(settings.ice_host_addresses())
            offer, refusals = filter_offer(offer, policy)
        except ValueError as exc:
            raise ClientError("bad_sdp", str(exc), field="sdp") from None
        for reason, count in summarize(refusals).items():
            self.app.metrics.ice_candidates_refused.labels(reason=reason).inc(count)
        if refusals:
            logger.info("session %s: ICE candidates dropped from the offer: %s", self.session_id, summarize(refusals))
        return offer

    async def _webrtc_offer(self, message: protocol.WebRTCOffer) -> None:
        session = self._require_session("webrtc.offer")
        sdp.check_offer(message.sdp, self.app.settings.limits)
        offer_sdp = self._filter_candidates(message.sdp)
        if self.pc is not None:
            if self.pc.connectionState not in ("failed", "closed"):
                raise ClientError("webrtc_exists", "type: this session already has a peer connection", field="type")
            await close_peer_connection(self.pc)
        pc = make_peer_connection(self.app.settings.webrtc.ice_servers)
        self.pc = pc
        session_id = self.session_id

        @pc.on("track")
        def on_track(track) -> None:
            if track.kind == "audio":
                logger.info("session %s: microphone track received", session_id)
                session.attach_microphone(self._wrap_microphone(track))

        @pc.on("connectionstatechange")
        def on_state() -> None:
            logger.info("session %s: peer connection %s", session_id, pc.connectionState)

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            kinds = {t.kind for t in pc.getTransceivers()}
            if "video" not in kinds:
                raise ValueError("the offer has no video media section")
            video = session.video_track(on_frame=self.app.metrics.video_frames_sent.inc)
            video.on_encode = self.app.metrics.video_encode_seconds.observe
            pc.addTrack(self._wrap_track(video))
            if "audio" in kinds:
                pc.addTrack(self._wrap_track(StereoTrack(session.audio_track())))  # no -3 dB upmix in Opus
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:
            self.pc = None
            await close_peer_connection(pc)
            raise ClientError("bad_sdp", f"sdp: not a usable offer ({type(exc).__name__}: {exc})", field="sdp") from None
        self.send(protocol.WebRTCAnswer(sdp=pc.localDescription.sdp))

    # ----------------------------------------------------------------------------- events
    def _on_session_event(self, event: events.SessionEvent) -> None:
        self.app.metrics.observe(event)
        if (decision := self.limits.observe(event)) is not None:
            self.end(decision)
        if isinstance(event, events.StateChanged):
            self.send(protocol.State(state=event.state))
        elif isinstance(event, events.SpeakStarted):
            self.send(protocol.SpeakStarted(utterance_id=event.utterance_id))
        elif isinstance(event, events.SpeakEnded):
            self.send(protocol.SpeakEnded(utterance_id=event.utterance_id, played_ms=event.played_ms))
        elif isinstance(event, events.Interrupted):
            self.send(protocol.Interrupted(utterance_id=event.utterance_id, played_ms=event.played_ms))
        elif isinstance(event, events.SessionError):
            self.send_error(event.code, event.message)

    # ----------------------------------------------------------------------------- limits
    def end(self, decision: EndConnection) -> None:
        """Act on a limit's decision to end the connection: an ``error`` frame whose message
        names the limit (and, when a session runs, ``session.ended`` with the code as its
        reason), then a WebSocket close with the same reason. Further frames are ignored.
        Idempotent. A client that does not read (``slow_client``) is not waited for: its
        connection is dropped."""
        if self.ending:
            return
        code = decision.code
        logger.info("connection from %s ended: %s (session %s)", self.address, code, self.session_id)
        was_parked = self.parked
        session = self.session
        self._move(ConnectionState.ENDING)
        if session is not None and code != "slow_client":
            end = self._finish_session(
                code, decision.message, close_code=decision.close_code, error=True, was_parked=was_parked
            )
            self._spawn(end, "session-end")
        else:
            if session is not None:  # ended by the limit (close() then does not count it again)
                self.app.metrics.sessions_ended.labels(code).inc()
            self._spawn(self._close_websocket(decision), "connection-end")

    async def _close_websocket(self, decision: EndConnection) -> None:
        link = self.link
        code, message = decision.code, decision.message
        self.app.metrics.client_errors.labels(code).inc()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(ERROR_SEND_TIMEOUT_S):
                await link.send(protocol.ErrorMessage(code=code, message=message).model_dump_json())
        reason = f"{code}: {message}".encode()[:120].decode("utf-8", "ignore")
        try:
            async with asyncio.timeout(self.app.settings.limits.close_timeout_s):
                await link.close(decision.close_code, reason)
        except TimeoutError:
            link.abort()  # a client that does not read does not answer a close either

    async def _watch(self) -> None:
        """Every ``WATCH_PERIOD_S`` while attached (not parked: the grace period applies then),
        act on the limits' start and media timeouts."""
        while True:
            await asyncio.sleep(WATCH_PERIOD_S)
            if self.ending or self.parked:
                continue
            pc_state = None if self.pc is None else self.pc.connectionState
            decision = self.limits.check_progress(
                session_running=self.session is not None, pc_state=pc_state, now_s=time.monotonic()
            )
            if decision is not None:
                self.end(decision)

    def _wrap_track(self, track: Any) -> GuardedTrack:
        """An outgoing session track whose crash (or its encoder's) ends the session (``media_failed``)."""

        def expected_stop() -> bool:
            pc = self.pc
            return self.ending or pc is None or pc.connectionState != "connected"

        def on_failure(what: str) -> None:
            self.end(EndConnection("media_failed", f"webrtc: {what}; the session ends", close_code=CLOSE_INTERNAL))

        return GuardedTrack(track, on_failure=on_failure, expected_stop=expected_stop)

    def _wrap_microphone(self, track: Any) -> GuardedMicrophoneTrack:
        """The client's microphone track behind the microphone limits."""
        guarded: GuardedMicrophoneTrack

        def report(code: str, message: str) -> None:
            self.send_error(code, message)
            if code == "microphone_invalid":
                # Nobody reads the remote track any more: drain it so that aiortc's receive
                # queue (unbounded) does not grow until the peer connection closes.
                self._spawn(drain_track(guarded.source), "microphone-drain")

        guarded = GuardedMicrophoneTrack(track, self.app.settings.limits, report)
        return guarded

    async def _release_limits(self) -> None:
        """Give up the limits' counts and stop their tasks (on close, and on retiring)."""
        self.limits.release()
        await cancel_and_wait(*self._limit_tasks)

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        if self.closed:
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._limit_tasks.add(task)
        task.add_done_callback(self._limit_tasks.discard)
