"""The fleet on Ray Serve (issue 13): a local Ray cluster (started once for the module), CPU
replicas of the server (``create_app`` around the test-pattern engine), real WebRTC clients
(:class:`clients.client.AvatarClient`, and the browser page in headless Chromium) signalling
through Serve's proxy.

Which replica holds a session is read from the fleet's control actor (the same lookup the
router makes); each replica is a process of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import pickle
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")
from PIL import Image  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve._private.common import RequestMetadata, RequestProtocol, StreamingHTTPRequest  # noqa: E402
from ray.serve.request_router import PendingRequest  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

from avatar_server import fleet  # noqa: E402
from avatar_server.settings import FleetSettings, Settings  # noqa: E402
from clients.client import AvatarClient  # noqa: E402
from tests.browser_support import CHROMIUM, CHROMIUM_ARGS, STATS_JS, require_browser  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.fleet, pytest.mark.timeout(400)]


def png_bytes() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 120, 80)).save(out, format="PNG")
    return out.getvalue()


PNG = png_bytes()


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
    except urllib.error.HTTPError as exc:  # 503: not ready (JSON), or Serve's own answer before the app is up
        try:
            return json.loads(exc.read())
        except ValueError:
            return {}
    except (OSError, ValueError):
        return {}


def http_text(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.read().decode()


async def wait_for(predicate, timeout_s: float, period_s: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await asyncio.to_thread(predicate):
            return True
        await asyncio.sleep(period_s)
    return False


def home(session_id: str) -> str | None:
    control = ray.get_actor(fleet.CONTROL_ACTOR, namespace=fleet.CONTROL_NAMESPACE)
    return ray.get(control.home_of.remote(session_id))


@pytest.fixture
def deploy(cluster):
    """``await deploy(replicas, fleet_options, **settings)`` -> the proxy's port, once the fleet
    reports ``replicas`` replicas with free slots."""
    deployed: list[Settings] = []

    async def run(replicas: int, fleet_options: dict[str, Any], **settings: Any) -> int:
        config = Settings(
            engine="testpattern",
            session_resume_grace_s=10,
            **settings,
            fleet=FleetSettings(
                report_period_s=0.5,
                http_port=cluster,
                **{"num_cpus": 0.25, "drain_timeout_s": 10.0, **fleet_options},
            ),
        )
        control = fleet.control_actor()
        ray.get(control.is_draining.remote())
        await asyncio.to_thread(
            serve.run,
            fleet.build_application(config),
            name=config.fleet.app_name,
            route_prefix="/",
            blocking=False,
        )
        deployed.append(config)
        ok = await wait_for(
            lambda: (
                (view := readyz(cluster)).get("replicas") == replicas
                and view["free_session_slots"] == replicas * config.max_sessions
            ),
            180,
        )
        assert ok, readyz(cluster)
        return cluster

    yield run
    for name in {config.fleet.app_name for config in deployed}:
        serve.delete(name)
    with contextlib.suppress(ValueError):
        ray.kill(ray.get_actor(fleet.CONTROL_ACTOR, namespace=fleet.CONTROL_NAMESPACE))


async def media_client(port: int, **kwargs: Any) -> AvatarClient:
    client = AvatarClient(f"http://127.0.0.1:{port}/", keep_audio=False, **kwargs)
    await client.connect()
    await client.start_session(PNG)
    await client.start_media(timeout_s=30)
    return client


def frames_after(client: AvatarClient, since_s: float) -> list[float]:
    return [record.arrival_s for record in client.received.video if record.arrival_s >= since_s]


def largest_gap_s(client: AvatarClient, since_s: float, until_s: float) -> float:
    times = [since_s, *(t for t in frames_after(client, since_s) if t <= until_s), until_s]
    return max(b - a for a, b in zip(times, times[1:], strict=False))


async def test_sessions_spread_and_a_full_fleet_refuses_at_once(deploy) -> None:
    port = await deploy(3, {"min_replicas": 3, "max_replicas": 3}, max_sessions=1)
    clients = [await media_client(port) for _ in range(3)]
    try:
        homes = {home(client.session.session_id) for client in clients}
        assert len(homes) == 3 and None not in homes  # one session on each replica
        assert await wait_for(lambda: readyz(port).get("free_session_slots") == 0, 10), readyz(port)
        metrics = await asyncio.to_thread(http_text, port, "/metrics")
        assert "avatar_fleet_replicas 3.0" in metrics and "avatar_fleet_sessions_active 1.0" not in metrics
        labelled = re.findall(r'avatar_server_sessions_active\{replica="(\w+)"\} 1\.0', metrics)
        assert sorted(labelled) == sorted(homes)  # each replica's own metrics, labelled by replica
        fourth = AvatarClient(f"http://127.0.0.1:{port}/")
        await fourth.connect()
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="capacity"):
            await fourth.start_session(PNG, timeout_s=10)
        assert time.monotonic() - started < 1.0
        await fourth.close()
        assert await wait_for(lambda: all(len(client.received.video) > 10 for client in clients), 30)
    finally:
        for client in clients:
            await client.close()
    assert await wait_for(lambda: readyz(port).get("free_session_slots") == 3, 20), readyz(port)


async def test_a_dropped_websocket_resumes_on_its_replica(deploy) -> None:
    port = await deploy(3, {"min_replicas": 3, "max_replicas": 3}, max_sessions=2)
    first = await media_client(port)
    session_id = first.session.session_id
    # A second session on the same replica (routed by the first one's session id), so that
    # routing by load alone would send the resume to one of the two empty replicas.
    headers = {fleet.SESSION_HEADER: session_id}
    async with connect(f"ws://127.0.0.1:{port}/ws", additional_headers=headers, max_size=None) as neighbour:
        import base64

        await neighbour.send(json.dumps({"type": "session.start", "image": base64.b64encode(PNG).decode()}))
        while (reply := json.loads(await neighbour.recv()))["type"] != "session.ready":
            assert reply["type"] != "error", reply
        assert home(reply["session_id"]) == home(session_id)
        try:
            await asyncio.sleep(1.0)
            before = len(first.received.video)
            resumed = await first.resume()  # drops the old WebSocket without a close frame
            resumed_at = time.monotonic()
            assert resumed.session_id == session_id and resumed.peer_connection == "connected"
            assert home(session_id) == home(reply["session_id"])
            await asyncio.sleep(2.0)
            assert len(first.received.video) > before + 20  # the same peer connection keeps playing
            assert largest_gap_s(first, resumed_at, resumed_at + 2.0) < 0.5
        finally:
            await first.close()


async def start_neighbour(port: int, session_id: str) -> tuple[Any, str]:
    """A second session (a bare WebSocket) sent by ``session_id``'s header to that session's
    replica: the open WebSocket and the new session's id."""
    import base64

    ws = await connect(
        f"ws://127.0.0.1:{port}/ws", additional_headers={fleet.SESSION_HEADER: session_id}, max_size=None
    )
    await ws.send(json.dumps({"type": "session.start", "image": base64.b64encode(PNG).decode()}))
    while (reply := json.loads(await ws.recv()))["type"] != "session.ready":
        assert reply["type"] != "error", reply
    return ws, reply["session_id"]


def resumes_by_replica(port: int) -> dict[tuple[str, str], float]:
    """``avatar_server_session_resumes_total`` of the fleet's /metrics: (replica, result) -> count."""
    counts = {}
    for family in text_string_to_metric_families(http_text(port, "/metrics")):
        if family.name == "avatar_server_session_resumes":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.value > 0:
                    counts[(sample.labels["replica"], sample.labels["result"])] = sample.value
    return counts


EVENTS_OF_TYPE_JS = "(type) => window.avatarEvents.filter((m) => m.type === type)"


async def wait_page(page: Any, condition_js: str, what: str, timeout_s: float) -> None:
    """Wait for ``condition_js`` in the page; on timeout fail with what the page received."""
    from playwright.async_api import TimeoutError as PlaywrightTimeoutError

    try:
        await page.wait_for_function(condition_js, timeout=timeout_s * 1000)
    except PlaywrightTimeoutError:
        events = await page.evaluate("window.avatarEvents.filter((m) => m.type !== 'stats')")
        pytest.fail(f"no {what} within {timeout_s} s; server messages: {events}", pytrace=False)


async def test_the_browser_page_resumes_on_its_replica(deploy, media_dir: Path) -> None:
    """The page of clients/web, served through Serve's proxy by a fleet of two replicas, drops
    its WebSocket (``dropConnection()``: close code 4000, abnormal to the server). Its session
    and a neighbour fill one replica, so routing by load alone would send the resume to the
    empty one (``resume_failed``); the page names its session in ``/ws?session_id=`` (a browser
    cannot set ``X-Session-Id``) and the request router sends it home: ``session.resumed``, the
    same peer connection keeps decoding frames, and the resume is counted by that replica."""
    require_browser()
    from playwright.async_api import async_playwright

    port = await deploy(2, {"min_replicas": 2, "max_replicas": 2}, max_sessions=2)
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 800})
            sockets: list[str] = []
            page.on("websocket", lambda ws: sockets.append(ws.url))
            await page.goto(f"http://127.0.0.1:{port}/")
            await page.set_input_files("#image", str(media_dir / "portrait.png"))
            await page.click("#start")
            await wait_page(
                page,
                "() => window.avatar.pc && window.avatar.pc.connectionState === 'connected'",
                "WebRTC",
                60,
            )
            await wait_page(
                page, "() => window.avatar.figures.framesDecoded > 25", "decoded video frames", 30
            )
            session_id = (await page.evaluate(EVENTS_OF_TYPE_JS, "session.ready"))[0]["session_id"]
            origin = home(session_id)
            neighbour, neighbour_id = await start_neighbour(port, session_id)
            try:
                assert home(neighbour_id) == origin
                assert await wait_for(
                    lambda: (
                        (view := readyz(port)).get("by_replica", {}).get(origin, {}).get("free_session_slots")
                        == 0
                        and view["free_session_slots"] == 2
                    ),
                    10,
                ), readyz(port)  # the router's load view: the page's replica full, the other empty
                await page.evaluate("window.__pcBeforeDrop = window.avatar.pc")
                before = (await page.evaluate(STATS_JS))["video"]["framesDecoded"]

                await page.evaluate("window.avatar.dropConnection()")
                await wait_page(
                    page,
                    "() => window.avatarEvents.some((m) => m.type === 'session.resumed' || m.type === 'error')",
                    "answer to session.resume",
                    30,
                )
                assert not await page.evaluate(EVENTS_OF_TYPE_JS, "error")
                resumed = (await page.evaluate(EVENTS_OF_TYPE_JS, "session.resumed"))[0]
                assert resumed["session_id"] == session_id and resumed["peer_connection"] == "connected", (
                    resumed
                )
                assert sockets == [
                    f"ws://127.0.0.1:{port}/ws",
                    f"ws://127.0.0.1:{port}/ws?session_id={session_id}",
                ]
                assert home(session_id) == origin
                assert await page.evaluate("window.avatar.pc === window.__pcBeforeDrop")
                await wait_page(
                    page,
                    f"async () => (await ({STATS_JS})()).video.framesDecoded > {before + 50}",
                    "video frames after the resume",
                    20,
                )
                # the replica label: the one resume was made, and counted, by the session's replica
                assert await wait_for(lambda: resumes_by_replica(port) == {(origin, "resumed"): 1.0}, 10), (
                    resumes_by_replica(port),
                    origin,
                )
            finally:
                await neighbour.close()
        finally:
            await browser.close()


async def test_the_router_reads_the_session_of_a_proxy_request() -> None:
    """What the router sees of a request from Serve's HTTP proxy (Ray's format, checked here so
    that a Ray upgrade that changes it fails this test rather than the browser's resume): the
    pickled ``StreamingHTTPRequest`` whose scope names the session in the header or the query.
    (Async: a ``PendingRequest`` makes its future on the running loop.)"""

    def proxied(query: bytes, headers: list[tuple[bytes, bytes]], session_id: str = "") -> PendingRequest:
        scope = {"type": "websocket", "path": "/ws", "query_string": query, "headers": headers}
        request = StreamingHTTPRequest(scope, proxy_actor_name="SERVE_PROXY_ACTOR-test")
        metadata = RequestMetadata(
            request_id="r",
            internal_request_id="i",
            session_id=session_id,
            _request_protocol=RequestProtocol.HTTP,
        )
        return PendingRequest(args=[pickle.dumps(request)], kwargs={}, metadata=metadata)

    host = [(b"host", b"127.0.0.1")]
    assert fleet.request_session_id(proxied(b"token=t.u.v&session_id=s-1", host)) == "s-1"
    assert fleet.request_session_id(proxied(b"session_id=s-1", [*host, (b"x-session-id", b"s-2")])) == "s-2"
    assert fleet.request_session_id(proxied(b"", host, session_id="s-3")) == "s-3"  # Serve's own header parse
    assert fleet.request_session_id(proxied(b"", host)) == ""
    assert fleet.request_session_id(proxied(b"session_id=" + b"a" * 65, host)) == ""  # longer than any id
    assert fleet.request_session_id(proxied(b"&".join([b"a=1"] * 17) + b"&session_id=s", host)) == ""
    not_from_proxy = proxied(b"session_id=s-1", host)
    not_from_proxy.metadata = RequestMetadata(request_id="r", internal_request_id="i")  # a handle call
    assert fleet.request_session_id(not_from_proxy) == ""
    assert fleet.request_session_id(None) == ""


async def test_a_dead_replica_ends_only_its_own_session(deploy) -> None:
    port = await deploy(3, {"min_replicas": 3, "max_replicas": 3}, max_sessions=2)
    clients = [await media_client(port, auto_resume=True) for _ in range(3)]
    try:
        homes = [home(client.session.session_id) for client in clients]
        assert len(set(homes)) == 3, homes
        victim, survivors = clients[0], clients[1:]
        name = f"SERVE_REPLICA::{Settings().fleet.app_name}#{fleet.DEPLOYMENT_NAME}#{homes[0]}"
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        # its client loses the WebSocket, tries to resume and is told the session is gone
        assert await wait_for(lambda: victim.closed_reason is not None, 30), victim.closed_reason
        errors = victim.messages("error")
        assert errors and errors[-1].code == "resume_failed", errors
        assert f"fleet replica {homes[0]}) failed or was removed" in errors[-1].message
        await asyncio.sleep(max(0.0, killed_at + 5.0 - time.monotonic()))
        for client in survivors:
            assert largest_gap_s(client, killed_at, killed_at + 5.0) < 1.0
            assert not client.messages("session.ended")
        newcomer = await media_client(port)
        assert home(newcomer.session.session_id) != homes[0]
        await newcomer.close()
        # Serve brings the replica back
        assert await wait_for(lambda: readyz(port).get("replicas") == 3, 120), readyz(port)
        assert homes[0] not in readyz(port)["by_replica"]
    finally:
        for client in clients:
            await client.close()


async def test_autoscaling_follows_sessions_without_cutting_one(deploy) -> None:
    options = {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_sessions_per_replica": 1.0,
        "upscale_delay_s": 1.0,
        "downscale_delay_s": 4.0,
        "drain_timeout_s": 120.0,  # longer than the test watches the remaining session
    }
    port = await deploy(1, options, max_sessions=2)
    first, second = await media_client(port), await media_client(port)
    try:
        assert home(first.session.session_id) == home(second.session.session_id)
        upscale_started = time.monotonic()
        # the new replica is up and warm: its two slots are free
        assert await wait_for(
            lambda: (view := readyz(port)).get("replicas") == 2 and view["free_session_slots"] == 2, 120
        ), readyz(port)
        print(f"new replica ready {time.monotonic() - upscale_started:.1f} s after the load")
        third = await media_client(port)
        assert home(third.session.session_id) != home(first.session.session_id)  # the emptier replica
    finally:
        await first.close()
        await second.close()
    ended_at = time.monotonic()
    try:
        await asyncio.sleep(12.0)  # past downscale_delay_s: one replica is stopped (or waits for the session)
        assert not third.messages("session.ended")
        assert largest_gap_s(third, ended_at, ended_at + 12.0) < 1.0
    finally:
        await third.close()
    assert await wait_for(lambda: readyz(port).get("replicas") == 1, 120), readyz(port)


async def test_a_redeploy_drains_the_old_replica_without_cutting_its_session(deploy) -> None:
    """A new version (another CPU reservation) replaces the replica: the old one gets no new
    sessions, its live session plays on, and before the drain limit it ends cleanly
    (``session.ended``, reason ``shutdown``) instead of being cut when the replica stops."""
    options = {"min_replicas": 1, "max_replicas": 1, "drain_timeout_s": 15.0}
    port = await deploy(1, options, max_sessions=1, drain_timeout_s=2.0)
    client = await media_client(port)
    old = home(client.session.session_id)
    redeployed_at = time.monotonic()
    redeploy = asyncio.get_running_loop().create_task(
        deploy(1, {**options, "num_cpus": 0.3}, max_sessions=1, drain_timeout_s=2.0)
    )
    try:
        ended = await client.wait_for("session.ended", timeout_s=90)
        ended_at = time.monotonic()
        assert ended.reason == "shutdown", ended
        assert ended_at - redeployed_at > 6.0  # it played on while its replica drained
        assert largest_gap_s(client, redeployed_at, ended_at - 3.0) < 1.0
        await redeploy
        newcomer = await media_client(port)
        assert home(newcomer.session.session_id) not in (None, old)
        await newcomer.close()
    finally:
        await client.close()


def test_the_deploy_files_match_what_the_code_computes() -> None:
    """ops/deploy's Serve config and RayService are valid Serve configs, and their deployment
    options are those avatar_server.fleet computes for the same settings (no cluster needed)."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    root = __import__("pathlib").Path(__file__).resolve().parents[1] / "ops" / "deploy"
    config = yaml.safe_load((root / "serve_config.yaml").read_text())
    service = yaml.safe_load_all((root / "rayservice.yaml").read_text())
    embedded = yaml.safe_load(next(iter(service))["spec"]["serveConfigV2"])
    for document in (config, embedded):
        ServeDeploySchema.model_validate(document)
        application = document["applications"][0]
        settings = Settings(**application["args"], fleet=FleetSettings(max_replicas=8))
        options = fleet.deployment_options(settings)
        written = application["deployments"][0]
        assert written["max_ongoing_requests"] == options["max_ongoing_requests"] == 4
        assert written["max_queued_requests"] == options["max_queued_requests"]
        assert (
            written["autoscaling_config"]["target_ongoing_requests"]
            == options["autoscaling_config"].target_ongoing_requests
        )
        assert written["autoscaling_config"]["max_replicas"] == options["autoscaling_config"].max_replicas
        assert written["graceful_shutdown_timeout_s"] == options["graceful_shutdown_timeout_s"]
        assert written["ray_actor_options"] == options["ray_actor_options"]


async def test_an_engine_stall_fails_the_health_check_and_serve_replaces_the_replica(deploy) -> None:
    """Every segment takes 12 s of (simulated) generation, far over engine_stall_s: once a
    session runs, the replica's /healthz fails, Serve's health check sees it and replaces it."""
    options = {"min_replicas": 1, "max_replicas": 1, "health_check_period_s": 1.0, "drain_timeout_s": 5.0}
    port = await deploy(1, options, max_sessions=1, testpattern_delay_s=12.0, engine_stall_s=1.0)
    (stalled,) = readyz(port)["by_replica"]
    client = AvatarClient(f"http://127.0.0.1:{port}/", keep_audio=False)
    await client.connect()
    await client.start_session(PNG)
    assert home(client.session.session_id) == stalled
    replaced = await wait_for(
        lambda: (view := readyz(port)).get("replicas") == 1 and stalled not in view["by_replica"], 120
    )
    assert replaced, readyz(port)
    assert await wait_for(lambda: client.closed_reason is not None, 30)  # its session went with it
    await client.close()
