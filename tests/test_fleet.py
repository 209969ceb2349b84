"""The fleet on Ray Serve (issue 13): a local Ray cluster, CPU replicas, WebSocket clients
through Serve's proxy. Slow (a Ray cluster starts once for the module, each test deploys).

The replicas run the stand-in app of ``tests/fleet_support.py`` until ``create_app`` of the
ASGI server is merged; routing, capacity, failure, autoscaling and drain are Ray Serve's and
:mod:`avatar_server.fleet`'s, not the stand-in's.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

from avatar_server import fleet  # noqa: E402
from avatar_server.settings import FleetSettings, Settings  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.fleet, pytest.mark.timeout(300)]

APP_FACTORY = "tests.fleet_support:create_app"
ENGINE_FACTORY = "tests.fleet_support:create_engine"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield port
    finally:
        fleet.stop(Settings())
        ray.shutdown()


def readyz(port: int) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


def wait_for(predicate, timeout_s: float, period_s: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(period_s)
    return False


@pytest.fixture
def deploy(cluster):
    """``deploy(**settings)`` -> the proxy's port, once the fleet reports its replicas."""
    deployed: list[Settings] = []

    def run(replicas: int, fleet_options: dict[str, Any], **settings: Any) -> int:
        config = Settings(
            engine="testpattern",
            session_resume_grace_s=10,
            **settings,
            fleet=FleetSettings(num_cpus=0.25, report_period_s=0.5, http_port=cluster, **fleet_options),
        )
        control = fleet.control_actor()
        ray.get(control.is_draining.remote())
        serve.run(
            fleet.build_application(config, app_factory=APP_FACTORY, engine_factory=ENGINE_FACTORY),
            name=config.fleet.app_name,
            route_prefix="/",
            blocking=False,
        )
        deployed.append(config)
        assert wait_for(lambda: readyz(cluster).get("replicas") == replicas, 120), readyz(cluster)
        return cluster

    yield run
    for config in deployed:
        serve.delete(config.fleet.app_name)
        ray.kill(ray.get_actor(fleet.CONTROL_ACTOR, namespace=fleet.CONTROL_NAMESPACE))


class Client:
    """One WebSocket session through the proxy; records ``stats`` arrival times."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ws = None
        self.ready: dict[str, Any] | None = None
        self.stats: list[tuple[float, int]] = []  # (arrival time, frames)
        self.messages: list[dict[str, Any]] = []
        self.reader: asyncio.Task | None = None

    async def open(self, session_id_header: str | None = None) -> None:
        headers = {fleet.SESSION_HEADER: session_id_header} if session_id_header else None
        self.ws = await connect(f"ws://127.0.0.1:{self.port}/ws", additional_headers=headers, open_timeout=20)

    async def start(self, session_id_header: str | None = None) -> dict[str, Any]:
        await self.open(session_id_header)
        await self.ws.send(json.dumps({"type": "session.start", "image": "x"}))
        reply = json.loads(await asyncio.wait_for(self.ws.recv(), 20))
        if reply["type"] == "session.ready":
            self.ready = reply
            self.reader = asyncio.get_running_loop().create_task(self._read(self.ws))
        return reply

    async def _read(self, ws) -> None:
        try:
            async for raw in ws:
                message = json.loads(raw)
                if message["type"] == "stats":
                    self.stats.append((time.monotonic(), message["frames"]))
                else:
                    self.messages.append(message)
        except Exception:  # noqa: BLE001 - the connection's end is judged by the test
            pass

    def drop(self) -> None:
        """End the WebSocket without a close frame (a network failure)."""
        self.ws.transport.abort()

    async def resume(self) -> dict[str, Any]:
        assert self.ready is not None
        await self.open(self.ready["session_id"])
        await self.ws.send(json.dumps({"type": "session.resume", "resume_token": self.ready["resume_token"]}))
        reply = json.loads(await asyncio.wait_for(self.ws.recv(), 20))
        if reply["type"] == "session.resumed":
            self.ready = {**self.ready, **reply}
            self.reader = asyncio.get_running_loop().create_task(self._read(self.ws))
        return reply

    async def end(self) -> None:
        await self.ws.send(json.dumps({"type": "session.end"}))
        await asyncio.wait_for(self.reader, 10)

    def largest_gap_s(self, since: float) -> float:
        times = [t for t, _ in self.stats if t >= since]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=float("inf"))


async def test_sessions_spread_and_a_full_fleet_refuses_at_once(deploy) -> None:
    port = deploy(3, {"min_replicas": 3, "max_replicas": 3}, max_sessions=1)
    clients = [Client(port) for _ in range(3)]
    for client in clients:
        assert (await client.start())["type"] == "session.ready"
    assert len({client.ready["pid"] for client in clients}) == 3  # one session on each replica
    assert wait_for(lambda: readyz(port)["free_session_slots"] == 0, 10), readyz(port)
    fourth = Client(port)
    started = time.monotonic()
    reply = await fourth.start()
    assert reply["type"] == "error" and reply["code"] == "capacity"
    assert time.monotonic() - started < 1.0
    for client in clients:
        await client.end()
    assert wait_for(lambda: readyz(port)["free_session_slots"] == 3, 10), readyz(port)


async def test_a_dropped_websocket_resumes_on_its_replica(deploy) -> None:
    port = deploy(3, {"min_replicas": 3, "max_replicas": 3}, max_sessions=2)
    first = Client(port)
    assert (await first.start())["type"] == "session.ready"
    # A second session on the same replica (routed by the first one's session id), so that routing
    # by load alone would send the resume to one of the two empty replicas.
    neighbour = Client(port)
    assert (await neighbour.start(session_id_header=first.ready["session_id"]))["type"] == "session.ready"
    assert neighbour.ready["pid"] == first.ready["pid"]
    await asyncio.sleep(0.5)
    frames_before = first.stats[-1][1]
    first.drop()
    await asyncio.sleep(1.0)
    reply = await first.resume()
    assert reply["type"] == "session.resumed", reply
    assert reply["pid"] == first.ready["pid"] and reply["session_id"] == first.ready["session_id"]
    resumed_at = time.monotonic()
    await asyncio.sleep(1.0)
    after = [frames for t, frames in first.stats if t >= resumed_at]
    assert after and after[0] > frames_before + 5  # the same session kept counting while parked
    assert first.largest_gap_s(resumed_at) < 0.5
    await first.end()
    await neighbour.end()
