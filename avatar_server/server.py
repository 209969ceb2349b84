"""The asyncio server: one port for the page, health, metrics (plain HTTP) and ``/ws``.

``/ws`` carries the JSON control protocol (:mod:`avatar_server.protocol`); media flows over
one WebRTC peer connection per session. Plain HTTP requests are answered from the
``process_request`` hook of the ``websockets`` server, so no second web framework is needed.

Layers: :class:`AvatarServer` (entry point, HTTP routes, capacity) -> :class:`ClientConnection`
(one session and the WebSocket attached to it: parses frames, owns the session and its peer
connection; a session whose WebSocket drops abnormally is *parked* for
``session_resume_grace_s`` and a new WebSocket may take it over with ``session.resume``) ->
:class:`~streaming.session.SessionRunner` (segment loop) -> :class:`~streaming.session.EngineWorker`
(the engine's one thread).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import http
import logging
import mimetypes
import secrets
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import websockets
from aiortc import RTCPeerConnection, RTCSessionDescription
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from avatar_server import protocol
from avatar_server.auth import Authenticator, startup_problem
from avatar_server.ice import filter_offer, summarize
from avatar_server.images import ImageError, decode_image, set_pixel_limit
from avatar_server.limits import (
    AdmissionRegistry,
    ConnectionGuard,
    LimitError,
    recording_stop_message,
    recording_stop_reason,
)
from avatar_server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from avatar_server.metrics import Metrics
from avatar_server.settings import Settings
from avatar_server.tls import serve_options
from avatar_server.webrtc import (
    close_peer_connection,
    ice_server_dicts,
    make_peer_connection,
    use_host_addresses,
)
from engine.api import EngineInputError, SegmentEngine, SegmentKind, SegmentRequest
from streaming import events
from streaming.microphone import Microphone, load_vad_model
from streaming.playout import PLAYOUT_SAMPLE_RATE_HZ
from streaming.session import EngineWorker, LoopConfig, SessionInputError, SessionRunner

logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent.parent / "clients" / "web"
NORMAL_CLOSE_CODES = (1000, 1001)  # a client that closes with these ends its session (no parking)
STATIC_FILES = ("index.html", "app.js", "style.css")


def _response(status: http.HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("Connection", "close"),
        ]
    )
    return Response(status.value, status.phrase, headers, body)


def _text(status: http.HTTPStatus, text: str) -> Response:
    return _response(status, text.encode(), "text/plain; charset=utf-8")


class AvatarServer:
    """The server application. Build with :func:`build_app`; ``await start()``; ``await close()``.

    Args:
        settings: all settings.
        engine: the engine shared by every session (tests inject ``TestPatternEngine``).
        metrics: metrics holder (default: a fresh registry).
        microphone_factory: builds the microphone consumer of a session (tests may inject).
    """

    def __init__(
        self,
        settings: Settings,
        engine: SegmentEngine,
        *,
        metrics: Metrics | None = None,
        microphone_factory: Any = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.worker = EngineWorker(engine)
        self.metrics = metrics or Metrics()
        self.microphone_factory = microphone_factory or functools.partial(
            Microphone,
            threshold=settings.vad.threshold,
            hangover_ms=settings.vad.hangover_ms,
            preroll_ms=settings.vad.preroll_ms,
            history_s=settings.limits.max_microphone_buffer_s,
        )
        self.loop_config = LoopConfig(
            segment_seconds=settings.segment_seconds,
            idle_segment_seconds=settings.idle_segment_seconds,
            min_segment_seconds=settings.min_segment_seconds,
            playout_target_ms=settings.playout_target_ms,
            words_per_second=settings.words_per_second,
            max_utterance_chars=settings.limits.max_utterance_chars,
            seed=settings.seed,
            upgrade=settings.sr,
        )
        if settings.sr and not self.worker.can_upgrade:
            logger.warning("sr is on but engine %s has no super-resolution model: sr is ignored", engine.name)
        self.metrics.generation_queue_length.set_function(lambda: self.worker.scheduler.queue_length)
        self.metrics.engine_job_running_seconds.set_function(lambda: self.worker.scheduler.running_for_s)
        self.metrics.engine_utilization.set_function(
            lambda: self.worker.scheduler.foreground_utilization(settings.engine_utilization_window_s)
        )
        self._stall_logged = False
        self.draining = False
        self._drain_cancelled = asyncio.Event()
        self.sessions_active = 0
        self.connections: set[ClientConnection] = set()  # with a WebSocket attached
        self.resumable: dict[bytes, ClientConnection] = {}  # sha256(resume token) -> live or parked session
        self._server: Server | None = None
        self._warm = False
        self._not_ready_reason = "engine warming up"
        self._warmup_task: asyncio.Task[None] | None = None
        use_host_addresses(settings.ice_host_addresses())
        set_pixel_limit(settings.limits.max_image_pixels)
        self.auth = Authenticator(settings, static_files=STATIC_FILES, metrics=self.metrics)
        self.admission = AdmissionRegistry(settings.limits, address_of=self.auth.client_address)

    # ----------------------------------------------------------------------------- lifecycle
    async def start(self, *, warm_up: bool = True) -> None:
        """Bind the port and start serving; warm the engine up in the background."""
        problem = startup_problem(self.settings)
        if problem is not None:
            raise ValueError(problem)
        self._server = await serve(
            self._handle,
            self.settings.host,
            self.settings.port,
            process_request=self._process_request,
            max_size=self.settings.limits.max_message_bytes,
            compression=None,
            **serve_options(self.settings, self.auth),
        )
        if warm_up:
            self._warmup_task = asyncio.get_running_loop().create_task(self._warm_up(), name="warm-up")
        else:
            self._warm = True
        logger.info("serving on %s (engine %s)", self.url, self.engine.name)

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    async def close(self) -> None:
        """Close every connection (and its session), then the listening socket and the worker."""
        if self._warmup_task is not None:
            self._warmup_task.cancel()
            try:
                await self._warmup_task
            except (asyncio.CancelledError, Exception):
                pass
        for conn in self._all_sessions():
            await conn.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await asyncio.to_thread(self.worker.close, 10.0)  # the engine thread stops before exit

    async def drain(self, timeout_s: float) -> None:
        """Graceful shutdown, step 1: accept no new connections or sessions, give running
        sessions up to ``timeout_s`` to finish what they are saying, then end every session
        with ``session.ended`` (reason ``shutdown``) and close its WebSocket (1001, going away).
        :meth:`cancel_drain` (a second signal) skips the wait."""
        self.draining = True
        if self._server is not None:
            self._server.close(close_connections=False)  # stop listening; keep the connections
        deadline_s = time.monotonic() + timeout_s
        while not self._drain_cancelled.is_set() and time.monotonic() < deadline_s:
            if not any(conn.session is not None and conn.session.speech_pending for conn in self._all_sessions()):
                break
            try:
                await asyncio.wait_for(self._drain_cancelled.wait(), 0.1)
            except TimeoutError:
                pass
        await asyncio.gather(
            *(
                conn.end_session("shutdown", "the server is shutting down", close_code=1001)
                for conn in self._all_sessions()
            ),
            return_exceptions=True,
        )

    def cancel_drain(self) -> None:
        self._drain_cancelled.set()

    def _all_sessions(self) -> list[ClientConnection]:
        """Every connection with a WebSocket and every parked session (each once)."""
        return list(dict.fromkeys([*self.connections, *self.resumable.values()]))

    @property
    def sessions_parked(self) -> int:
        """Sessions waiting for ``session.resume`` (they hold their slot)."""
        return sum(1 for conn in self.resumable.values() if conn.parked)

    def resume_target(self, token: str) -> ClientConnection | None:
        """The live or parked session whose current resume token is ``token``, or ``None``."""
        return self.resumable.get(_token_key(token))

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        host = self.settings.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        if ":" in shown:
            shown = f"[{shown}]"
        port = self.port if self._server is not None else self.settings.port
        scheme = "https" if self.settings.tls_cert is not None else "http"
        return f"{scheme}://{shown}:{port}/"

    async def _warm_up(self) -> None:
        started = time.perf_counter()
        try:
            image = np.full((self.engine.height, self.engine.width, 3), 128, dtype=np.uint8)
            identity = await self.worker.prepare_identity(image, "")
            request = SegmentRequest(
                identity=identity, kind=SegmentKind.IDLE, seconds=min(1.0, self.engine.max_segment_seconds)
            )
            await self.worker.generate(request, threading.Event())
            # Import torch and silero-vad now rather than on the first microphone.
            await asyncio.to_thread(load_vad_model)
        except Exception as exc:
            logger.exception("engine warm-up failed")
            self._not_ready_reason = f"engine warm-up failed: {type(exc).__name__}"
            return
        self._warm = True
        logger.info("engine warmed up in %.2f s", time.perf_counter() - started)

    def engine_stall(self) -> str | None:
        """Why the engine counts as stalled, or ``None``: after warm-up, a job has run longer than
        ``engine_stall_s`` (logged once per stall). Warm-up itself (compile, autotune) is exempt."""
        running_s = self.worker.scheduler.running_for_s
        if not self._warm or running_s <= self.settings.engine_stall_s:
            self._stall_logged = False
            return None
        reason = f"engine stalled: a job has run {running_s:.1f} s (engine_stall_s = {self.settings.engine_stall_s:g})"
        if not self._stall_logged:
            self._stall_logged = True
            logger.error("%s; every session waits behind it", reason)
        return reason

    def engine_overload(self) -> str | None:
        """Why one more session would overload the engine, or ``None``.

        With ``n >= 1`` sessions keeping the engine busy a fraction ``u`` of the last
        ``engine_utilization_window_s``, one more needs about ``u (n + 1) / n`` (sessions of one
        server cost alike: each keeps its own playout buffer filled in real time); above
        ``max_engine_utilization`` every session would start to underrun, so the new one is
        refused instead. No sessions: always admitted.
        """
        n = self.sessions_active
        if n < 1:
            return None
        settings = self.settings
        busy = self.worker.scheduler.foreground_utilization(settings.engine_utilization_window_s)
        projected = busy * (n + 1) / n
        if projected <= settings.max_engine_utilization:
            return None
        return (
            f"engine busy {busy:.0%} with {n} session{'s' if n > 1 else ''}; one more would need about "
            f"{projected:.0%} (max_engine_utilization = {settings.max_engine_utilization:g})"
        )

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining: the server is shutting down"
        if not self._warm:
            return False, self._not_ready_reason
        if (stall := self.engine_stall()) is not None:
            return False, stall
        if self.sessions_active >= self.settings.max_sessions:
            return False, f"at capacity: {self.sessions_active} of max_sessions = {self.settings.max_sessions}"
        if (overload := self.engine_overload()) is not None:
            return False, f"at capacity: {overload}"
        return True, "ready"

    # ----------------------------------------------------------------------------- HTTP
    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        early = self.auth.process_request(connection, request) or self.admission.process_request(connection, request)
        if early is not None:
            return early
        path = urlsplit(request.path).path
        if path == "/ws":
            return None  # continue with the WebSocket handshake
        if path == "/healthz":
            if not self.worker.scheduler.alive:
                return _text(http.HTTPStatus.SERVICE_UNAVAILABLE, "engine worker stopped\n")
            if (stall := self.engine_stall()) is not None:
                return _text(http.HTTPStatus.SERVICE_UNAVAILABLE, stall + "\n")
            return _text(http.HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            ok, reason = self.readiness()
            return _text(http.HTTPStatus.OK if ok else http.HTTPStatus.SERVICE_UNAVAILABLE, reason + "\n")
        if path == "/metrics":
            return _response(http.HTTPStatus.OK, self.metrics.render(), METRICS_CONTENT_TYPE)
        name = "index.html" if path == "/" else path.lstrip("/")
        if name in STATIC_FILES:
            file = WEB_DIR / name
            if file.is_file():
                content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
                if content_type.startswith("text/") or content_type.endswith("javascript"):
                    content_type += "; charset=utf-8"
                return _response(http.HTTPStatus.OK, file.read_bytes(), content_type)
        return _text(http.HTTPStatus.NOT_FOUND, f"not found: {path}\n")

    # ----------------------------------------------------------------------------- WebSocket
    async def _handle(self, ws: ServerConnection) -> None:
        conn: ClientConnection | None = ClientConnection(self, ws)
        self.connections.add(conn)
        self.metrics.websocket_connections_active.inc()
        try:
            while conn is not None:  # after a session.resume the resumed session reads this WebSocket
                conn = await conn.run()
        finally:
            self.metrics.websocket_connections_active.dec()


def _token_key(token: str) -> bytes:
    """Resume tokens are looked up by digest, never compared character by character."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class ClientConnection:
    """One session and the WebSocket attached to it: the session, its peer connection and its
    outgoing frames.

    A connection without a session is just its WebSocket. Once a session runs, the connection
    outlives its WebSocket if that drops abnormally: it is *parked* (:meth:`_park`) for
    ``session_resume_grace_s``, the session running on and its messages kept (bounded), until
    another connection hands it its WebSocket with ``session.resume`` (:meth:`_attach`) or the
    grace period ends it (``resume_timeout``).
    """

    def __init__(self, app: AvatarServer, ws: ServerConnection) -> None:
        self.app = app
        self.ws = ws
        self.session: SessionRunner | None = None
        self.session_id: str | None = None
        self.pc: RTCPeerConnection | None = None
        self._outbox: asyncio.Queue[protocol.ServerMessage | None] = asyncio.Queue(
            maxsize=app.settings.limits.max_send_queue_messages
        )
        self._sender: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._holds_slot = False
        self._closed = False
        self._ended = False  # end_session ran
        self.last_control_s = time.monotonic()  # last client message (idle timeout)
        self.recording_id: str | None = None
        self.recordings = 0
        self._recording_end_tasks: set[asyncio.Task[None]] = set()  # recordings ended by a limit
        # Session resume: the current token, and what is kept while no WebSocket is attached.
        self._resume_key: bytes | None = None
        self.resume_token: str | None = None
        self.parked = False
        self._missed: collections.deque[protocol.ServerMessage] = collections.deque()
        self._missed_dropped = 0
        self._grace_task: asyncio.Task[None] | None = None
        self._successor: ClientConnection | None = None  # the session this WebSocket resumed
        self.guard = ConnectionGuard(self)

    async def run(self) -> ClientConnection | None:
        """Read the attached WebSocket until it ends; then close the session, park it (an
        abnormal close of a session that may be resumed) or hand the WebSocket on. Returns the
        resumed session that reads this WebSocket from now on (``session.resume``), or ``None``."""
        ws = self.ws
        self._sender = asyncio.get_running_loop().create_task(self._send_loop(), name="ws-send")
        try:
            async for raw in ws:
                await self._on_frame(raw)
                if self._successor is not None:
                    break
        except websockets.ConnectionClosed:
            pass
        finally:
            await self._websocket_done(ws)
        return self._successor

    async def _websocket_done(self, ws: ServerConnection) -> None:
        if self._successor is not None:  # this WebSocket now drives the resumed session
            await self._retire()
        elif self.ws is not ws or self.parked:
            pass  # another WebSocket took the session over (its resume parked it first)
        elif self._may_park(ws):
            self._park()
        else:
            await self.close()

    def _may_park(self, ws: ServerConnection) -> bool:
        """A running session whose WebSocket closed abnormally (not 1000/1001 from the
        client, not ended by the server) is parked while resume is on."""
        close = ws.protocol.close_rcvd
        return (
            self.resume_token is not None
            and self.session is not None
            and not (self._ended or self._closed or self.guard._ending or self.app.draining)
            and (close is None or close.code not in NORMAL_CLOSE_CODES)
        )

    def _park(self) -> None:
        """Detach the session from its dropped WebSocket: frames not yet sent and those sent
        from now on are kept (:meth:`send`), the WebSocket's count is released, and the grace
        period starts. Synchronous, so that nothing is sent to the old WebSocket after it."""
        self.parked = True
        if self._sender is not None:
            self._sender.cancel()
            self._tasks.append(self._sender)  # awaited on close
            self._sender = None
        while not self._outbox.empty():
            message = self._outbox.get_nowait()
            if message is not None:
                self._keep_missed(message)
        self.guard.detach()
        self.app.connections.discard(self)
        self.app.metrics.sessions_parked.inc()
        grace_s = self.app.settings.session_resume_grace_s
        self._grace_task = asyncio.get_running_loop().create_task(self._resume_grace(grace_s), name="resume-grace")
        close = self.ws.protocol.close_rcvd
        logger.info(
            "session %s parked: its WebSocket closed (%s); waiting %g s for session.resume",
            self.session_id,
            "no close frame" if close is None else f"code {close.code}",
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
        if self.app.settings.session_resume_grace_s > 0 and not self._closed:
            self.resume_token = secrets.token_urlsafe(32)
            self._resume_key = _token_key(self.resume_token)
            self.app.resumable[self._resume_key] = self

    async def _retire(self) -> None:
        """This connection handed its WebSocket (and its outbox) to the session it resumed:
        stop its own sender and watchdog; its WebSocket count now belongs to that session."""
        self._closed = True
        self.app.connections.discard(self)
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sender
        await self.guard.close()

    async def close(self) -> None:
        """Close the peer connection, the session, then this connection's tasks (reverse order)."""
        if self._closed:
            return
        self._closed = True
        self.app.connections.discard(self)
        if self._resume_key is not None:
            self.app.resumable.pop(self._resume_key, None)
            self._resume_key = None
        if self.parked:
            self.parked = False
            self.app.metrics.sessions_parked.dec()
        await self.guard.close()
        if self.pc is not None:
            await close_peer_connection(self.pc)
        if self.session is not None:
            if self.session.recorder is not None:
                result = await self.session.stop_recording()
                self._recording_stopped(result, "session_ended")
            await self.session.close()
            logger.info("session %s closed", self.session_id)
            if not self._ended:
                self.app.metrics.sessions_ended.labels("closed").inc()
        if self._holds_slot:
            self._holds_slot = False
            self.app.sessions_active -= 1
            self.app.metrics.sessions_active.dec()
        current = asyncio.current_task()
        tasks = [*self._tasks, *(t for t in (self._sender, self._grace_task) if t is not None)]
        for task in reversed(tasks):
            if task is current:  # e.g. the grace period or the lifetime watch ending the session
                continue
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()
        await self.ws.close()

    def send(self, message: protocol.ServerMessage) -> None:
        """Queue a frame for the client (kept for a resume while the session is parked)."""
        if isinstance(message, protocol.ErrorMessage):
            self.app.metrics.client_errors.labels(message.code).inc()
        if self.parked:
            self._keep_missed(message)
            return
        try:
            self._outbox.put_nowait(message)
        except asyncio.QueueFull:
            self.guard.send_queue_full()

    def send_error(self, code: str, message: str, field: str | None = None) -> None:
        logger.info("client error %s (session %s)", code, self.session_id)
        self.send(protocol.ErrorMessage(code=code, message=message, field=field))

    async def _send_loop(self) -> None:
        while True:
            message = await self._outbox.get()
            if message is None:
                return
            try:
                async with asyncio.timeout(self.app.settings.limits.send_timeout_s):
                    await self.ws.send(message.model_dump_json())
            except websockets.ConnectionClosed:
                return
            except TimeoutError:
                self.guard.send_stalled()
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
        while self.session is not None and not self._ended:
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
        if self._ended or self._closed:
            return
        self._ended = True
        logger.info("session %s ended by the server: %s", self.session_id, reason)
        if self.session is not None:
            self.app.metrics.sessions_ended.labels(reason).inc()
            if self.session.recorder is not None:  # finish the file before saying goodbye
                self._recording_stopped(await self.session.stop_recording(), "session_ended")
        if self.parked:  # nobody to tell
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
                await self.ws.close(close_code, f"{reason}: {message}"[:120])

    # ----------------------------------------------------------------------------- recording
    async def _record_start(self, session: SessionRunner) -> None:
        """``record.start``: checked against the recording limits (per session, server-wide,
        free disk), then started with the length/size/disk bounds of ``settings.limits``."""
        settings = self.app.settings
        self.guard.reserve_recording()
        try:
            await self.guard.check_recording_disk(settings.recordings_dir)
            if self.session is not session or self._closed:
                raise SessionInputError("no_session", "type: record.start needs a session; send session.start first")
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            recording_id = f"{self.session_id}-{self.recordings + 1}"
            path = settings.recordings_dir / f"{stamp}-{recording_id}.mp4"
            recorder = session.start_recording(path)
        except BaseException:
            self.guard.release_recording(started=False)
            raise
        recorder.set_limits(self.guard.recording_limits(), on_end=functools.partial(self._recording_ended, recorder))
        self.recordings += 1
        self.recording_id = recording_id
        self.app.metrics.recordings_active.inc()
        logger.info("session %s: recording to %s", self.session_id, path)
        self.send(protocol.RecordStarted(recording_id=recording_id, path=str(path)))

    def _recording_ended(self, recorder) -> None:
        """A recording ended by itself (a limit or a write error; its file is finished): stop
        it and tell the client, unless it was stopped meanwhile."""
        session = self.session
        if session is None or session.recorder is not recorder:
            return

        async def finish() -> None:
            if session.recorder is recorder:
                self._recording_stopped(await session.stop_recording(), "stopped")

        task = asyncio.get_running_loop().create_task(finish(), name="recording-end")
        self._recording_end_tasks.add(task)
        task.add_done_callback(self._recording_end_tasks.discard)

    def _recording_stopped(self, result, requested: str) -> None:
        """Account a finished recording and send ``record.stopped`` (its ``reason``: a limit,
        ``failed``, or ``requested``: ``stopped`` or ``session_ended``)."""
        self.guard.release_recording()
        self.app.metrics.recordings_active.dec()
        dropped = result.dropped_video_frames + result.dropped_audio_chunks
        if dropped:
            self.app.metrics.recording_frames_dropped.inc(dropped)
        reason = recording_stop_reason(result, requested)
        self.app.metrics.recordings_stopped.labels(reason).inc()
        message = recording_stop_message(result, reason, self.app.settings.limits)
        if reason != requested:
            logger.info("session %s: %s", self.session_id, message)
        if result.error is not None:
            self.send_error("recording_failed", f"record.stop: {result.error}")
        self.send(
            protocol.RecordStopped(
                recording_id=self.recording_id or "",
                path=str(result.path),
                duration_ms=result.duration_ms,
                dropped_frames=result.dropped_video_frames,
                error=result.error,
                reason=reason,
                message=message,
                size_bytes=result.size_bytes,
            )
        )
        self.recording_id = None

    # ----------------------------------------------------------------------------- frames
    async def _on_frame(self, raw: str | bytes) -> None:
        if not await self.guard.allow_frame(raw):
            return
        self.last_control_s = time.monotonic()
        message = protocol.parse_client_message(raw, self.app.settings.limits)
        if isinstance(message, protocol.ErrorMessage):
            self.send(message)
            logger.info("client error %s (session %s)", message.code, self.session_id)
            return
        try:
            self.guard.admit(message)
            if isinstance(message, protocol.SessionStart):
                await self._session_start(message)
            elif isinstance(message, protocol.SessionResume):
                await self._session_resume(message)
            elif isinstance(message, protocol.WebRTCOffer):
                await self._webrtc_offer(message)
            elif isinstance(message, protocol.Speak):
                self._require_session("speak").speak(message.utterance_id, message.text, message.language)
            elif isinstance(message, protocol.SpeakEnd):
                self._require_session("speak.end").speak_end(message.utterance_id)
            elif isinstance(message, protocol.Interrupt):
                self._require_session("interrupt").interrupt()
            elif isinstance(message, protocol.SessionUpdate):
                self._require_session("session.update").set_mode(mode=message.mode, barge_in=message.barge_in)
            elif isinstance(message, protocol.RecordStart):
                await self._record_start(self._require_session("record.start"))
            elif isinstance(message, protocol.RecordStop):
                session = self._require_session("record.stop")
                self._recording_stopped(await session.stop_recording(), "stopped")
            self.guard.accepted(message)
        except (ImageError, SessionInputError) as exc:
            self.send_error(exc.code, str(exc), field=_field_of(str(exc)))
        except EngineInputError as exc:
            self.send_error("engine_input", str(exc))
        except Exception:
            logger.exception("handling a %s message failed", message.type)
            self.send_error("internal", f"{message.type}: the server failed to handle this message")

    def _require_session(self, what: str) -> SessionRunner:
        if self.session is None:
            raise SessionInputError("no_session", f"type: {what} needs a session; send session.start first")
        return self.session

    async def _session_start(self, message: protocol.SessionStart) -> None:
        app = self.app
        if self.session is not None or self._holds_slot:
            raise SessionInputError("session_exists", "type: this connection already has a session")
        if app.draining:
            app.metrics.sessions_refused.labels("shutting_down").inc()
            raise SessionInputError("shutting_down", "the server is shutting down; try another instance")
        if app.sessions_active >= app.settings.max_sessions:
            app.metrics.sessions_refused.labels("capacity").inc()
            raise SessionInputError(
                "capacity", f"server at capacity: max_sessions = {app.settings.max_sessions}; try again later"
            )
        if (overload := app.engine_overload()) is not None:
            app.metrics.sessions_refused.labels("capacity").inc()
            raise SessionInputError("capacity", f"server at capacity: {overload}; try again later")
        session_id = self.guard.reserve_session(message)
        app.sessions_active += 1
        app.metrics.sessions_active.inc()
        self._holds_slot = True
        try:
            limits = app.settings.limits
            image = await asyncio.to_thread(
                decode_image, message.image, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels
            )
            identity = await app.worker.prepare_identity(image, message.prompt)
        except BaseException:
            self._holds_slot = False
            app.sessions_active -= 1
            app.metrics.sessions_active.dec()
            self.guard.release_session()
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
        app.metrics.sessions_started.inc()
        self._rotate_resume_token()
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
            "sr": session.upgrader is not None,
            "mode": session.config.mode,
            "barge_in": session.config.barge_in,
            "resume_grace_s": app.settings.session_resume_grace_s,
        }

    # ----------------------------------------------------------------------------- resume
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
            raise SessionInputError("session_exists", "type: this connection already has a session")
        if app.draining:
            app.metrics.session_resumes.labels("failed").inc()
            raise SessionInputError("resume_failed", "resume_token: the server is shutting down")
        target = app.resume_target(message.resume_token)
        grant = self.guard.grant
        if (
            target is None
            or target is self
            or target._ended
            or target._closed
            or target.session is None
            or (grant.session_id is not None and grant.session_id != target.session_id)
        ):
            app.metrics.session_resumes.labels("failed").inc()
            raise SessionInputError("resume_failed", "resume_token: unknown or expired")
        try:
            target.guard.check_adopt(self.guard)
        except LimitError:
            app.metrics.session_resumes.labels("failed").inc()
            raise
        # From here on nothing awaits until the session is attached (no resume or end in between).
        if not target.parked:  # its old WebSocket is still open (the server has not seen it drop)
            old_ws = target.ws
            target._park()
            old_ws.transport.abort()
        if self._sender is not None:  # stops at its next await; what it has not taken stays queued
            self._sender.cancel()
        target._attach(self)
        self._successor = target
        app.metrics.session_resumes.labels("resumed").inc()

    def _attach(self, other: ClientConnection) -> None:
        """Take over ``other``'s WebSocket, its outbox and its guard's WebSocket side; answer
        ``session.resumed`` with a new token, then replay the frames kept while parked."""
        assert self.parked and self.session is not None
        if self._grace_task is not None:
            self._grace_task.cancel()
            self._tasks.append(self._grace_task)  # awaited on close
            self._grace_task = None
        self.guard.adopt(other.guard)
        self.ws, self._outbox = other.ws, other._outbox
        self.parked = False
        self.app.metrics.sessions_parked.dec()
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
                recording_id=self.recording_id,
                missed_messages=len(missed),
                dropped_messages=dropped,
                **self._session_fields(),
            )
        )
        for frame in missed:
            self.send(frame)

    async def _webrtc_offer(self, message: protocol.WebRTCOffer) -> None:
        session = self._require_session("webrtc.offer")
        self.guard.check_offer(message.sdp)
        offer_sdp = self._filter_candidates(message.sdp)
        if self.pc is not None:
            if self.pc.connectionState not in ("failed", "closed"):
                raise SessionInputError("webrtc_exists", "type: this session already has a peer connection")
            await close_peer_connection(self.pc)
        pc = make_peer_connection(self.app.settings.webrtc.ice_servers)
        self.pc = pc
        session_id = self.session_id

        @pc.on("track")
        def on_track(track) -> None:
            if track.kind == "audio":
                logger.info("session %s: microphone track received", session_id)
                session.attach_microphone(self.guard.wrap_microphone(track))

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
            pc.addTrack(self.guard.wrap_track(video))
            if "audio" in kinds:
                pc.addTrack(self.guard.wrap_track(session.audio_track()))
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:
            self.pc = None
            await close_peer_connection(pc)
            raise SessionInputError("bad_sdp", f"sdp: not a usable offer ({type(exc).__name__}: {exc})") from None
        self.send(protocol.WebRTCAnswer(sdp=pc.localDescription.sdp))

    def _filter_candidates(self, sdp: str) -> str:
        """The offer without the remote ICE candidates the policy refuses (issue 18), counted by reason."""
        settings = self.app.settings
        try:
            sdp, refusals = filter_offer(sdp, settings.webrtc.ice_policy.for_host(settings.host))
        except ValueError as exc:
            raise SessionInputError("bad_sdp", str(exc)) from None
        for reason, count in summarize(refusals).items():
            self.app.metrics.ice_candidates_refused.labels(reason=reason).inc(count)
        if refusals:
            logger.info("session %s: ICE candidates dropped from the offer: %s", self.session_id, summarize(refusals))
        return sdp

    # ----------------------------------------------------------------------------- events
    def _on_session_event(self, event: events.SessionEvent) -> None:
        self.app.metrics.observe(event)
        self.guard.observe(event)
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


def _field_of(message: str) -> str | None:
    """Error messages start with the field they concern (``"text: ..."``)."""
    head, sep, _ = message.partition(":")
    return head if sep and head.isidentifier() else None


def build_app(settings: Settings, engine: SegmentEngine, **kwargs: Any) -> AvatarServer:
    """The server for ``settings`` around ``engine`` (not started: ``await app.start()``)."""
    return AvatarServer(settings, engine, **kwargs)


class EngineUnavailableError(RuntimeError):
    """The configured engine preset cannot be built on this installation."""


def create_engine(settings: Settings) -> SegmentEngine:
    """The engine of ``settings.engine``; the model pipeline is imported only when needed."""
    if settings.engine == "testpattern":
        from engine.testpattern import TestPatternEngine

        return TestPatternEngine(generate_delay_s=settings.testpattern_delay_s)
    try:
        from engine.pipeline import build_engine
    except ImportError as exc:
        raise EngineUnavailableError(
            f"engine preset {settings.engine!r} needs engine.pipeline, which cannot be imported ({exc}); "
            "use --engine testpattern to run without the model"
        ) from exc
    checkpoint_dir = None if settings.checkpoint_dir is None else str(settings.checkpoint_dir)
    try:
        return build_engine(
            settings.engine, checkpoint_dir=checkpoint_dir, device=settings.device, seed=settings.seed, sr=settings.sr
        )
    except ValueError as exc:
        raise EngineUnavailableError(f"engine preset {settings.engine!r}: {exc}") from exc
