"""The HTTP/WebSocket layer side by side: the ``websockets``-hook server of another checkout
(``--old-dir``, e.g. ``git worktree add --detach /tmp/old main``) and this checkout's ASGI
server (FastAPI + uvicorn), each in a child process with the same test-pattern engine
(:func:`ops.measure_live.build_marked_engine`, 0.2 s per segment) on the same machine, in
alternating rounds.

Per server:

* **accept -> session.ready**: from opening the WebSocket (TCP connect included) to receiving
  ``session.ready`` for a ``session.start`` with a 64x48 PNG, sequentially, ms;
* **speak -> first frame**: :func:`ops.measure_live.measure` over WebRTC (``speak.started``
  and the first audio of the speech at the client), ms;
* **CPU per streaming session**: the server process's user+system CPU seconds per wall second
  while ``--sessions`` sessions stream media over WebRTC to clients in this process, divided by
  the number of sessions (the engine's own thread included: the same for both servers);
* **idle WebSockets**: ``--idle`` WebSockets opened without a session, first thing after the
  server is ready, how many the server holds, and its RSS growth per connection (bytes).

Ratios are new / old (below 1: the new stack is faster or smaller).

Usage::

    git worktree add --detach /tmp/old main
    python -m ops.measure_http --old-dir /tmp/old --out ops/results/2026-12-06_cpu-http-stack.json
    git worktree remove /tmp/old
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from ops._process import stop_process
from ops.measure_live import DEFAULT_IMAGE, measure, summary

REPO_DIR = Path(__file__).resolve().parents[1]
SERVER_ENV = {  # room for the idle-connection count; the same for both servers
    "AVATAR_SERVER_LIMITS__MAX_CONNECTIONS": "4000",
    "AVATAR_SERVER_LIMITS__MAX_CONNECTIONS_PER_ADDRESS": "4000",
    "AVATAR_SERVER_LIMITS__MAX_SESSIONS_PER_ADDRESS": "16",
    "AVATAR_SERVER_LIMITS__SESSION_START_TIMEOUT_S": "600",
    "AVATAR_SERVER_MAX_SESSIONS": "16",
    "AVATAR_SERVER_MAX_ENGINE_UTILIZATION": "10",
}


def _png_b64() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 120, 80)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class PeakRss:
    """The peak resident memory of process ``pid`` (bytes) while the ``async with`` block runs,
    sampled every ``period_s`` seconds."""

    def __init__(self, pid: int, period_s: float = 0.1) -> None:
        self.process, self.period_s = psutil.Process(pid), period_s
        self.peak_bytes = self.process.memory_info().rss
        self._task: asyncio.Task | None = None

    async def _sample(self) -> None:
        while True:
            self.peak_bytes = max(self.peak_bytes, self.process.memory_info().rss)
            await asyncio.sleep(self.period_s)

    async def __aenter__(self) -> PeakRss:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def write_result(result: dict, out: Path | None) -> None:
    """Print ``result`` as JSON and write it to ``out`` when given."""
    text = json.dumps(result, indent=2)
    if out is not None:
        out.write_text(text + "\n")
    print(text)


@contextlib.asynccontextmanager
async def server_process(repo_dir: Path, *, engine: str = "testpattern", timeout_s: float = 300.0):
    """The server of the checkout at ``repo_dir`` in a child process (``ops.measure_live
    --serve ENGINE``); yields ``(url, pid)``."""
    env = {**os.environ, **SERVER_ENV, "PYTHONPATH": str(repo_dir)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ops.measure_live", "--serve", engine, "--delay-s", "0.2",
        stdout=asyncio.subprocess.PIPE,
        cwd=str(repo_dir),
        env=env,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(timeout_s):
            while True:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    raise RuntimeError(f"server of {repo_dir} exited with {await proc.wait()}")
                if line.startswith("URL "):
                    break
        yield line.split()[1], proc.pid
    finally:
        await stop_process(proc, 20)


async def accept_to_ready_ms(ws_url: str, count: int) -> list[float]:
    from websockets.asyncio.client import connect

    start = json.dumps({"type": "session.start", "image": _png_b64()})
    times = []
    for _ in range(count):
        began = time.perf_counter()
        async with connect(ws_url, max_size=None) as ws:
            await ws.send(start)
            while json.loads(await ws.recv())["type"] != "session.ready":
                pass
            times.append(1000 * (time.perf_counter() - began))
        await asyncio.sleep(0.2)  # the session is released before the next one
    return times


async def cpu_per_session(url: str, pid: int, image: bytes, sessions: int, window_s: float) -> dict[str, Any]:
    from clients.client import AvatarClient

    proc = psutil.Process(pid)
    clients = [AvatarClient(url) for _ in range(sessions)]
    try:
        for client in clients:
            await client.connect()
            await client.start_session(image, "A person.", timeout_s=60)
            await client.start_media(timeout_s=60)
        await asyncio.sleep(2.0)  # past the first segments
        before, began = proc.cpu_times(), time.monotonic()
        await asyncio.sleep(window_s)
        after, wall_s = proc.cpu_times(), time.monotonic() - began
        frames = [len(c.received.video) for c in clients]
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()
    cpu_s = (after.user - before.user) + (after.system - before.system)
    return {
        "sessions": sessions,
        "window_s": round(wall_s, 2),
        "cpu_fraction_per_session": round(cpu_s / wall_s / sessions, 4),
        "video_frames_received": frames,
    }


async def idle_connections(ws_url: str, pid: int, count: int) -> dict[str, Any]:
    from websockets.asyncio.client import connect

    proc = psutil.Process(pid)
    await asyncio.sleep(1.0)
    rss_before = proc.memory_info().rss
    opened = []
    try:
        for _ in range(count):
            try:
                opened.append(await connect(ws_url, open_timeout=20, ping_interval=None))
            except Exception:
                break
        await asyncio.sleep(2.0)
        held = sum(1 for ws in opened if ws.close_code is None)
        rss_after = proc.memory_info().rss
    finally:
        await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)
    return {
        "opened": len(opened),
        "held": held,
        "rss_before_bytes": rss_before,
        "rss_growth_bytes": rss_after - rss_before,
        "rss_per_connection_bytes": round((rss_after - rss_before) / max(1, held)),
    }


async def measure_server(repo_dir: Path, args: argparse.Namespace, image: bytes) -> dict[str, Any]:
    async with server_process(repo_dir) as (url, pid):
        ws_url = url.replace("http", "ws", 1) + "ws"
        # idle connections first: memory that closed sessions free later would hide their cost
        idle = await idle_connections(ws_url, pid, args.idle)
        await accept_to_ready_ms(ws_url, 3)  # warm-up, not counted
        ready = await accept_to_ready_ms(ws_url, args.accepts)
        live = await measure(url, image, utterances=args.utterances, interrupts=0, warm_s=2.0)
        cpu = await cpu_per_session(url, pid, image, args.sessions, args.window_s)
    return {
        "accept_to_ready_ms": ready,
        "ttff_speak_started_ms": live["ttff_speak_started_ms"],
        "ttff_speech_audio_ms": live["ttff_speech_audio_ms"],
        "underruns": live["underruns"],
        "cpu": cpu,
        "idle": idle,
    }


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def _ratio(new: float | None, old: float | None) -> float | None:
    return None if new is None or not old else round(new / old, 3)


def combine(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per server: all samples of every round, their summaries, and new/old ratios."""
    out: dict[str, Any] = {}
    for name in ("old", "new"):
        runs = [r[name] for r in rounds]
        ready = [v for r in runs for v in r["accept_to_ready_ms"]]
        speak = [r["ttff_speak_started_ms"]["median"] for r in runs if r["ttff_speak_started_ms"].get("median") is not None]
        audio = [r["ttff_speech_audio_ms"]["median"] for r in runs if r["ttff_speech_audio_ms"].get("median") is not None]
        cpu = [r["cpu"]["cpu_fraction_per_session"] for r in runs]
        per_conn = [r["idle"]["rss_per_connection_bytes"] for r in runs]
        out[name] = {
            "accept_to_ready_ms": summary(ready),
            "speak_to_speak_started_ms_medians": speak,
            "speak_to_first_speech_audio_ms_medians": audio,
            "cpu_fraction_per_session": cpu,
            "idle_connections_held": [r["idle"]["held"] for r in runs],
            "rss_per_idle_connection_bytes": per_conn,
            "underruns": [r["underruns"] for r in runs],
            "rounds": runs,
        }
    old, new = out["old"], out["new"]
    out["ratios_new_over_old"] = {
        "accept_to_ready_median": _ratio(new["accept_to_ready_ms"]["median"], old["accept_to_ready_ms"]["median"]),
        "speak_to_speak_started_median": _ratio(
            _median(new["speak_to_speak_started_ms_medians"]), _median(old["speak_to_speak_started_ms_medians"])
        ),
        "speak_to_first_speech_audio_median": _ratio(
            _median(new["speak_to_first_speech_audio_ms_medians"]), _median(old["speak_to_first_speech_audio_ms_medians"])
        ),
        "cpu_per_session_median": _ratio(_median(new["cpu_fraction_per_session"]), _median(old["cpu_fraction_per_session"])),
        "rss_per_idle_connection_median": _ratio(
            _median(new["rss_per_idle_connection_bytes"]), _median(old["rss_per_idle_connection_bytes"])
        ),
    }
    return out


async def _main(args: argparse.Namespace, image: bytes) -> dict[str, Any]:
    rounds = []
    for number in range(args.rounds):
        order = [("old", Path(args.old_dir)), ("new", REPO_DIR)]
        if number % 2:
            order.reverse()
        result: dict[str, Any] = {}
        for name, repo_dir in order:
            print(f"round {number + 1}: {name} server ({repo_dir})", file=sys.stderr, flush=True)
            result[name] = await measure_server(repo_dir, args, image)
        rounds.append(result)
    combined = combine(rounds)
    return {
        "schema": "avatar-server-http-stack/1",
        "date": dt.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "old_dir": str(args.old_dir),
        "settings": {**SERVER_ENV, "engine": "testpattern (marked), 0.2 s per segment"},
        "args": {k: v for k, v in vars(args).items() if k not in ("out",)},
        **combined,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old-dir", required=True, help="checkout of the server to compare with (e.g. main)")
    parser.add_argument("--image", default=str(DEFAULT_IMAGE))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--accepts", type=int, default=15)
    parser.add_argument("--utterances", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=2)
    parser.add_argument("--window-s", type=float, default=10.0)
    parser.add_argument("--idle", type=int, default=500)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = asyncio.run(_main(args, Path(args.image).read_bytes()))
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    ratios = result["ratios_new_over_old"]
    print(json.dumps(ratios, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
