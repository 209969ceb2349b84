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


websocket_logger = logging.getLogger(__name__ + ".websocket")
websocket_logger.addFilter(_WarningsOnly())


class TimedHTTPProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for the first request (``handshake_timeout_s``)."""

    limits: Limits = Limits()

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
