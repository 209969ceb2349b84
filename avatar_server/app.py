"""The application: :func:`create_app` (the ASGI app), :class:`AvatarServer` (sessions,
readiness, drain) and the in-process uvicorn server of ``avatar-server serve`` and the tests.

Layers: the ASGI app (:mod:`avatar_server.routes`: HTTP routes and ``/ws``) ->
:class:`~avatar_server.connection.ClientConnection` (one WebSocket and its session) ->
:class:`~streaming.session.SessionRunner` (segment loop) -> :class:`~streaming.session.EngineWorker`
(the engine's one thread).

Two ways to run it:

* ``create_app(settings, engine)`` returns a FastAPI app with a lifespan (startup: warm-up;
  shutdown: close every session and the engine worker) that any ASGI server or serving
  framework mounts as it is. ``app.state.avatar`` is its :class:`AvatarServer`.
* ``build_app(settings, engine)`` returns the :class:`AvatarServer`; ``await start()`` serves
  its app with uvicorn in the running event loop, with the connection-level limits of
  :mod:`avatar_server.transport` and TLS; ``await drain(timeout_s)`` then ``await close()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI

from avatar_server import routes
from avatar_server.admission import AdmissionRegistry
from avatar_server.auth import Authenticator, startup_problem
from avatar_server.connection import ClientConnection
from avatar_server.images import set_pixel_limit
from avatar_server.live import LiveRegistry
from avatar_server.metrics import Metrics
from avatar_server.resume import token_key
from avatar_server.settings import Settings
from avatar_server.tls import server_ssl_context
from avatar_server.transport import protocol_classes
from avatar_server.webrtc import use_host_addresses
from engine.api import SegmentEngine, SegmentKind, SegmentRequest
from streaming.engine_client import EngineWorker
from streaming.microphone import Microphone, load_vad_model
from streaming.planner import LoopConfig
from streaming.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent.parent / "clients" / "web"
STATIC_FILES = ("index.html", "app.js", "style.css", "watch.html", "watch.js")
PUBLIC_PAGES = ("watch",)  # /watch: the WHEP player (avatar_server/live.py)
SHUTDOWN_TIMEOUT_S = 15.0


class EmbeddedServer(uvicorn.Server):
    """uvicorn's server without its signal handlers: the embedding program (``avatar-server
    serve``, a test) decides what a signal does (drain first, then close)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def uvicorn_config(app: Any, settings: Settings) -> uvicorn.Config:
    """uvicorn's configuration for ``app``: h11 and the ``websockets`` sans-I/O protocol with
    the limits of ``settings.limits`` (message size, keepalive, handshake and close timeouts),
    no proxy-header rewriting (:class:`~avatar_server.auth.ClientAddressResolver` decides the
    client address), no access log (paths carry session tokens), TLS when configured.

    Raises:
        OSError / ssl.SSLError: the TLS files cannot be read or do not match.
    """
    limits = settings.limits
    http_class, ws_class = protocol_classes(limits)
    config = uvicorn.Config(
        app,
        http=http_class,
        ws=ws_class,
        lifespan="on",
        ws_max_size=limits.max_message_bytes,
        ws_ping_interval=limits.ping_interval_s,
        ws_ping_timeout=limits.ping_timeout_s,
        ws_per_message_deflate=False,
        proxy_headers=False,
        server_header=False,
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=int(SHUTDOWN_TIMEOUT_S),
    )
    config.load()
    if settings.tls_cert is not None and settings.tls_key is not None:
        config.ssl = server_ssl_context(str(settings.tls_cert), str(settings.tls_key))
    return config


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (IPv4 or IPv6; port 0: a free one).

    Raises:
        OSError: the address cannot be bound.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(2048)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class AvatarServer:
    """The server application: its sessions, readiness and drain, and its ASGI app
    (:attr:`asgi`). :func:`create_app` gives the ASGI app to mount in any ASGI server;
    :func:`build_app` gives this object, which also serves it (``await start()``;
    ``await close()``).

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
            super_resolution=settings.sr,
        )
        if settings.sr and not self.worker.can_super_resolve:
            logger.warning("sr is on but engine %s has no super-resolution model: sr is ignored", engine.name)
        self.metrics.generation_queue_length.set_function(lambda: self.worker.jobs.queue_length)
        self.metrics.engine_job_running_seconds.set_function(lambda: self.worker.jobs.running_for_s)
        self.metrics.engine_utilization.set_function(
            lambda: self.worker.jobs.foreground_utilization(settings.engine_utilization_window_s)
        )
        self._stall_logged = False
        self.draining = False
        self._drain_cancelled = asyncio.Event()
        self.sessions_active = 0
        self.connections: set[ClientConnection] = set()  # with a WebSocket attached
        self.resumable: dict[bytes, ClientConnection] = {}  # sha256(resume token) -> live or parked session
        self._started = False
        self._shut_down = False
        self._uvicorn: EmbeddedServer | None = None
        self._socket: socket.socket | None = None
        self._serve_task: asyncio.Task[None] | None = None
        self._warm = False
        self._not_ready_reason = "engine warming up"
        self._warmup_task: asyncio.Task[None] | None = None
        use_host_addresses(settings.ice_host_addresses())
        set_pixel_limit(settings.limits.max_image_pixels)
        self.auth = Authenticator(settings, static_files=STATIC_FILES + PUBLIC_PAGES, metrics=self.metrics)
        self.admission = AdmissionRegistry(settings.limits)
        self.web_dir = WEB_DIR
        self.live = LiveRegistry(self)  # headless sessions, outputs and viewers (issue 15)
        self.asgi = routes.build_asgi_app(self)

    # ----------------------------------------------------------------------------- lifecycle
    async def startup(self, *, warm_up: bool = True) -> None:
        """Start the application (the ASGI lifespan's startup; idempotent): warm the engine up
        in the background (``warm_up=False``: ready at once)."""
        if self._started:
            return
        self._started = True
        problem = startup_problem(self.settings)
        if problem is not None:
            raise ValueError(problem)
        if warm_up:
            self._warmup_task = asyncio.get_running_loop().create_task(self._warm_up(), name="warm-up")
        else:
            self._warm = True

    async def shutdown(self) -> None:
        """Stop the application (the ASGI lifespan's shutdown; idempotent): close every
        connection and its session, then the engine worker."""
        if self._shut_down:
            return
        self._shut_down = True
        self.draining = True
        await cancel_and_wait(self._warmup_task)
        for conn in self._all_sessions():
            await conn.close()
        await self.live.close()
        await asyncio.to_thread(self.worker.close, 10.0)  # the engine thread stops before exit

    async def start(self, *, warm_up: bool = True) -> None:
        """Serve :attr:`asgi` with uvicorn on ``settings.host``/``settings.port`` in this event
        loop (``port`` 0 picks a free one: see :attr:`port`), with the connection limits of
        :mod:`avatar_server.transport`, TLS when configured, and start the application.

        Raises:
            ValueError: the settings must not be served (:func:`~avatar_server.auth.startup_problem`).
            OSError: the address cannot be bound.
        """
        problem = startup_problem(self.settings)
        if problem is not None:
            raise ValueError(problem)
        await self.startup(warm_up=warm_up)
        self._uvicorn = EmbeddedServer(uvicorn_config(self.asgi, self.settings))
        self._socket = bind_socket(self.settings.host, self.settings.port)
        self._serve_task = asyncio.get_running_loop().create_task(
            self._uvicorn.serve(sockets=[self._socket]), name="uvicorn"
        )
        while not self._uvicorn.started:
            if self._serve_task.done():
                await self._serve_task  # raises what stopped it
                raise RuntimeError("uvicorn stopped while starting")
            await asyncio.sleep(0.01)
        logger.info("serving on %s (engine %s)", self.url, self.engine.name)

    async def serve_forever(self) -> None:
        """Wait until the server started by :meth:`start` stops."""
        assert self._serve_task is not None
        await asyncio.shield(self._serve_task)

    async def close(self) -> None:
        """Close every connection (and its session), the listening socket and the worker."""
        await self.shutdown()
        if self._uvicorn is not None and self._serve_task is not None:
            self._uvicorn.should_exit = True
            try:
                async with asyncio.timeout(15.0):
                    await self._serve_task
            except TimeoutError:
                self._uvicorn.force_exit = True
                await cancel_and_wait(self._serve_task)
            self._serve_task = None

    async def drain(self, timeout_s: float) -> None:
        """Graceful shutdown, step 1: accept no new connections or sessions, give running
        sessions up to ``timeout_s`` to finish what they are saying, then end every session
        with ``session.ended`` (reason ``shutdown``) and close its WebSocket (1001, going away).
        :meth:`cancel_drain` (a second signal) skips the wait."""
        self.draining = True  # new handshakes get 503, session.start gets shutting_down
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

    # ----------------------------------------------------------------------------- connections
    async def handle_websocket(self, link: Any, grant: Any) -> None:
        """Serve one accepted WebSocket (``/ws``) until it closes; after a ``session.resume``
        the resumed session reads it."""
        conn: ClientConnection | None = ClientConnection(self, link, grant)
        self.connections.add(conn)
        self.metrics.websocket_connections_active.inc()
        try:
            while conn is not None:
                conn = await conn.run()
        finally:
            self.metrics.websocket_connections_active.dec()

    def live_sessions(self) -> list[ClientConnection]:
        """Every connection with a running session, attached or parked (each once)."""
        return [conn for conn in self._all_sessions() if conn.session is not None and not conn.closed]

    def session_by_id(self, session_id: str) -> ClientConnection | None:
        """The connection running session ``session_id`` (attached or parked), or ``None``."""
        return next((conn for conn in self.live_sessions() if conn.session_id == session_id), None)

    def _all_sessions(self) -> list[ClientConnection]:
        """Every connection with a WebSocket and every parked session (each once)."""
        return list(dict.fromkeys([*self.connections, *self.resumable.values()]))

    @property
    def sessions_parked(self) -> int:
        """Sessions waiting for ``session.resume`` (they hold their slot)."""
        return sum(1 for conn in self.resumable.values() if conn.parked)

    def resume_target(self, token: str) -> ClientConnection | None:
        """The live or parked session whose current resume token is ``token``, or ``None``."""
        return self.resumable.get(token_key(token))

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        assert self._socket is not None
        return self._socket.getsockname()[1]

    @property
    def url(self) -> str:
        host = self.settings.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        if ":" in shown:
            shown = f"[{shown}]"
        port = self.port if self._socket is not None else self.settings.port
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
            await self._warm_shapes()
            # Import torch and silero-vad now rather than on the first microphone.
            await asyncio.to_thread(load_vad_model)
        except Exception as exc:
            logger.exception("engine warm-up failed")
            self._not_ready_reason = f"engine warm-up failed: {type(exc).__name__}"
            return
        self._warm = True
        logger.info("engine warmed up in %.2f s", time.perf_counter() - started)

    async def _warm_shapes(self) -> None:
        """Warm start (issue 17): engines with static shapes (text-length buckets) run every
        (segment length x text bucket) shape the planner asks for once, so that torch.compile
        compiles (or loads its on-disk cache, ``compile_cache_dir``) before ``/readyz`` says ready.
        Engines without such shapes (the test pattern) have no ``warm_up``."""
        warm_up = getattr(self.engine, "warm_up", None)
        if warm_up is None:
            return
        s = self.settings
        lengths = sorted({
            min(seconds, self.engine.max_segment_seconds)
            for seconds in (s.segment_seconds, s.idle_segment_seconds, s.min_segment_seconds)
        })
        try:
            report = await self.worker.jobs.run(warm_up, lengths, deadline_s=time.monotonic())
        except ValueError as exc:  # no text buckets: shapes are unbounded, nothing to warm
            logger.info("warm start skipped: %s", exc)
            return
        logger.info("warm start: %d shapes (segment lengths %s s x text buckets) in %.2f s",
                    len(report["shapes"]), lengths, report["total_s"])

    def engine_stall(self) -> str | None:
        """Why the engine counts as stalled, or ``None``: after warm-up, a job has run longer than
        ``engine_stall_s`` (logged once per stall). Warm-up itself (compile, autotune) is exempt."""
        running_s = self.worker.jobs.running_for_s
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
        busy = self.worker.jobs.foreground_utilization(settings.engine_utilization_window_s)
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


def build_app(settings: Settings, engine: SegmentEngine, **kwargs: Any) -> AvatarServer:
    """The server for ``settings`` around ``engine`` (not started: ``await app.start()``)."""
    return AvatarServer(settings, engine, **kwargs)


def create_app(settings: Settings, engine: SegmentEngine, **kwargs: Any) -> FastAPI:
    """The ASGI app for ``settings`` around ``engine``, to mount in any ASGI server.

    Its lifespan starts the engine warm-up and, at shutdown, closes every session and the
    engine worker; ``app.state.avatar`` is the :class:`AvatarServer` behind it. Keyword
    arguments go to :class:`AvatarServer` (``metrics``, ``microphone_factory``).
    """
    return AvatarServer(settings, engine, **kwargs).asgi
