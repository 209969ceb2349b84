"""``avatar-server fleet`` drains on SIGTERM (issue 13): live sessions get ``session.ended``
(reason ``shutdown``) and a going-away close, then the fleet stops and the process exits 0.
The command starts a local Ray cluster of its own; real WebRTC clients through its proxy."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("ray")
from PIL import Image  # noqa: E402

from clients.client import AvatarClient  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.fleet, pytest.mark.timeout(400)]
ROOT = Path(__file__).resolve().parents[1]


def readyz(port: int) -> dict:
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


async def test_sigterm_drains_the_fleet() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "AVATAR_SERVER_FLEET__NUM_CPUS": "0.25",
        "AVATAR_SERVER_FLEET__REPORT_PERIOD_S": "0.5",
        "AVATAR_SERVER_DRAIN_TIMEOUT_S": "5",
    }
    command = [
        sys.executable,
        "-m",
        "avatar_server.cli",
        "fleet",
        "--num-cpus",
        "2",
        "--engine",
        "testpattern",
        "--max-sessions",
        "1",
        "--min-replicas",
        "2",
        "--max-replicas",
        "2",
        "--port",
        str(port),
    ]
    proc = await asyncio.to_thread(subprocess.Popen, command, cwd=ROOT, env=env, start_new_session=True)
    clients: list[AvatarClient] = []
    try:
        deadline = time.monotonic() + 240
        while (view := await asyncio.to_thread(readyz, port)).get("free_session_slots") != 2:
            assert proc.poll() is None, "the fleet command exited"
            assert time.monotonic() < deadline, view
            await asyncio.sleep(0.5)
        image = io.BytesIO()
        Image.new("RGB", (64, 48), (90, 160, 40)).save(image, format="PNG")
        for _ in range(2):
            client = AvatarClient(f"http://127.0.0.1:{port}/", keep_audio=False)
            clients.append(client)
            await client.connect()
            await client.start_session(image.getvalue())
            await client.start_media(timeout_s=30)
        await asyncio.sleep(1.0)
        assert all(len(client.received.video) > 5 for client in clients)
        proc.send_signal(signal.SIGTERM)
        for client in clients:
            ended = await client.wait_for("session.ended", timeout_s=60)
            assert ended.reason == "shutdown", ended
        exit_code = await asyncio.to_thread(proc.wait, 120)
        assert exit_code == 0
    finally:
        for client in clients:
            await client.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
