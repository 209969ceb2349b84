"""The fleet's overhead, measured in one run (issue 13), on this machine's CPU with the test-pattern engine:

* ``session.start`` -> ``session.ready`` and ``speak`` -> ``speak.started`` (the utterance's first
  frame leaving the server) through the fleet (Serve's proxy, one replica) and through one plain
  server (uvicorn), medians of ``--sessions`` sessions each, and their ratio;
* the Serve proxy's CPU per streaming session (signalling only: media bypasses it): its CPU time
  over ``--window-s`` with ``--sessions`` sessions streaming, minus the same window idle;
* the time from asking for a second replica to it being ready (reported by the fleet's ``/readyz``).

    python -m ops.bench_fleet --sessions 3 --out ops/results/<date>_cpu-fleet.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import socket
import statistics
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
from PIL import Image

from avatar_server.app import build_app
from avatar_server.server import create_engine
from avatar_server.settings import FleetSettings, Settings
from clients.client import AvatarClient


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 120, 80)).save(out, format="PNG")
    return out.getvalue()


async def _one_session(url: str, image: bytes) -> dict[str, float]:
    client = AvatarClient(url, keep_audio=False)
    await client.connect()
    started = time.perf_counter()
    await client.start_session(image)
    ready_s = time.perf_counter() - started
    await client.start_media(timeout_s=30)
    await asyncio.sleep(1.0)  # the first idle segment plays
    spoken = time.perf_counter()
    await client.speak("u1", ["Hello there, this is a short test."])
    await client.wait_for("speak.started", timeout_s=60)
    first_frame_s = time.perf_counter() - spoken
    await client.close()
    return {"start_to_ready_s": ready_s, "speak_to_first_frame_s": first_frame_s}


async def _latencies(url: str, sessions: int) -> dict[str, float]:
    image = _png()
    runs = [await _one_session(url, image) for _ in range(sessions)]
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def _readyz(port: int) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            return json.loads(exc.read())
        except ValueError:
            return {}
    except (OSError, ValueError):
        return {}


def _wait(predicate, timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.1)
    raise TimeoutError("condition not reached")


def _proxy_process() -> psutil.Process:
    for proc in psutil.process_iter(["cmdline"]):
        if any("ProxyActor" in part for part in proc.info["cmdline"] or ()):
            return proc
    raise RuntimeError("no Serve proxy process found")


async def _proxy_cpu_per_session(port: int, sessions: int, window_s: float) -> dict[str, float]:
    proxy = _proxy_process()

    def cpu_s() -> float:
        times = proxy.cpu_times()
        return times.user + times.system

    before = cpu_s()
    await asyncio.sleep(window_s)
    idle = (cpu_s() - before) / window_s
    image = _png()
    clients = []
    for _ in range(sessions):
        client = AvatarClient(f"http://127.0.0.1:{port}/", keep_audio=False)
        await client.connect()
        await client.start_session(image)
        await client.start_media(timeout_s=30)
        clients.append(client)
    before = cpu_s()
    await asyncio.sleep(window_s)
    busy = (cpu_s() - before) / window_s
    for client in clients:
        await client.close()
    return {
        "proxy_cpu_idle_fraction": idle,
        "proxy_cpu_streaming_fraction": busy,
        "proxy_cpu_per_session_fraction": (busy - idle) / sessions,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    from avatar_server import fleet

    settings = Settings(engine="testpattern", port=0, max_sessions=max(2, args.sessions))
    server = build_app(settings, create_engine(settings))
    await server.start()
    for _ in range(2400):  # the warm-up runs on this event loop
        if server.readiness()[0]:
            break
        await asyncio.sleep(0.05)
    plain = await _latencies(f"http://127.0.0.1:{server.port}/", args.sessions)
    await server.close()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    fleet_settings = settings.model_copy(
        update={
            "fleet": FleetSettings(
                num_cpus=0.5, report_period_s=0.5, http_port=port, min_replicas=1, max_replicas=1
            )
        }
    )
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        fleet.start(fleet_settings)
        await asyncio.to_thread(
            _wait, lambda: _readyz(port).get("free_session_slots") == settings.max_sessions, 180
        )
        through_fleet = await _latencies(f"http://127.0.0.1:{port}/", args.sessions)
        proxy = await _proxy_cpu_per_session(port, args.sessions, args.window_s)
        two = fleet_settings.model_copy(
            update={"fleet": fleet_settings.fleet.model_copy(update={"min_replicas": 2, "max_replicas": 2})}
        )
        asked = time.monotonic()
        serve.run(fleet.build_application(two), name=two.fleet.app_name, route_prefix="/", blocking=False)
        await asyncio.to_thread(
            _wait,
            lambda: (
                (view := _readyz(port)).get("replicas") == 2
                and view["free_session_slots"] == 2 * settings.max_sessions
            ),
            300,
        )
        new_replica_ready_s = time.monotonic() - asked
    finally:
        fleet.stop(fleet_settings)
        ray.shutdown()
    return {
        "engine": "testpattern",
        "sessions": args.sessions,
        "plain": plain,
        "fleet": through_fleet,
        "ratio_fleet_over_plain": {key: through_fleet[key] / plain[key] for key in plain},
        **proxy,
        "new_replica_ready_s": new_replica_ready_s,
        "machine": {"cpus": psutil.cpu_count(), "load_avg_1m": psutil.getloadavg()[0]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--window-s", type=float, default=10.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
