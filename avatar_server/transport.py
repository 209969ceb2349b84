"""The connection-level limits of ``avatar-server serve``: uvicorn's HTTP (h11) and WebSocket
(``websockets`` sans-I/O) protocols with the timeouts of :class:`~avatar_server.settings.Limits`.

uvicorn runs the ASGI app of :func:`avatar_server.app.create_app`; these subclasses add what
an ASGI app cannot do itself, because it never sees the socket:

* ``handshake_timeout_s``: a TCP connection that has not sent a complete HTTP request by then
  is closed (uvicorn's own keep-alive timer starts only after a first response).
* ``close_timeout_s``: after the server's close frame, a client that does not answer is
  dropped (``transport.abort()``: a client that does not read would keep ``transport.close()``
  waiting for its buffer forever).
* the ASGI extension :data:`TRANSPORT_EXTENSION` in a WebSocket's scope, whose ``abort``
  drops the connection at once (a client that does not read).

Mounted in another ASGI server, the app runs without these (the host server's own timeouts
apply) and :class:`~avatar_server.connection.WebSocketLink` falls back to a close frame.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from avatar_server.settings import Limits

logger = logging.getLogger(__name__)

TRANSPORT_EXTENSION = "avatar.transport"  # scope["extensions"][...] = {"abort": () -> None}


class _WarningsOnly(logging.Filter):
    """Drops records below WARNING: uvicorn's and websockets' INFO/DEBUG lines of a handshake
    print the request line, whose query string carries the session token."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


class RateLimitFilter(logging.Filter):
    """At most ``burst`` records of one message template, then one per ``interval_s``; the next
    record that passes says how many were suppressed. Malformed requests cost a client nothing
    to send: the log must not grow with them (each template is counted on its own)."""

    def __init__(self, interval_s: float = 10.0, burst: int = 5, clock: Any = None) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.burst = burst
        self._clock = clock or time.monotonic
        self._state: dict[str, list[float]] = {}  # template -> [window start, passed, suppressed]

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)[:200]
        now = self._clock()
        state = self._state.get(key)
        if state is None or now - state[0] >= self.interval_s:
            suppressed = 0 if state is None else int(state[2])
            if len(self._state) > 1000:
                self._state.clear()
            self._state[key] = [now, 1, 0]
            if suppressed:
                record.msg = f"{record.msg} [{suppressed} more like it suppressed]"
            return True
        if state[1] < self.burst:
            state[1] += 1
            return True
        state[2] += 1
        return False


websocket_logger = logging.getLogger(__name__ + ".websocket")
websocket_logger.addFilter(_WarningsOnly())
websocket_logger.addFilter(RateLimitFilter())
http_logger = logging.getLogger(__name__ + ".http")  # uvicorn's "Invalid HTTP request received." etc.
http_logger.addFilter(RateLimitFilter())


class TimedHTTPProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for the first request (``handshake_timeout_s``)."""

    limits: Limits = Limits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logger = http_logger

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._first_request_timer: asyncio.TimerHandle | None = self.loop.call_later(
            self.limits.handshake_timeout_s, self._first_request_expired
        )

    def _first_request_expired(self) -> None:
        self._first_request_timer = None
        if self.transport.get_protocol() is self and not self.transport.is_closing():
            self.transport.close()

    def _cancel_first_request_timer(self) -> None:
        if self._first_request_timer is not None:
            self._first_request_timer.cancel()
            self._first_request_timer = None

    def handle_events(self) -> None:
        super().handle_events()
        if self._first_request_timer is not None and (
            self.conn.their_state is not h11.IDLE or self.transport.get_protocol() is not self
        ):  # a request line and its headers arrived (or the connection became a WebSocket)
            self._cancel_first_request_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_first_request_timer()
        super().connection_lost(exc)


class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's ``websockets`` sans-I/O protocol with ``close_timeout_s`` and an abort hook."""

    limits: Limits = Limits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logger = websocket_logger
        self.conn.logger = websocket_logger
        self.conn.debug = False  # websockets' frame-by-frame DEBUG log
        self.close_timeout = self.limits.close_timeout_s
        self._failed = False  # a protocol error closed the connection; input is discarded
        self._write_blocked = False  # the transport's buffer is over its high-water mark
        self._write_stall_timer: asyncio.TimerHandle | None = None
        self._control_tokens = float(self.limits.control_frame_burst)
        self._control_refilled_s = time.monotonic()
        self._pongs: list[bytes] = []  # pongs websockets queued, not yet sent

    # ------------------------------------------------------------------------- back-pressure
    def pause_writing(self) -> None:
        """The client does not read: stop reading it too (a client that sends pings and never
        reads the pongs would otherwise fill the server's memory), and drop it when the
        buffer stays full for ``send_timeout_s``."""
        super().pause_writing()
        self._write_blocked = True
        if not self.read_paused and self.transport is not None:
            self.transport.pause_reading()
        if self._write_stall_timer is None:
            self._write_stall_timer = self.loop.call_later(self.limits.send_timeout_s, self.abort)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._write_blocked = False
        if self._write_stall_timer is not None:
            self._write_stall_timer.cancel()
            self._write_stall_timer = None
        if not self.read_paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    async def receive(self) -> Any:
        message = await self.queue.get()
        if self.read_paused and self.queue.empty():
            self.read_paused = False
            if not self._write_blocked:
                self.transport.resume_reading()
        return message

    def _write(self, data: bytes) -> None:
        """Write to the transport; drop the connection over ``max_output_buffer_bytes``."""
        self.transport.write(data)
        if self.transport.get_write_buffer_size() > self.limits.max_output_buffer_bytes:
            self.abort()

    def handle_ping(self) -> None:
        """Answer one ping within ``max_control_frames_per_s``. websockets queues a pong for
        every ping of a read at once; they are sent one per ping event, as the budget allows."""
        self._pongs += self.conn.data_to_send()
        if not self._take_control_token():
            self._pongs.clear()
            return
        if self._pongs:
            self._write(self._pongs.pop(0))

    def handle_pong(self, event: Any) -> None:
        if self._take_control_token():
            super().handle_pong(event)

    def _take_control_token(self) -> bool:
        """A token bucket over the client's control frames; empty: the connection is closed
        with 1008 (its message names the limit) and ``False`` is returned."""
        limits = self.limits
        now = time.monotonic()
        self._control_tokens = min(
            float(limits.control_frame_burst),
            self._control_tokens + (now - self._control_refilled_s) * limits.max_control_frames_per_s,
        )
        self._control_refilled_s = now
        if self._control_tokens >= 1.0:
            self._control_tokens -= 1.0
            return True
        if not self._failed:
            self.conn.data_to_send()  # the pongs websockets queued are not sent
            self.conn.fail(1008, f"over max_control_frames_per_s = {limits.max_control_frames_per_s:g}")
            self._failed = True
            self.queue.put_nowait({"type": "websocket.disconnect", "code": 1008, "reason": "control frames"})
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.close_sent = True
            # An abusive client: no closing handshake, nothing more is read; what is buffered
            # (the close frame) gets a moment to go out, then the connection is dropped.
            self.transport.close()
            self.loop.call_later(min(1.0, self.close_timeout), self.transport.abort)
        return False

    def keepalive_timeout(self) -> None:
        """No pong within ``ping_timeout_s``: drop the connection at once (a half-open or
        non-reading peer would keep ``transport.close()`` waiting on its full buffer)."""
        self.pong_timer = None
        self.pending_ping_payload = None
        if self.transport is None or self.transport.is_closing():
            return
        self.queue.put_nowait({"type": "websocket.disconnect", "code": 1006, "reason": "keepalive ping timeout"})
        self.close_sent = True
        self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._write_stall_timer is not None:
            self._write_stall_timer.cancel()
            self._write_stall_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._failed:  # after a protocol error: discard until the client closes
            self.conn.receive_data(data)
            return
        super().data_received(data)

    def handle_parser_exception(self) -> None:
        """A protocol error (a message over ``max_message_bytes``: 1009; bad UTF-8: 1007...):
        send the close frame, end our side of the TCP stream and discard what the client still
        sends until it closes, as RFC 6455 section 7.1.1 has it, so that the client reads the
        close code instead of a reset; dropped after ``close_timeout_s``."""
        self._failed = True
        close = self.conn.close_sent
        code, reason = (1006, "") if close is None else (close.code, close.reason)
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        output = self.conn.data_to_send()
        self.transport.write(b"".join(output))
        if output and output[-1] == b"" and self.transport.can_write_eof():
            self.transport.write_eof()
        self.close_sent = True
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        if self.close_timer is None:
            self.close_timer = self.loop.call_later(self.close_timeout, self.transport.abort)

    def send_receive_event_to_app(self) -> None:
        if self.curr_msg_data_type == "text":
            data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
            try:
                bytes(data).decode()
            except UnicodeDecodeError:
                self.frames = []
                self.conn.fail(1007, "invalid UTF-8 in a text message")
                self.handle_parser_exception()
                return
        super().send_receive_event_to_app()

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:  # the app's task has not run yet: it sees the extension
            scope["extensions"][TRANSPORT_EXTENSION] = {"abort": self.abort}

    def abort(self) -> None:
        """Drop the connection now (no closing handshake, nothing more is written)."""
        if self.transport is not None:
            self.transport.abort()

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message.get("type") == "websocket.close" and self.close_timer is not None:
            # uvicorn's timer calls transport.close(), which waits for a full buffer to drain.
            self.close_timer.cancel()
            self.close_timer = self.loop.call_later(self.close_timeout, self.transport.abort)


def protocol_classes(limits: Limits) -> tuple[type[TimedHTTPProtocol], type[GuardedWebSocketProtocol]]:
    """The HTTP and WebSocket protocol classes for uvicorn's ``http=`` and ``ws=``, bound to
    ``limits`` (uvicorn builds protocols from its config alone)."""
    http_class = type("TimedHTTPProtocol", (TimedHTTPProtocol,), {"limits": limits})
    ws_class = type("GuardedWebSocketProtocol", (GuardedWebSocketProtocol,), {"limits": limits})
    return http_class, ws_class
