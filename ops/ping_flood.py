"""Issue 18's ping flood, old stack against new: one WebSocket sends 125-byte pings as fast as
TCP takes them and never reads, while another client streams a session over WebRTC. Reported
per server: its RSS before, at the peak and after the flood, how long the flooding connection
lasted, and the streaming session's underruns (``stats.underruns``) before and after.

Usage::

    git worktree add --detach /tmp/old main
    python -m ops.ping_flood --old-dir /tmp/old --out ops/results/2026-12-06_cpu-ping-flood.json
    git worktree remove /tmp/old
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from ops.measure_http import REPO_DIR, PeakRss, server_process, write_result
from ops.measure_live import DEFAULT_IMAGE


def _ping(payload: bytes) -> bytes:
    mask = os.urandom(4)
    return bytes([0x89, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def _flooder(url: str, seconds: float) -> dict[str, Any]:
    """Open a WebSocket by hand, send pings for ``seconds`` without reading; returns how long
    the server kept it and how much was sent."""
    parts = urlsplit(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /ws HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    await writer.drain()
    await reader.readuntil(b"\r\n\r\n")
    burst = _ping(b"p" * 125) * 256
    sent = 0
    started = time.monotonic()
    cut_s = None
    try:
        while time.monotonic() - started < seconds:
            writer.write(burst)
            sent += len(burst)
            try:
                await asyncio.wait_for(writer.drain(), 0.5)
            except TimeoutError:
                pass
    except ConnectionError:
        cut_s = time.monotonic() - started
    finally:
        writer.transport.abort()
    return {"sent_bytes": sent, "connection_cut_after_s": None if cut_s is None else round(cut_s, 2)}


async def run_one(repo_dir: Path, image: bytes, flood_s: float) -> dict[str, Any]:
    from clients.client import AvatarClient

    async with server_process(repo_dir) as (url, pid):
        proc = psutil.Process(pid)
        client = AvatarClient(url)
        await client.connect()
        try:
            await client.start_session(image, "A person.", timeout_s=60)
            await client.start_media(timeout_s=60)
            await asyncio.sleep(5.0)
            underruns_before = client.messages("stats")[-1].underruns
            rss_before = proc.memory_info().rss
            async with PeakRss(pid) as rss:
                flood = await _flooder(url, flood_s)
                await asyncio.sleep(3.0)
            peak = rss.peak_bytes
            underruns_after = client.messages("stats")[-1].underruns
            rss_after = proc.memory_info().rss
        finally:
            await client.close()
    return {
        **flood,
        "rss_before_bytes": rss_before,
        "rss_peak_bytes": peak,
        "rss_after_bytes": rss_after,
        "session_underruns_before": underruns_before,
        "session_underruns_after": underruns_after,
    }


async def _main(args: argparse.Namespace, image: bytes) -> dict[str, Any]:
    results = {}
    for name, repo_dir in (("old", Path(args.old_dir)), ("new", REPO_DIR)):
        print(f"{name} server ({repo_dir})", file=sys.stderr, flush=True)
        results[name] = await run_one(repo_dir, image, args.flood_s)
    return {
        "schema": "avatar-server-ping-flood/1",
        "date": dt.date.today().isoformat(),
        "flood_s": args.flood_s,
        "ping_payload_bytes": 125,
        "client_rcvbuf_bytes": 4096,
        **results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old-dir", required=True)
    parser.add_argument("--image", default=str(DEFAULT_IMAGE))
    parser.add_argument("--flood-s", type=float, default=20.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    write_result(asyncio.run(_main(args, Path(args.image).read_bytes())), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
