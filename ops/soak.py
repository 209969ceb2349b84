"""Soak test: the configured capacity of concurrent sessions for a long time, on loopback.

Starts ``avatar-server serve`` as a child process (``--engine``, ``--max-sessions``) and keeps
``--sessions`` (default: the capacity) Python WebRTC clients busy for ``--duration-s``
(default 600 s): each speaks utterances in the model's languages, interrupts every third one
half-way, records a few seconds server-side every fifth, and pauses between them. One more
client asks for a session at the start and must be refused with ``capacity``.

Reported (printed and written as JSON, schema ``avatar-server-soak/1``):

* **memory growth** of the server process: least-squares slope of its RSS (sampled every
  ``--sample-s``) after the first 10 % of the run, in MB per hour, plus start / end / peak RSS;
* **sessions lost**: sessions that ended without the client asking (WebSocket closed, peer
  connection failed, no video for 5 s) or that could not be started; a lost session is
  replaced by a new one;
* **underruns**: the server's playout underruns summed over all sessions (from ``stats``),
  and utterances that did not finish (no ``speak.ended`` within 60 s).

Usage::

    python -m ops.soak --engine testpattern --duration-s 600
    python -m ops.soak --engine preview --duration-s 60
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from ops._process import stop_process

REPO_DIR = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = REPO_DIR.parent / "shared" / "media" / "portrait.png"
NO_VIDEO_S = 5.0

UTTERANCES = [
    ("English", "Hello there, this is a long running test of the avatar. It keeps on talking for a while."),
    ("German", "Guten Tag, wie geht es Ihnen heute? Ich spreche jetzt ein wenig Deutsch."),
    ("French", "Bonjour, je suis un avatar. Je parle français aujourd'hui, et je continue."),
    (None, "你好，我是一个数字人。今天天气很好，我们出去走走吧。"),
    (None, "こんにちは、私はデジタルヒューマンです。今日はいい天気ですね。"),
    (None, "안녕하세요, 저는 디지털 휴먼입니다. 오늘 날씨가 좋네요."),
]


@dataclass
class Tally:
    sessions_started: int = 0
    sessions_lost: int = 0
    lost_reasons: list[str] = field(default_factory=list)
    refused_capacity: bool = False
    utterances: int = 0
    utterances_unfinished: int = 0
    interrupts: int = 0
    recordings: int = 0
    underruns: int = 0
    video_frames: int = 0
    errors: dict[str, int] = field(default_factory=dict)


def http_status(url: str) -> int:
    """HTTP status of a GET of ``url`` (2 s timeout); 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


async def _client_loop(url: str, image: bytes, end_s: float, tally: Tally, rng: random.Random, number: int) -> None:
    """One session slot: keep a session busy until ``end_s``; replace it when it is lost."""
    from avatar_server import protocol
    from clients.client import AvatarClient, split_chunks

    count = 0
    while time.monotonic() < end_s:
        client = AvatarClient(url, keep_audio=False)
        lost: str | None = None
        try:
            await client.connect()
            await client.start_session(image, "A person in front of a plain wall.", timeout_s=60)
            await client.start_media(timeout_s=30)
            tally.sessions_started += 1
            while time.monotonic() < end_s and lost is None:
                count += 1
                language, text = UTTERANCES[rng.randrange(len(UTTERANCES))]
                utterance_id = f"s{number}-{count}"
                record = count % 5 == 0
                if record:
                    await client.send(protocol.RecordStart(type="record.start"))
                await client.speak(utterance_id, split_chunks(text, 3), language=language)
                tally.utterances += 1
                try:
                    if count % 3 == 0:
                        await client.wait_for("speak.started", lambda m, u=utterance_id: m.utterance_id == u, timeout_s=60)
                        await asyncio.sleep(rng.uniform(0.3, 1.5))
                        await client.interrupt()
                        await client.wait_for("interrupted", timeout_s=10)
                        tally.interrupts += 1
                    else:
                        await client.wait_for("speak.ended", lambda m, u=utterance_id: m.utterance_id == u, timeout_s=60)
                except TimeoutError:
                    tally.utterances_unfinished += 1
                if record:
                    await client.send(protocol.RecordStop(type="record.stop"))
                    await client.wait_for("record.stopped", timeout_s=30)
                    tally.recordings += 1
                await asyncio.sleep(rng.uniform(0.5, 3.0))
                lost = _why_lost(client)
        except Exception as exc:  # the session could not be started or broke
            lost = lost or f"{type(exc).__name__}: {exc}"[:200]
        finally:
            stats = client.messages("stats")
            if stats:
                tally.underruns += stats[-1].underruns
            tally.video_frames += len(client.received.video)
            for message in client.messages("error"):
                tally.errors[str(message.code)] = tally.errors.get(str(message.code), 0) + 1
            with contextlib.suppress(Exception):
                await client.close()
        if lost is not None and time.monotonic() < end_s:
            tally.sessions_lost += 1
            tally.lost_reasons.append(lost)
            await asyncio.sleep(1.0)


def _why_lost(client) -> str | None:
    pc = client.pc
    if pc is not None and pc.connectionState in ("failed", "closed"):
        return f"peer connection {pc.connectionState}"
    if client._ws is not None and client._ws.close_code is not None:
        return f"websocket closed {client._ws.close_code} {client._ws.close_reason}"
    video = client.received.video
    if not video or time.monotonic() - video[-1].arrival_s > NO_VIDEO_S:
        return f"no video for {NO_VIDEO_S:g} s"
    return None


async def _refused(url: str, image: bytes, tally: Tally) -> None:
    from clients.client import AvatarClient

    client = AvatarClient(url)
    await client.connect()
    try:
        await client.start_session(image, timeout_s=30)
    except RuntimeError as exc:
        tally.refused_capacity = "capacity" in str(exc)
    finally:
        await client.close()


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    image = await asyncio.to_thread(Path(args.image).read_bytes)
    recordings = tempfile.TemporaryDirectory(prefix="soak-recordings-")
    command = [
        sys.executable, "-m", "avatar_server.cli", "serve", "--engine", args.engine, "--port", "0",
        "--max-sessions", str(args.max_sessions), "--recordings-dir", recordings.name, "--log-level", "WARNING",
    ]
    if args.engine == "testpattern":
        command += ["--testpattern-delay-s", str(args.testpattern_delay_s)]
    proc = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE, cwd=str(REPO_DIR))
    tally = Tally()
    samples: list[tuple[float, float]] = []
    cpu_s0 = 0.0
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(300):
            line = (await proc.stdout.readline()).decode()
        match = re.search(r"(https?://\S+)", line)
        if match is None:
            raise RuntimeError(f"server did not start: {line!r}")
        url = match.group(1)
        for _ in range(3000):
            if await asyncio.to_thread(http_status, url + "readyz") == 200:
                break
            await asyncio.sleep(0.1)
        server = psutil.Process(proc.pid)
        cpu_s0 = sum(server.cpu_times()[:2])
        started_s = time.monotonic()
        end_s = started_s + args.duration_s
        rng = random.Random(args.seed)
        sessions = args.sessions or args.max_sessions
        clients = [
            asyncio.create_task(_client_loop(url, image, end_s, tally, random.Random(rng.random()), n))
            for n in range(sessions)
        ]
        await asyncio.sleep(5.0)
        if sessions >= args.max_sessions:
            await _refused(url, image, tally)
        while time.monotonic() < end_s:
            samples.append((time.monotonic() - started_s, server.memory_info().rss / 1e6))
            await asyncio.sleep(min(args.sample_s, max(0.0, end_s - time.monotonic())))
        samples.append((time.monotonic() - started_s, server.memory_info().rss / 1e6))
        await asyncio.gather(*clients, return_exceptions=True)
        cpu_s = sum(server.cpu_times()[:2]) - cpu_s0
        wall_s = time.monotonic() - started_s
        metrics = await asyncio.to_thread(_fetch, url + "metrics")
    finally:
        await stop_process(proc, 30)
        recordings.cleanup()
    return {
        "engine": args.engine,
        "sessions": args.sessions or args.max_sessions,
        "max_sessions": args.max_sessions,
        "duration_s": round(wall_s, 1),
        "rss_mb": {
            "start": round(samples[0][1], 1),
            "end": round(samples[-1][1], 1),
            "peak": round(max(mb for _, mb in samples), 1),
            "growth_mb_per_h": round(_slope_per_h(samples), 1),
            "samples": [(round(t, 1), round(mb, 1)) for t, mb in samples],
        },
        "server_cpu_percent_of_one_core": round(100 * cpu_s / wall_s, 1),
        "server_exit_code": proc.returncode,
        "refused_at_capacity": tally.refused_capacity,
        "sessions_started": tally.sessions_started,
        "sessions_lost": tally.sessions_lost,
        "lost_reasons": tally.lost_reasons[:20],
        "utterances": tally.utterances,
        "utterances_unfinished": tally.utterances_unfinished,
        "interrupts": tally.interrupts,
        "recordings": tally.recordings,
        "underruns": tally.underruns,
        "video_frames_received": tally.video_frames,
        "client_errors": tally.errors,
        "server_metrics": _pick_metrics(metrics),
    }


def _slope_per_h(samples: list[tuple[float, float]]) -> float:
    """Least-squares RSS slope after the first 10 % of the run, in MB per hour."""
    if len(samples) < 3:
        return 0.0
    cut = samples[-1][0] * 0.1
    points = [(t, mb) for t, mb in samples if t >= cut] or samples
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_mb = sum(mb for _, mb in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    slope_per_s = sum((t - mean_t) * (mb - mean_mb) for t, mb in points) / var
    return slope_per_s * 3600


def _fetch(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()
    except OSError:
        return ""


def _pick_metrics(text: str) -> dict[str, float]:
    wanted = (
        "avatar_server_playout_underruns_total",
        "avatar_server_sessions_started_total",
        "avatar_server_sessions_refused_total",
        "avatar_server_segments_generated_total",
        "avatar_server_video_frames_sent_total",
        "avatar_server_video_frames_dropped_total",
        "avatar_server_interrupt_to_silence_seconds_sum",
        "avatar_server_interrupt_to_silence_seconds_count",
        "avatar_server_recording_frames_dropped_total",
        "avatar_server_segment_real_time_factor_ratio_sum",
        "avatar_server_segment_real_time_factor_ratio_count",
    )
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        base = name.split("{")[0]
        if base in wanted:
            out[name] = out.get(name, 0.0) + float(value)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ops.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=["testpattern", "preview"], default="testpattern")
    p.add_argument("--duration-s", type=float, default=600.0)
    p.add_argument("--max-sessions", type=int, default=2, help="the server's capacity")
    p.add_argument("--sessions", type=int, help="concurrent sessions (default: the capacity)")
    p.add_argument("--testpattern-delay-s", type=float, default=0.2)
    p.add_argument("--sample-s", type=float, default=10.0, help="RSS sampling period")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image", default=str(DEFAULT_IMAGE))
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    started = dt.datetime.now()
    result = asyncio.run(soak(args))
    doc = {
        "schema": "avatar-server-soak/1",
        "command": "python -m ops.soak " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": started.isoformat(timespec="seconds"),
        "host_cpus": os.cpu_count(),
        "host_load_avg_1m": os.getloadavg()[0],
        **result,
    }
    rss = result["rss_mb"]
    print(
        f"soak {result['engine']}: {result['sessions']} sessions (capacity {result['max_sessions']}) for "
        f"{result['duration_s']:.0f} s; RSS {rss['start']} -> {rss['end']} MB (peak {rss['peak']}), "
        f"growth {rss['growth_mb_per_h']} MB/h; sessions lost {result['sessions_lost']} of "
        f"{result['sessions_started']}; underruns {result['underruns']}; utterances {result['utterances']} "
        f"({result['utterances_unfinished']} unfinished, {result['interrupts']} interrupted); recordings "
        f"{result['recordings']}; refused at capacity: {result['refused_at_capacity']}; server CPU "
        f"{result['server_cpu_percent_of_one_core']} % of a core; exit code {result['server_exit_code']}"
    )
    out = args.out or REPO_DIR / "ops" / "results" / f"{started.date()}_cpu-soak-{args.engine}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
