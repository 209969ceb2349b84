"""``avatar-server fleet``: the server as a Ray Serve deployment, one replica per GPU (issue 13).

Only this module imports Ray (install the ``fleet`` extra); the plain server never does.

Shape of the fleet
    Each replica runs the app factory ``create_app(settings, engine)`` (an ASGI app) around its
    own engine behind Serve's HTTP proxy, which carries WebSockets. A WebSocket is one ongoing
    Serve request for its whole life, so a replica's ``max_ongoing_requests`` is its session
    capacity: ``max_sessions`` plus ``fleet.request_headroom`` for HTTP requests and for the
    WebSocket of a client that is told ``capacity``. Autoscaling follows ongoing requests
    (``fleet.target_sessions_per_replica``); ``fleet.max_queued_requests`` bounds what waits
    when every replica is at its limit (beyond it: HTTP 503 at once, never a hang).

Routing (:class:`SessionAffinityRouter`, a Serve request router)
    A new WebSocket goes to the replica with the fewest ongoing requests that has room (so
    sessions spread, and a full fleet answers ``capacity`` from the least loaded replica at
    once). A WebSocket that names a session goes to the replica that holds it: replicas
    register each session id they announce (``session.ready``/``session.resumed``) with the
    :class:`FleetControl` actor before the client sees it, and the router asks it. A request
    names its session (:func:`request_session_id`) by

    * the ``x-session-id`` header: Serve's session header (``RAY_SERVE_SESSION_ID_HEADER_KEY``),
      which the proxy puts in the request's metadata; the Python client sends it; or
    * the query parameter ``?session_id=`` (``/ws?session_id=<id>``), which browsers can send
      (a browser cannot set headers on a WebSocket); the page sends it on ``session.resume``.
      The proxy hands the request to the router as its ASGI scope (the pickled
      ``StreamingHTTPRequest`` of Serve's HTTP proxy, Ray 2.60), whose ``query_string`` the
      router reads. The plain server reads the same parameter as "the session this token is
      for" (docs/PROTOCOL.md, Authentication) and otherwise ignores it, so one page serves both.

    No proxy or ingress rule of our own is involved: Serve's proxy calls this router.
    Media does not pass the proxy: the peer connection runs between the client and the
    replica's node (its ICE candidates), see ``ops/deploy/README.md``.

Health, drain, metrics
    Serve's health check runs the replica's own ``/healthz`` in-process (an engine stall fails
    it; Serve replaces the replica). Scale-down and redeploys stop routing to a replica and
    wait up to ``fleet.drain_timeout_s`` (``graceful_shutdown_timeout_s``) for its sessions:
    they play on, and shortly before that limit the replica runs the app's drain so that they
    end cleanly rather than being cut (the routers report their replica sets to
    :class:`FleetControl`; a replica that left them is being stopped).
    SIGTERM to ``avatar-server fleet`` sets the drain flag of :class:`FleetControl`; every
    replica then runs the app's drain (``app.state.drain(timeout_s)``: notice, finish speaking,
    ``session.ended``) before the fleet is torn down. ``/readyz`` and ``/metrics`` through the
    proxy answer for the whole fleet from the replicas' periodic reports: replica count, free
    session slots, every replica's metrics with a ``replica`` label and ``avatar_fleet_*``
    totals.

Contract with the app factory: an ASGI app with ``/healthz`` (200 healthy), ``/readyz``
(200 ready), ``/metrics`` (Prometheus text, ``avatar_server_sessions_active``) answering an
in-process loopback request, ``/ws`` whose ``session.ready``/``session.resumed`` carry
``session_id``, and ``app.state.avatar.drain``: ``async (timeout_s) -> None`` (what
:func:`avatar_server.app.create_app` returns).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import os
import pickle
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import ray
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.serve.config import AutoscalingConfig, HTTPOptions, RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from avatar_server.settings import Settings

logger = logging.getLogger(__name__)

CONTROL_ACTOR = "avatar-fleet-control"
CONTROL_NAMESPACE = "avatar-fleet"
DEPLOYMENT_NAME = "AvatarServer"
DEFAULT_APP_FACTORY = "avatar_server.app:create_app"
DEFAULT_ENGINE_FACTORY = "avatar_server.server:create_engine"
SESSION_HEADER = "x-session-id"  # Serve's default RAY_SERVE_SESSION_ID_HEADER_KEY
SESSION_QUERY = "session_id"  # /ws?session_id=<id>: the session header of browsers
MAX_SESSION_ID_CHARS = 64  # session ids are 1-64 of A-Z a-z 0-9 _ - (docs/PROTOCOL.md)
REPORT_STALE_S = 5.0  # a replica whose last report is older is not counted
MAX_SESSION_HOMES = 100_000  # session id -> replica entries kept (oldest forgotten first)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


# ------------------------------------------------------------------------------- control actor
@ray.remote(num_cpus=0)
class FleetControl:
    """The fleet's shared state: each replica's last report, where each session lives, and the
    drain flag. One named, detached actor per fleet (:data:`CONTROL_ACTOR`)."""

    def __init__(self) -> None:
        self.reports: dict[str, dict[str, Any]] = {}
        self.homes: OrderedDict[str, str] = OrderedDict()
        self.draining = False
        self.routable: set[str] = set()  # replicas the routers have ever routed to
        self.retiring: set[str] = set()  # ... and no longer do (Serve is stopping them)

    def report(self, replica: str, report: dict[str, Any]) -> dict[str, bool]:
        """Store ``replica``'s report (sessions, capacity, health, metrics text); returns
        ``drain`` (the whole fleet stops) and ``retiring`` (Serve stopped routing to it)."""
        self.reports[replica] = {**report, "received_s": time.monotonic()}
        return {"drain": self.draining, "retiring": replica in self.retiring}

    def set_routable(self, replicas: list[str]) -> None:
        """A router's replica set changed: a replica that was in it and is not any more is being
        stopped by Serve (scale-down, redeploy, failed health check)."""
        current = set(replicas)
        self.retiring |= self.routable - current
        self.routable |= current

    def forget(self, replica: str) -> None:
        self.reports.pop(replica, None)

    def register_session(self, session_id: str, replica: str) -> None:
        self.homes[session_id] = replica
        self.homes.move_to_end(session_id)
        while len(self.homes) > MAX_SESSION_HOMES:
            self.homes.popitem(last=False)

    def home_of(self, session_id: str) -> str | None:
        return self.homes.get(session_id)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Reports of the replicas heard from within :data:`REPORT_STALE_S`."""
        now = time.monotonic()
        for replica in [r for r, rep in self.reports.items() if now - rep["received_s"] > REPORT_STALE_S]:
            del self.reports[replica]
        return dict(self.reports)

    def drain(self) -> None:
        self.draining = True

    def is_draining(self) -> bool:
        return self.draining


def control_actor() -> Any:
    """The fleet's :class:`FleetControl` (created on first use)."""
    return FleetControl.options(
        name=CONTROL_ACTOR, namespace=CONTROL_NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()


# ------------------------------------------------------------------------------- session of a request
def scope_session_id(scope: dict[str, Any]) -> str:
    """The session an HTTP or WebSocket request names, from its ASGI ``scope``: the
    :data:`SESSION_HEADER` header, else the first :data:`SESSION_QUERY` query parameter.

    Returns ``""`` when it names none, or an id over :data:`MAX_SESSION_ID_CHARS` characters
    (no session has one) or a query of more than 16 fields (as the app's own parsing)."""
    wanted = ""
    header = SESSION_HEADER.encode()
    for name, value in scope.get("headers") or ():
        if name.lower() == header:
            wanted = value.decode("latin-1")
            break
    if not wanted:
        query_string = scope.get("query_string") or b""
        try:
            query = parse_qs(query_string.decode("latin-1"), max_num_fields=16)
        except ValueError:
            query = {}
        wanted = (query.get(SESSION_QUERY) or [""])[0]
    return wanted if len(wanted) <= MAX_SESSION_ID_CHARS else ""


def request_scope(pending_request: PendingRequest) -> dict[str, Any] | None:
    """The ASGI scope of a request that Serve's HTTP proxy routes, or ``None`` for any other.

    The proxy's handle call has one argument: a ``StreamingHTTPRequest`` (Serve's
    ``ray.serve._private.common``) pickled to bytes, whose ``asgi_scope`` is the request's
    scope (``type`` ``http``/``websocket``, ``path``, ``query_string``, ``headers``). Only
    requests whose metadata says the proxy made them (``is_http_request``) are unpickled: the
    bytes were written by the proxy in this process. A format that is not this one gives
    ``None`` (routing falls back to the session header and load), never an error."""
    if not pending_request.metadata.is_http_request or len(pending_request.args) != 1:
        return None
    request = pending_request.args[0]
    if isinstance(request, bytes):
        try:
            request = pickle.loads(request)  # the proxy's own pickle (see above)
        except Exception:  # noqa: BLE001 - another Serve's format: no scope
            return None
    scope = getattr(request, "asgi_scope", None)
    return scope if isinstance(scope, dict) else None


def request_session_id(pending_request: PendingRequest | None) -> str:
    """The session a routed request names (``""``: none): Serve's session id of the request
    (the ``x-session-id`` header, or a handle's ``session_id`` option), else the
    ``?session_id=`` of an HTTP/WebSocket request from the proxy (:func:`scope_session_id`)."""
    if pending_request is None:
        return ""
    if pending_request.metadata.session_id:
        return pending_request.metadata.session_id
    scope = request_scope(pending_request)
    return scope_session_id(scope) if scope is not None else ""


# ------------------------------------------------------------------------------- request router
class SessionAffinityRouter(RequestRouter):
    """Serve request router for sessions.

    * A request that names a session (the ``x-session-id`` header or ``?session_id=``, see
      :func:`request_session_id`) goes to the replica that holds that session (looked up in
      :class:`FleetControl`), else as any other (where ``session.resume`` is answered
      ``resume_failed``).
    * Any other request goes to the replica with the most free session slots: the replicas'
      last reports, less the requests this router sent each one since its report. A full
      replica still accepts (``max_ongoing_requests`` has headroom) and answers ``capacity``
      at once, so a new session is refused only when every replica is full.

    Serve calls :meth:`choose_replicas` for each request; each returned rank holds one replica
    and is taken if that replica is below ``max_ongoing_requests``.
    """

    def initialize_state(self, **kwargs: Any) -> None:
        self._control: Any = None
        self._routed: dict[str, list[float]] = {}  # replica -> wall-clock times of requests sent

    async def _ask(self, method: str, *args: Any) -> Any:
        for attempt in (1, 2):  # a fleet redeployed since: look the actor up again once
            try:
                if self._control is None:
                    self._control = ray.get_actor(CONTROL_ACTOR, namespace=CONTROL_NAMESPACE)
                return await asyncio.wait_for(getattr(self._control, method).remote(*args), 2.0)
            except Exception as exc:  # noqa: BLE001 - no control actor: route by load alone
                self._control = None
                if attempt == 2:
                    logger.warning(
                        "fleet control %s failed (%s); routing by load", method, type(exc).__name__
                    )
        return None

    def _free_slots(self, replica: RunningReplica, snapshot: dict[str, dict[str, Any]]) -> float:
        replica_id = replica.replica_id.unique_id
        report = snapshot.get(replica_id)
        if report is None:
            return -1.0  # not reported yet (starting): after every replica that did
        sent = sum(1 for t in self._routed.get(replica_id, ()) if t > report["reported_at"])
        return replica_free_slots(report) - sent

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # sleep between rounds when all are full
        session_id = request_session_id(pending_request)
        if session_id:
            home = await self._ask("home_of", session_id)
            home_ranks = [r for r in candidate_replicas if r.replica_id.unique_id == home]
            if home_ranks:
                return [home_ranks, [r for r in candidate_replicas if r not in home_ranks]]
        snapshot = await self._ask("snapshot")
        if not snapshot:
            return [candidate_replicas]  # no fleet view: Serve's least-loaded choice
        scores = {r.replica_id: self._free_slots(r, snapshot) for r in candidate_replicas}
        best = max(scores.values())
        if best <= 0:
            return [candidate_replicas]  # every replica is full: the least loaded answers `capacity`
        # Only the replicas with the most free slots (Serve takes the least loaded of them that
        # answers its queue-length probe; a slow probe means another round, not a fuller replica).
        return [[r for r in candidate_replicas if scores[r.replica_id] == best]]

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        try:  # tell the fleet which replicas still get requests (fire and forget, so looked up
            # afresh each time: a call on the handle of an actor that was replaced fails unseen)
            control = ray.get_actor(CONTROL_ACTOR, namespace=CONTROL_NAMESPACE)
            control.set_routable.remote(sorted(r.replica_id.unique_id for r in replicas))
        except Exception as exc:  # noqa: BLE001 - no control actor yet: the next update tells it
            logger.debug("fleet control unreachable (%s)", type(exc).__name__)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: Any, result: Any) -> None:
        now = time.time()
        sent = self._routed.setdefault(replica_id.unique_id, [])
        sent.append(now)
        del sent[: max(0, len(sent) - 256)]
        for replica in [r for r, times in self._routed.items() if times and now - times[-1] > 60]:
            del self._routed[replica]


# ------------------------------------------------------------------------------- replica
async def asgi_get(app: ASGIApp, path: str) -> tuple[int, bytes]:
    """``GET path`` on ``app`` in-process, from a loopback client; returns (status, body)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1")],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
    }
    done = asyncio.Event()
    requested = False
    status = 0
    body = bytearray()

    async def receive() -> dict:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    try:
        await app(scope, receive, send)
    finally:
        done.set()
    return status, bytes(body)


def load_object(path: str) -> Any:
    """``"package.module:name"`` -> the object."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def sessions_active(metrics_text: str) -> int:
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "avatar_server_sessions_active":
            return int(sum(sample.value for sample in family.samples))
    return 0


class AvatarReplica:
    """One replica: an engine, the app around it, and its reports to :class:`FleetControl`.

    Args:
        settings_json: the fleet's :class:`Settings` as JSON (secrets included: the replicas
            need the api key and token secret; Ray passes it inside the cluster).
        app_factory, engine_factory: import paths of ``create_app(settings, engine)`` and
            ``create_engine(settings)``.
    """

    async def __init__(self, settings_json: str, app_factory: str, engine_factory: str) -> None:
        self.settings = Settings.model_validate_json(settings_json)
        self.replica = serve.get_replica_context().replica_id.unique_id
        engine = await asyncio.to_thread(load_object(engine_factory), self.settings)
        self.inner: ASGIApp = load_object(app_factory)(self.settings, engine)
        self.control = (
            control_actor()
        )  # exists when started by `avatar-server fleet`; created under `serve deploy`
        self.draining = False
        self.retiring = False
        self.node = ray.util.get_node_ip_address()
        self._reporter = asyncio.get_running_loop().create_task(self._report_loop(), name="fleet-report")
        logger.info("fleet replica %s on %s ready to start", self.replica, self.node)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return _ASGI3(self._asgi)

    async def check_health(self) -> None:
        """Serve's health check: the app's own ``/healthz`` (an engine stall fails it)."""
        status, body = await asgi_get(self.inner, "/healthz")
        if status != 200:
            raise RuntimeError(f"/healthz answered {status}: {body.decode(errors='replace').strip()}")

    async def __del__(self) -> None:
        self._reporter.cancel()
        with contextlib.suppress(Exception):
            await self.control.forget.remote(self.replica)

    # -------------------------------------------------------------------------- ASGI
    async def _asgi(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope.get("path") == "/readyz":
            await self._fleet_view("/readyz", send)
            return
        if scope["type"] == "http" and scope.get("path") == "/metrics":
            # the app decides who may read metrics (api key, loopback): only its 200 is replaced
            held: list[dict] = []

            async def hold(message: dict) -> None:
                held.append(message)

            await self.inner(scope, receive, hold)
            if held and held[0].get("status") == 200:
                await self._fleet_view("/metrics", send)
            else:
                for message in held:
                    await send(message)
            return
        if scope["type"] == "websocket":
            await self.inner(scope, receive, self._registering_send(send, scope_session_id(scope)))
            return
        await self.inner(scope, receive, send)

    def _registering_send(self, send: Callable, wanted_session: str = "") -> Callable:
        """``send`` that registers the session id of ``session.ready``/``session.resumed`` with
        the control actor before the client can read it (and so resume through the router).

        A ``resume_failed`` answer to a WebSocket that named (:func:`scope_session_id`) a session
        whose replica has left the fleet says so: that replica failed or was removed, and the
        session ended with it."""
        registered = False

        async def wrapped(message: dict) -> None:
            nonlocal registered
            text = message.get("text") if message["type"] == "websocket.send" else None
            if not registered and text and ('"session.ready"' in text or '"session.resumed"' in text):
                with contextlib.suppress(ValueError, AttributeError):
                    session_id = json.loads(text).get("session_id")
                    if session_id:
                        await self.control.register_session.remote(session_id, self.replica)
                        registered = True
            elif wanted_session and text and '"resume_failed"' in text:
                message = {**message, "text": await self._explain_lost_session(text, wanted_session)}
            await send(message)

        return wrapped

    def _replica_alive(self, replica: str) -> bool:
        """Whether the Serve replica actor ``replica`` (a unique id of this deployment) still exists."""
        own = serve.get_replica_context().replica_id
        name = f"SERVE_REPLICA::{own.deployment_id.app_name}#{own.deployment_id.name}#{replica}"
        try:
            ray.get_actor(name, namespace="serve")
        except ValueError:
            return False
        return True

    async def _explain_lost_session(self, text: str, session_id: str) -> str:
        home = await self.control.home_of.remote(session_id)
        if home is None or home == self.replica:
            return text
        if await asyncio.to_thread(self._replica_alive, home):
            return text
        try:
            frame = json.loads(text)
        except ValueError:
            return text
        if frame.get("type") != "error" or frame.get("code") != "resume_failed":
            return text
        frame["message"] = (
            f"resume_token: session {session_id} ended: its server (fleet replica {home}) failed or was "
            "removed; start a new session"
        )
        return json.dumps(frame)

    async def _fleet_view(self, path: str, send: Callable) -> None:
        snapshot = await self.control.snapshot.remote()
        if path == "/readyz":
            view = fleet_readiness(snapshot)
            status = 200 if view["ready"] else 503
            body = (json.dumps(view) + "\n").encode()
            content_type = "application/json"
        else:
            status, body, content_type = 200, fleet_metrics(snapshot), CONTENT_TYPE
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", content_type.encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    # -------------------------------------------------------------------------- reports
    async def _report_loop(self) -> None:
        period_s = self.settings.fleet.report_period_s
        while True:
            try:
                report = await self._report()
                flags = await self.control.report.remote(self.replica, report)
                if flags["drain"] and not self.draining:
                    self.draining = True
                    asyncio.get_running_loop().create_task(self._drain(), name="fleet-drain")
                elif flags["retiring"] and not self.retiring:
                    self.retiring = True
                    asyncio.get_running_loop().create_task(self._retire(), name="fleet-retire")
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a missed report only ages this replica out of the view
                logger.exception("fleet report failed")
            await asyncio.sleep(period_s)

    async def _report(self) -> dict[str, Any]:
        health, _ = await asgi_get(self.inner, "/healthz")
        ready, reason = await asgi_get(self.inner, "/readyz")
        _, metrics = await asgi_get(self.inner, "/metrics")
        text = metrics.decode(errors="replace")
        active = sessions_active(text)
        full = active >= self.settings.max_sessions
        return {
            "reported_at": time.time(),
            "node": self.node,
            "healthy": health == 200,
            "ready": (ready == 200 or full) and not (self.draining or self.retiring),
            "reason": reason.decode(errors="replace").strip()[:200],
            "sessions_active": active,
            "max_sessions": self.settings.max_sessions,
            "metrics": text,
        }

    async def _retire(self) -> None:
        """Serve is stopping this replica and waits up to ``fleet.drain_timeout_s`` for its
        sessions: let them play on, and shortly before that limit run the app's drain (notice,
        finish speaking for ``drain_timeout_s``, ``session.ended`` reason ``shutdown``), so no
        session is cut by the replica's end."""
        fleet = self.settings.fleet
        lead_s = self.settings.drain_timeout_s + 2 * fleet.report_period_s + 1.0
        logger.info(
            "fleet replica %s is being stopped; its sessions drain in %.0f s at most",
            self.replica,
            fleet.drain_timeout_s,
        )
        await asyncio.sleep(max(0.0, fleet.drain_timeout_s - lead_s))
        await self._drain()

    async def _drain(self) -> None:
        state = getattr(self.inner, "state", None)
        server = getattr(state, "avatar", None)
        drain = getattr(server, "drain", None) or getattr(state, "drain", None)
        if drain is None:
            logger.warning("the app has no state.avatar.drain: its sessions end when the replica stops")
            return
        logger.info("fleet drain: replica %s drains its sessions", self.replica)
        await drain(self.settings.drain_timeout_s)


class _ASGI3:
    """An ASGI 3 app object around a bound method (servers tell ASGI 2 from 3 by ``__call__``)."""

    def __init__(self, handler: ASGIApp) -> None:
        self.handler = handler

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        await self.handler(scope, receive, send)


def replica_free_slots(report: dict[str, Any]) -> int:
    """Sessions a replica would still admit, from its report: ``max_sessions - sessions_active``
    while its ``/readyz`` is 200 (or 503 only because it is full), else 0."""
    if not (report["ready"] and report["healthy"]):
        return 0
    return max(0, report["max_sessions"] - report["sessions_active"])


def fleet_readiness(snapshot: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``/readyz`` of the fleet: ready when some replica would admit a session. A replica's free
    slots are ``max_sessions - sessions_active`` while its own ``/readyz`` is 200 (or 503 only
    because it is full); 0 while it warms up, drains, stalls or is at its engine's utilisation limit."""
    free = {
        replica: max(0, rep["max_sessions"] - rep["sessions_active"])
        if rep["ready"] and rep["healthy"]
        else 0
        for replica, rep in snapshot.items()
    }
    return {
        "ready": sum(free.values()) > 0,
        "replicas": len(snapshot),
        "free_session_slots": sum(free.values()),
        "sessions_active": sum(rep["sessions_active"] for rep in snapshot.values()),
        "by_replica": {
            replica: {
                "node": rep["node"],
                "sessions_active": rep["sessions_active"],
                "free_session_slots": free[replica],
                "healthy": rep["healthy"],
                "reason": rep["reason"],
            }
            for replica, rep in sorted(snapshot.items())
        },
    }


def fleet_metrics(snapshot: dict[str, dict[str, Any]]) -> bytes:
    """Prometheus text: each replica's own metrics with a ``replica`` label, and fleet totals
    ``avatar_fleet_replicas``, ``avatar_fleet_sessions_active``, ``avatar_fleet_free_session_slots``."""
    readiness = fleet_readiness(snapshot)

    class Collector:
        def collect(self):  # noqa: ANN202 - prometheus_client's collector protocol
            merged: dict[str, Metric] = {}
            for replica, rep in sorted(snapshot.items()):
                for family in text_string_to_metric_families(rep["metrics"]):
                    out = merged.get(family.name)
                    if out is None:
                        out = merged[family.name] = Metric(
                            family.name, family.documentation, family.type, family.unit
                        )
                    for sample in family.samples:
                        out.add_sample(
                            sample.name, {**sample.labels, "replica": replica}, sample.value, sample.timestamp
                        )
            yield from merged.values()
            for name, help_text, key in (
                ("avatar_fleet_replicas", "Replicas that reported within the last 5 s", "replicas"),
                ("avatar_fleet_sessions_active", "Sessions running on all replicas", "sessions_active"),
                (
                    "avatar_fleet_free_session_slots",
                    "Sessions the fleet would still admit",
                    "free_session_slots",
                ),
            ):
                yield GaugeMetricFamily(name, help_text, value=readiness[key])

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    return generate_latest(registry)


# ------------------------------------------------------------------------------- deployment
def replica_resources(settings: Settings) -> dict[str, float]:
    fleet = settings.fleet
    gpus = fleet.num_gpus if fleet.num_gpus is not None else (1.0 if settings.device == "cuda" else 0.0)
    return {"num_cpus": fleet.num_cpus, "num_gpus": gpus}


def deployment_options(settings: Settings) -> dict[str, Any]:
    """Serve deployment options from ``settings`` (see ``ops/deploy/serve_config.yaml`` for the same in YAML)."""
    fleet = settings.fleet
    target = fleet.target_sessions_per_replica or max(0.5, 0.75 * settings.max_sessions)
    return {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": settings.max_sessions + fleet.request_headroom,
        "max_queued_requests": fleet.max_queued_requests,
        "autoscaling_config": AutoscalingConfig(
            min_replicas=fleet.min_replicas,
            initial_replicas=fleet.initial_replicas,
            max_replicas=fleet.max_replicas,
            target_ongoing_requests=target,
            upscale_delay_s=fleet.upscale_delay_s,
            downscale_delay_s=fleet.downscale_delay_s,
            metrics_interval_s=min(2.0, fleet.upscale_delay_s or 2.0),
            look_back_period_s=max(2.0, fleet.upscale_delay_s),
        ),
        "graceful_shutdown_timeout_s": fleet.drain_timeout_s,
        "graceful_shutdown_wait_loop_s": 1.0,
        "health_check_period_s": fleet.health_check_period_s,
        "health_check_timeout_s": fleet.health_check_timeout_s,
        "ray_actor_options": replica_resources(settings),
        "request_router_config": RequestRouterConfig(request_router_class=SessionAffinityRouter),
    }


def build_application(
    settings: Settings,
    *,
    app_factory: str = DEFAULT_APP_FACTORY,
    engine_factory: str = DEFAULT_ENGINE_FACTORY,
) -> Any:
    """The Serve application (``serve.run`` it) of replicas of ``app_factory`` around ``engine_factory``."""
    ingress = serve.ingress()(AvatarReplica)
    deployment = serve.deployment(ingress).options(**deployment_options(settings))
    return deployment.bind(_settings_json(settings), app_factory, engine_factory)


def app_builder(args: dict[str, Any]) -> Any:
    """Serve application builder for a config file (``import_path: avatar_server.fleet:app_builder``,
    see ``ops/deploy/serve_config.yaml``): settings from ``AVATAR_SERVER_*`` (the runtime
    environment), ``args`` on top (``{"engine": "full", "fleet": {"max_replicas": 8}}``).
    Deployment options in the config file override those computed here."""
    base = Settings()
    fleet_args = args.get("fleet") or {}
    top = {key: value for key, value in args.items() if key != "fleet"}
    return build_application(Settings(**top, fleet={**base.fleet.model_dump(), **fleet_args}))


def _settings_json(settings: Settings) -> str:
    """The settings as JSON with secrets in clear (``model_dump_json`` masks ``SecretStr``)."""
    data = settings.model_dump(mode="json")
    if settings.api_key is not None:
        data["api_key"] = settings.api_key.get_secret_value()
    if settings.auth.token_secret is not None:
        data["auth"]["token_secret"] = settings.auth.token_secret.get_secret_value()
    return json.dumps(data)


def start(
    settings: Settings,
    *,
    address: str | None = None,
    num_cpus: float | None = None,
    app_factory: str = DEFAULT_APP_FACTORY,
    engine_factory: str = DEFAULT_ENGINE_FACTORY,
) -> Any:
    """Join the Ray cluster at ``address`` (none: start a local one with ``num_cpus``), start
    Serve's proxy on ``fleet.http_host:http_port`` and deploy; returns the control actor."""
    if not ray.is_initialized():
        root = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        kwargs: dict[str, Any] = {
            "runtime_env": {"env_vars": {"PYTHONPATH": path}},
            "include_dashboard": False,
        }
        if address is None:
            kwargs["num_cpus"] = num_cpus
        ray.init(address=address, logging_level=logging.WARNING, **kwargs)
    fleet = settings.fleet
    serve.start(http_options=HTTPOptions(host=fleet.http_host, port=fleet.http_port))
    control = control_actor()
    ray.get(control.is_draining.remote())
    serve.run(
        build_application(settings, app_factory=app_factory, engine_factory=engine_factory),
        name=fleet.app_name,
        route_prefix="/",
        blocking=False,
    )
    return control


def drain_and_stop(settings: Settings, control: Any, *, timeout_s: float | None = None) -> None:
    """Graceful end: every replica drains its sessions (``drain_timeout_s``), then the app,
    Serve and the control actor go."""
    timeout_s = (
        settings.drain_timeout_s + 2 * settings.fleet.report_period_s + 5 if timeout_s is None else timeout_s
    )
    ray.get(control.drain.remote())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        snapshot = ray.get(control.snapshot.remote())
        if sum(rep["sessions_active"] for rep in snapshot.values()) == 0:
            break
        time.sleep(settings.fleet.report_period_s / 2)
    stop(settings)


def stop(settings: Settings) -> None:
    with contextlib.suppress(Exception):
        serve.delete(settings.fleet.app_name)
    with contextlib.suppress(Exception):
        serve.shutdown()
    with contextlib.suppress(Exception):
        ray.kill(ray.get_actor(CONTROL_ACTOR, namespace=CONTROL_NAMESPACE))


# ------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="avatar-server fleet",
        description=(
            "Run the server as a Ray Serve fleet (pip install -e '.[fleet]'). Server settings come from "
            "AVATAR_SERVER_* as for `serve`; fleet settings from the flags below or AVATAR_SERVER_FLEET__*."
        ),
    )
    p.add_argument(
        "--address", help="join this Ray cluster (e.g. auto, ray://head:10001); default: start a local one"
    )
    p.add_argument("--num-cpus", type=float, help="CPUs of the local Ray cluster (default: all)")
    p.add_argument("--engine", help="engine preset (preview, testpattern, full)")
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--max-sessions", type=int, help="sessions per replica")
    p.add_argument("--min-replicas", type=int)
    p.add_argument("--max-replicas", type=int)
    p.add_argument("--target-sessions-per-replica", type=float)
    p.add_argument("--drain-timeout-s", type=float, help="replica drain limit on scale-down and redeploy")
    p.add_argument("--host", dest="http_host", help="address of Serve's HTTP proxy (default 127.0.0.1)")
    p.add_argument("--port", dest="http_port", type=int, help="port of Serve's HTTP proxy (default 8000)")
    p.add_argument("--app-factory", default=DEFAULT_APP_FACTORY, help=argparse.SUPPRESS)
    p.add_argument("--engine-factory", default=DEFAULT_ENGINE_FACTORY, help=argparse.SUPPRESS)
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    top = {
        name: getattr(args, name)
        for name in ("engine", "device", "max_sessions")
        if getattr(args, name) is not None
    }
    fleet_names = ("min_replicas", "max_replicas", "target_sessions_per_replica", "http_host", "http_port")
    fleet = {name: getattr(args, name) for name in fleet_names if getattr(args, name) is not None}
    if args.drain_timeout_s is not None:
        fleet["drain_timeout_s"] = args.drain_timeout_s
    base = Settings()
    return Settings(**top, fleet={**base.fleet.model_dump(), **fleet}) if fleet else Settings(**top)


def main(argv: Sequence[str] | None = None) -> int:
    """``avatar-server fleet``: deploy, then run until SIGINT/SIGTERM (which drain the fleet)."""
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    control = start(
        settings,
        address=args.address,
        num_cpus=args.num_cpus,
        app_factory=args.app_factory,
        engine_factory=args.engine_factory,
    )
    fleet = settings.fleet
    print(f"avatar-server fleet: serving on http://{fleet.http_host}:{fleet.http_port}/", flush=True)
    stop_requested = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop_requested:
        time.sleep(0.2)
    logger.info("draining the fleet")
    drain_and_stop(settings, control)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
