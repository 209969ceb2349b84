"""What going on air costs (issue 15): CPU per RTMP output and per WHEP viewer, memory per
viewer, and the latency an RTMP output adds between ``speak`` and the pulled stream.

One session (test-pattern engine at the given size, no browser) runs in this process with its
server-side pump (:class:`~streaming.live.LiveSession`); everything else runs elsewhere: the
RTMP server (nginx-rtmp, :mod:`ops.rtmp_server`), the WHEP viewers (``python -m
ops.whep_viewer`` subprocesses, so their decoding is not counted), the RTMP puller (a thread,
its decode time subtracted by measuring the process CPU only in windows without it).

For each frame size, the process CPU (user + system, all threads, ``psutil``) per wall second
is measured over ``--window-s`` in these states, each added to the previous one:

* ``session``: the segment loop, the pump, nothing watching;
* ``rtmp``: plus one RTMP output (libx264 veryfast + AAC, FLV to nginx);
* ``viewers_1`` / ``viewers_N``: the RTMP output stopped; 1, then N WHEP viewers on the shared
  H.264 encode; ``own_N``: N viewers each with its own encoder (``shared_encoding=False``),
  which is what aiortc's ``MediaRelay`` would cost.

Per RTMP output = ``rtmp - session``; per viewer (shared) = ``(viewers_N - viewers_1) / (N - 1)``,
the first viewer also pays the shared encode (``viewers_1 - session``); per viewer (own) =
``(own_N - session) / N``. Memory per viewer = RSS growth from 1 to N viewers / (N - 1).

``speak`` -> first speech in the pulled RTMP stream: a puller decodes the stream from nginx;
after ``speak`` the time to the first pulled frame with the SPEAK background, minus the time
to the session's own ``speak.started`` (its first frame leaving the pump), is the latency the
output adds (encode, FLV, nginx, the puller's demuxing), median of ``--utterances``.

Memory per viewer: the RSS growth is reported but is mostly noise: the session's own churn of
segment-sized arrays (MBs per segment at 448x256, tens of MB at 896x512) moves RSS by more than a
viewer costs, even with ``MALLOC_MMAP_THRESHOLD_=131072 MALLOC_ARENA_MAX=2``. The figure to read
is ``python_heap_mb_per_extra_viewer``: the growth of the Python heap (``tracemalloc``) in
allocations made by aiortc, aioice, pylibsrtp and the relay while N - 1 viewers join (native
buffers of OpenSSL, libsrtp and libopus are not in it; they are small beside video frames).
The JSON records the ``MALLOC_*`` environment it ran under.

The test pattern is easy to encode: x264 spends less on it than on a real face, so the
encode figures are a lower bound for the preview/real engines at the same size.

Usage::

    python -m ops.measure_onair                     # 448x256 and 896x512 (the SR size)
    python -m ops.measure_onair --size 448x256 --viewers 4 --window-s 6

Writes JSON (schema ``avatar-server-onair/1``) to ``ops/results/<date>_cpu-onair.json``
unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import av
import numpy as np
import psutil

from avatar_server.webrtc import use_host_addresses
from engine.testpattern import TestPatternEngine
from ops.rtmp_server import NginxRtmp, rtmp_server_available
from streaming import events
from streaming.engine_client import EngineWorker
from streaming.live import LiveSession, OutputSpec
from streaming.session import LoopConfig, SessionRunner

SPEAK_SHADE = np.array((40, 24, 56), dtype=np.float64)  # engine/testpattern.py, SegmentKind.SPEAK
STREAM_KEY = "measure"
VIEWER_CODE = ("aiortc", "aioice", "pylibsrtp", "streaming/whep.py", "streaming/fanout.py")


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


async def cpu_per_s(process: psutil.Process, window_s: float) -> tuple[float, int]:
    """Process CPU seconds per wall second over ``window_s``, and the RSS at its end (bytes)."""
    began_wall, began_cpu = time.monotonic(), cpu_seconds(process)
    await asyncio.sleep(window_s)
    return (cpu_seconds(process) - began_cpu) / (time.monotonic() - began_wall), process.memory_info().rss


class SubprocessViewer:
    """One ``python -m ops.whep_viewer`` child: offer out, answer in, frame counts out."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.viewer_id: str | None = None
        self.decoded = 0
        self._reader: asyncio.Task[None] | None = None

    async def join(self, live: LiveSession) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ops.whep_viewer", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        offer = json.loads(await self.proc.stdout.readline())["offer"]
        self.viewer_id, answer = await live.relay.add_viewer(offer)
        self.proc.stdin.write((json.dumps({"answer": answer}) + "\n").encode())
        await self.proc.stdin.drain()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.proc is not None
        while line := await self.proc.stdout.readline():
            self.decoded = json.loads(line).get("video", self.decoded)

    async def wait_decoding(self, frames: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.decoded < frames:
            if time.monotonic() > deadline:
                raise RuntimeError(f"a WHEP viewer decoded only {self.decoded} frames in {timeout_s} s")
            await asyncio.sleep(0.1)

    async def leave(self, live: LiveSession) -> None:
        if self.viewer_id is not None:
            await live.relay.remove_viewer(self.viewer_id)
        if self.proc is not None:
            self.proc.kill()
            await self.proc.wait()


class Puller(threading.Thread):
    """Decodes the RTMP stream; records the wall time of the first SPEAK frame after ``arm``."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True, name="rtmp-puller")
        self.url = url
        self.stop = threading.Event()
        self.armed_at: float | None = None
        self.seen_at: float | None = None
        self.frames = 0

    def arm(self) -> None:
        self.seen_at = None
        self.armed_at = time.monotonic()

    def run(self) -> None:
        try:
            self._pull()
        except av.error.FFmpegError as exc:  # the stream ended (the output stopped) or timed out
            logging.getLogger(__name__).debug("puller: %s", exc)

    def _pull(self) -> None:
        with av.open(self.url, timeout=5) as container:
            for frame in container.decode(video=0):
                if self.stop.is_set():
                    return
                self.frames += 1
                if self.armed_at is not None and self.seen_at is None:
                    h, w = frame.height, frame.width
                    patch = frame.to_ndarray(format="rgb24")[h // 2 - 16 : h // 2 + 16, w - 48 : w - 16]
                    if np.abs(patch.reshape(-1, 3).mean(axis=0) - SPEAK_SHADE).max() < 8:
                        self.seen_at = time.monotonic()


async def measure_size(width: int, height: int, *, viewers: int, window_s: float, utterances: int,
                       nginx: NginxRtmp | None, trace_memory: bool = True) -> dict:
    process = psutil.Process()
    engine = TestPatternEngine(width=width, height=height)
    worker = EngineWorker(engine)
    identity = await worker.prepare_identity(np.full((height, width, 3), 90, np.uint8), "A calm person.")
    log: list = []
    holder: list[LiveSession] = []

    def on_event(event) -> None:
        log.append((time.monotonic(), event))
        if holder:
            holder[0].emit(event)

    runner = SessionRunner(worker=worker, identity=identity, on_event=on_event,
                           config=LoopConfig(playout_target_ms=1000.0))
    live = LiveSession(runner, max_viewers=2 * viewers + 2, whep_connect_timeout_s=60.0)  # a loaded machine
    holder.append(live)
    live.start()
    result: dict = {"width": width, "height": height, "viewers": viewers, "window_s": window_s}
    cpu: dict[str, float] = {}
    rss: dict[str, int] = {}
    try:
        await asyncio.sleep(2.0)  # warm: the loop has filled the buffer
        cpu["session"], rss["session"] = await cpu_per_s(process, window_s)

        if nginx is not None:
            output_id = live.add_output(OutputSpec(type="rtmp", url=nginx.url(STREAM_KEY)))
            for _ in range(200):
                if live.outputs[output_id].state == "live":
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)
            cpu["rtmp"], rss["rtmp"] = await cpu_per_s(process, window_s)
            # speak -> first speech frame pulled back, against speak.started (first frame out of the pump)
            puller = Puller(nginx.url(STREAM_KEY))
            puller.start()
            await asyncio.sleep(2.0)
            added_ms, started_ms, pulled_ms = [], [], []
            for n in range(utterances):
                puller.arm()
                spoken_at = time.monotonic()
                mark = len(log)
                live.speak(f"u{n}", "Good evening and welcome to the show, it is great to have you here.", final=True)
                for _ in range(600):
                    if puller.seen_at is not None and any(isinstance(e, events.SpeakEnded) for _, e in log[mark:]):
                        break
                    await asyncio.sleep(0.05)
                started = next((t for t, e in log[mark:] if isinstance(e, events.SpeakStarted)), None)
                if started is None or puller.seen_at is None:
                    continue
                started_ms.append(1000 * (started - spoken_at))
                pulled_ms.append(1000 * (puller.seen_at - spoken_at))
                added_ms.append(1000 * (puller.seen_at - started))
                await asyncio.sleep(1.0)
            puller.stop.set()
            result["speak_to_started_ms"] = [round(x) for x in started_ms]
            result["speak_to_pulled_ms"] = [round(x) for x in pulled_ms]
            result["rtmp_added_latency_ms"] = [round(x) for x in added_ms]
            result["rtmp_added_latency_ms_median"] = round(statistics.median(added_ms)) if added_ms else None
            stats = live.outputs[output_id].stats()
            result["rtmp_encode_s_per_frame_ms"] = round(
                1000 * stats["encode_s"] / max(1, stats["video_frames_sent"]), 2
            )
            await live.remove_output(output_id)
            await asyncio.to_thread(puller.join, 15.0)
            await asyncio.sleep(1.0)

        shared = [SubprocessViewer() for _ in range(viewers)]
        await shared[0].join(live)
        await shared[0].wait_decoding(50)
        cpu["viewers_1"], rss["viewers_1"] = await cpu_per_s(process, window_s)
        if trace_memory:
            tracemalloc.start(4)  # Python-heap growth per viewer (off during the CPU windows)
            before = tracemalloc.take_snapshot()
        for viewer in shared[1:]:
            await viewer.join(live)
        for viewer in shared:
            await viewer.wait_decoding(viewer.decoded + 50)
        await asyncio.sleep(2.0)
        if trace_memory:
            grown = tracemalloc.take_snapshot().compare_to(before, "traceback")
            tracemalloc.stop()
            viewer_bytes = sum(
                stat.size_diff for stat in grown
                if any(any(part in frame.filename for part in VIEWER_CODE) for frame in stat.traceback)
            )
            if viewers > 1:
                result["python_heap_mb_per_extra_viewer"] = round(viewer_bytes / (viewers - 1) / 2**20, 3)
        cpu[f"viewers_{viewers}"], rss[f"viewers_{viewers}"] = await cpu_per_s(process, window_s)
        result["shared_encode_ms_per_frame"] = round(
            1000 * live.relay.encoder.encode_s / max(1, live.relay.encoder.frames_encoded), 2
        )
        for viewer in shared:
            await viewer.leave(live)
        await asyncio.sleep(1.0)

        live.relay._shared_encoding = False  # the per-viewer-encoder baseline (what MediaRelay costs)
        own = [SubprocessViewer() for _ in range(viewers)]
        for viewer in own:
            await viewer.join(live)
        for viewer in own:
            await viewer.wait_decoding(50)
        cpu[f"own_{viewers}"], rss[f"own_{viewers}"] = await cpu_per_s(process, window_s)
        for viewer in own:
            await viewer.leave(live)
    finally:
        await live.close()
        worker.close(5.0)
    result["cpu_per_s"] = {k: round(v, 3) for k, v in cpu.items()}
    result["rss_mb"] = {k: round(v / 2**20, 1) for k, v in rss.items()}
    if "rtmp" in cpu:
        result["cpu_per_rtmp_output"] = round(cpu["rtmp"] - cpu["session"], 3)
    result["cpu_first_viewer_shared"] = round(cpu["viewers_1"] - cpu["session"], 3)
    if viewers > 1:
        result["cpu_per_extra_viewer_shared"] = round((cpu[f"viewers_{viewers}"] - cpu["viewers_1"]) / (viewers - 1), 3)
        result["rss_mb_per_extra_viewer"] = round(
            (rss[f"viewers_{viewers}"] - rss["viewers_1"]) / (viewers - 1) / 2**20, 2
        )
    result["cpu_per_viewer_own_encoder"] = round((cpu[f"own_{viewers}"] - cpu["session"]) / viewers, 3)
    return result


async def main_async(args: argparse.Namespace) -> dict:
    use_host_addresses(["127.0.0.1"])
    sizes = [tuple(int(x) for x in size.split("x")) for size in (args.size or ["448x256", "896x512"])]
    nginx = None
    if rtmp_server_available():
        nginx = NginxRtmp(Path(tempfile.mkdtemp(prefix="onair-nginx-")))
        nginx.start()
    try:
        runs = []
        for width, height in sizes:
            print(f"measuring {width}x{height}...", flush=True)
            runs.append(await measure_size(width, height, viewers=args.viewers, window_s=args.window_s,
                                           utterances=args.utterances, nginx=nginx,
                                           trace_memory=not runs))  # once: it does not depend on the size
            print(json.dumps(runs[-1]), flush=True)
    finally:
        if nginx is not None:
            nginx.stop()
    return {
        "schema": "avatar-server-onair/1",
        "date": dt.date.today().isoformat(),
        "device": "cpu",
        "cpu_count": os.cpu_count(),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "engine": "testpattern",
        "rtmp_server": "nginx + libnginx-mod-rtmp" if nginx is not None else None,
        "command": "python -m ops.measure_onair " + " ".join(sys.argv[1:]),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", action="append", help="WIDTHxHEIGHT (repeatable; default 448x256 and 896x512)")
    parser.add_argument("--viewers", type=int, default=4, help="WHEP viewers in the N-viewer states")
    parser.add_argument("--window-s", type=float, default=6.0, help="seconds of each CPU window")
    parser.add_argument("--utterances", type=int, default=3, help="speak -> pulled RTMP latency samples")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    report = asyncio.run(main_async(args))
    out = args.out or Path("ops/results") / f"{report['date']}_cpu-onair.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
