"""Added latency of the Pipecat service (issue 16): LLM text in -> first avatar audio out.

One ``avatar-server serve`` process (``--engine testpattern`` by default) and two sessions on it,
used in turns, the same answer each round (3-word chunks, as an LLM streams):

* **client**: :class:`clients.client.AvatarClient` sends the chunks and ``speak.end``; measured
  from the first ``speak`` sent to the first audio frame that arrives after the utterance's
  ``speak.started`` (the first frame of the utterance's audio);
* **service**: a Pipecat pipeline ``AvatarService -> sink`` gets the same chunks as
  ``LLMFullResponseStartFrame``, ``LLMTextFrame``..., ``LLMFullResponseEndFrame`` queued on the
  pipeline; measured from the queueing to the first ``TTSAudioRawFrame`` at the sink (the
  service passes audio on from ``speak.started``: the same frame).

The test pattern's speech cannot be told from its idle stream by its audio (both click once a
second), so both paths are timed on the same protocol event. The figure is ``ratio`` = median
service / median client, one run; ``added_ms_median`` the difference.

    python -m ops.pipecat_latency --rounds 6 --out ops/results/2026-12-06_cpu-pipecat-latency.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from ops._process import stop_process
from ops.soak import http_status

REPO_DIR = Path(__file__).resolve().parents[1]
TEXT = "Hello there, this is the avatar answering through Pipecat, one short sentence at a time."


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


async def _start_server(engine: str, delay_s: float) -> tuple[asyncio.subprocess.Process, str]:
    command = [sys.executable, "-m", "avatar_server.cli", "serve", "--engine", engine, "--host", "127.0.0.1",
               "--port", "0", "--log-level", "WARNING"]  # fmt: skip
    if engine == "testpattern":
        command += ["--testpattern-delay-s", str(delay_s)]
    proc = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE, cwd=str(REPO_DIR))
    assert proc.stdout is not None
    async with asyncio.timeout(300):
        line = (await proc.stdout.readline()).decode()
    match = re.search(r"(https?://\S+/)", line)
    if match is None:
        await stop_process(proc, 5)
        raise RuntimeError(f"the server did not start: {line!r}")
    url = match.group(1)
    for _ in range(3000):
        if await asyncio.to_thread(http_status, url + "readyz") == 200:
            break
        await asyncio.sleep(0.1)
    return proc, url


async def measure(url: str, image: bytes, *, rounds: int, timeout_s: float = 60.0) -> dict[str, Any]:
    """``rounds`` turns of client then service on one server; per-round figures in ms."""
    from pipecat.frames.frames import (
        Frame,
        LLMFullResponseEndFrame,
        LLMFullResponseStartFrame,
        LLMTextFrame,
        TTSAudioRawFrame,
        TTSStoppedFrame,
    )
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineWorker
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.workers.runner import WorkerRunner

    from avatar_server import protocol
    from clients.client import AvatarClient, split_chunks
    from clients.pipecat_avatar import AvatarService

    chunks = split_chunks(TEXT, 3)

    class Sink(FrameProcessor):
        """Times the service's audio: its first frame of an answer, and the answer's end."""

        def __init__(self) -> None:
            super().__init__()
            self.first_s: float | None = None
            self.stopped = asyncio.Event()

        async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
            await super().process_frame(frame, direction)
            if isinstance(frame, TTSAudioRawFrame) and self.first_s is None:
                self.first_s = time.monotonic()
            elif isinstance(frame, TTSStoppedFrame):
                self.stopped.set()
            await self.push_frame(frame, direction)

    started = False  # the client's utterance has started (speak.started arrived)
    first_s: float | None = None

    def on_message(message) -> None:
        nonlocal started
        if isinstance(message, protocol.SpeakStarted):
            started = True

    def on_audio(frame) -> None:
        nonlocal first_s
        if started and first_s is None:
            first_s = time.monotonic()

    client = AvatarClient(url, keep_audio=False, on_audio_frame=on_audio, on_message=on_message)
    await client.connect()
    await client.start_session(image, "A person in front of a plain wall.", timeout_s=timeout_s)
    await client.start_media(timeout_s=timeout_s)

    avatar = AvatarService(
        url=url, image=image, prompt="A person in front of a plain wall.", timeout_s=timeout_s
    )
    sink = Sink()
    worker = PipelineWorker(Pipeline([avatar, sink]), idle_timeout_secs=None, enable_rtvi=False)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    run = asyncio.get_running_loop().create_task(runner.run())
    client_ms: list[float] = []
    service_ms: list[float] = []
    try:
        async with asyncio.timeout(timeout_s):
            await avatar.ready.wait()
        await asyncio.sleep(3.0)  # both streams settled
        for number in range(rounds):
            # the client
            started, first_s = False, None
            sent_s = time.monotonic()
            await client.speak(f"c{number}", chunks)
            await client.wait_utterance_done(f"c{number}", timeout_s=timeout_s)
            if first_s is None:
                raise RuntimeError(f"client round {number}: no audio after speak.started")
            client_ms.append(1000 * (first_s - sent_s))
            await asyncio.sleep(1.0)
            # the service
            sink.first_s = None
            sink.stopped.clear()
            frames = [
                LLMFullResponseStartFrame(),
                *(LLMTextFrame(chunk) for chunk in chunks),
                LLMFullResponseEndFrame(),
            ]
            sent_s = time.monotonic()
            await worker.queue_frames(frames)
            async with asyncio.timeout(timeout_s):
                await sink.stopped.wait()
            if sink.first_s is None:
                raise RuntimeError(f"service round {number}: no audio passed on")
            service_ms.append(1000 * (sink.first_s - sent_s))
            await asyncio.sleep(1.0)
            print(
                f"round {number}: client {client_ms[-1]:.0f} ms, service {service_ms[-1]:.0f} ms", flush=True
            )
    finally:
        await worker.cancel()
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
        await client.close()

    def stats(values: list[float]) -> dict[str, float]:
        return {
            "median": round(statistics.median(values), 1),
            "min": round(min(values), 1),
            "max": round(max(values), 1),
        }

    return {
        "text": TEXT,
        "chunks": len(chunks),
        "client_first_audio_ms": [round(v, 1) for v in client_ms],
        "service_first_audio_ms": [round(v, 1) for v in service_ms],
        "client": stats(client_ms),
        "service": stats(service_ms),
        "added_ms_median": round(statistics.median(service_ms) - statistics.median(client_ms), 1),
        "ratio": round(statistics.median(service_ms) / statistics.median(client_ms), 3),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from importlib.metadata import version

    image = await asyncio.to_thread(Path(args.image).read_bytes)
    load_start = os.getloadavg()[0]
    started = time.monotonic()
    proc, url = await _start_server(args.engine, args.testpattern_delay_s)
    try:
        results = await measure(url, image, rounds=args.rounds)
    finally:
        await stop_process(proc, 10)
    return {
        "schema": "avatar-server-pipecat-latency/1",
        "command": "python -m ops.pipecat_latency " + " ".join(sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": f"cpu: {_cpu_model()}",
        "host_cpus": os.cpu_count(),
        "host_load_avg_1m": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
        "python": platform.python_version(),
        "pipecat": version("pipecat-ai"),
        "engine": args.engine,
        "testpattern_delay_s": args.testpattern_delay_s if args.engine == "testpattern" else None,
        "rounds": args.rounds,
        "wall_s": round(time.monotonic() - started, 1),
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default="testpattern", choices=["testpattern", "preview", "full"])
    parser.add_argument("--testpattern-delay-s", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--image", default=str(REPO_DIR.parent / "shared" / "media" / "portrait.png"))
    parser.add_argument("--out", type=Path, help="write the JSON here (default: print it)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds: must be at least 1, got {args.rounds}")
    report = asyncio.run(main_async(args))
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
