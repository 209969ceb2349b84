"""Helpers of the security tests (auth, limits, fuzz, faults, TLS): an in-process server on a
free loopback port, raw HTTP requests with chosen headers, images, and resource snapshots."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import io
import json
import os
import struct
import threading
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import psutil
from PIL import Image

from avatar_server.server import AvatarServer, build_app
from avatar_server.settings import Settings
from engine.testpattern import TestPatternEngine

API_KEY = "test-api-key-0123456789abcdef"


@contextlib.asynccontextmanager
async def server(engine: Any = None, *, warm_up: bool = False, **settings: Any) -> AsyncIterator[AvatarServer]:
    """A started server (testpattern engine unless given) on 127.0.0.1 and a free port."""
    config = {"engine": "testpattern", "port": 0, **settings}
    app = build_app(Settings(**config), engine if engine is not None else TestPatternEngine())
    await app.start(warm_up=warm_up)
    try:
        if warm_up:
            for _ in range(400):
                if app.readiness()[0]:
                    break
                await asyncio.sleep(0.05)
        yield app
    finally:
        await app.close()


async def http_request(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    *,
    host: str | None = None,
    json_body: Any = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request over a raw socket (any Host/Origin/Authorization header;
    ``json_body``: sent as an ``application/json`` body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        body = b"" if json_body is None else json.dumps(json_body).encode()
        headers = {"Connection": "close", **(headers or {})}
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}"]
        lines += [f"{key}: {value}" for key, value in headers.items()]
        if json_body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await writer.drain()
        async with asyncio.timeout(10):
            status_line = await reader.readline()
            response_headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                key, _, value = line.decode().partition(":")
                response_headers[key.strip().lower()] = value.strip()
            length = int(response_headers.get("content-length", "0"))
            body = await reader.readexactly(length) if length else b""
        return int(status_line.split()[1]), response_headers, body
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def png_b64(width: int = 64, height: int = 48, color: tuple[int, int, int] = (200, 120, 80)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def png_bomb(width: int, height: int, rows: int = 4) -> bytes:
    """A tiny PNG that claims ``width x height`` (1-bit grey) but holds only ``rows`` rows of
    zeros: a decompression bomb for a decoder that trusts the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    raw = b"".join(b"\x00" + bytes((width + 7) // 8) for _ in range(rows))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


async def recv_json(ws, timeout_s: float = 10.0, skip: tuple[str, ...] = ("stats", "state")) -> dict:
    async with asyncio.timeout(timeout_s):
        while True:
            message = json.loads(await ws.recv())
            if message["type"] not in skip:
                return message


@dataclass(frozen=True)
class Resources:
    """What the process holds: asyncio tasks, Python threads, fds, native threads, RSS."""

    tasks: tuple[str, ...]
    threads: tuple[str, ...]
    fds: int
    native_threads: int
    rss_bytes: int

    def summary(self) -> str:
        return (
            f"tasks={len(self.tasks)} threads={len(self.threads)} fds={self.fds} "
            f"native_threads={self.native_threads} rss={self.rss_bytes / 2**20:.1f} MiB"
        )


def _task_name(task: asyncio.Task) -> str:
    coro = task.get_coro()
    return f"{task.get_name()}:{getattr(coro, '__qualname__', type(coro).__name__)}"


def snapshot(exclude: set[asyncio.Task] | None = None) -> Resources:
    """Taken before any garbage collection: a socket or task that only the collector would
    close (an unclosed transport's ``__del__``) still counts as held."""
    current = asyncio.current_task()
    skip = {current, *(exclude or set())}
    tasks = tuple(sorted(_task_name(t) for t in asyncio.all_tasks() if t not in skip and not t.done()))
    threads = tuple(sorted(t.name for t in threading.enumerate()))
    proc = psutil.Process(os.getpid())
    fds = proc.num_fds()
    gc.collect()
    return Resources(tasks, threads, fds, proc.num_threads(), proc.memory_info().rss)


async def settle(predicate, timeout_s: float = 15.0, period_s: float = 0.1) -> bool:
    """Wait until ``predicate()`` holds (or time out); returns its last value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(period_s)
    return bool(predicate())
