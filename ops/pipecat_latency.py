"""Added latency of the Pipecat service (issue 16): LLM text in -> first avatar audio out.

One ``avatar-server serve`` process (``--engine testpattern`` by default) and three sessions on it,
used in turns, the same answer each round (3-word chunks, as an LLM streams):

* **client**: :class:`clients.client.AvatarClient` sends the chunks and ``speak.end``; measured
  from the first ``speak`` sent to the first audio frame that arrives after the utterance's
  ``speak.started`` (the first frame of the utterance's audio);
* **service**: a Pipecat pipeline ``AvatarService -> sink`` gets the same chunks as
  ``LLMFullResponseStartFrame``, ``LLMTextFrame``..., ``LLMFullResponseEndFrame`` queued on the
  pipeline; measured from the queueing to the first ``TTSAudioRawFrame`` at the sink (the
  service passes audio on from ``speak.started``: the same frame).

The test pattern's speech cannot be told from its idle stream by its audio (both click once a
second), so both paths are timed on the same protocol event. The service runs twice, with its
default ``audio_preroll_ms`` (the head start it gives the output transport, which it adds by
design) and with none (the pipeline's own cost), each on its own session, in turns with the
client. The figure is ``ratio`` = median service (default) / median client, one run;
``added_ms_median`` the difference; ``service`` has both variants.

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
               "--port", "0", "--max-sessions", "3", "--log-level", "WARNING"]  # fmt: skip
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

    class Bot:
        """One ``AvatarService -> Sink`` pipeline running."""

        def __init__(self, preroll_ms: int) -> None:
            self.avatar = AvatarService(
                url=url,
                image=image,
                prompt="A person in front of a plain wall.",
                audio_preroll_ms=preroll_ms,
                timeout_s=timeout_s,
            )
            self.sink = Sink()
            self.worker = PipelineWorker(
                Pipeline([self.avatar, self.sink]), idle_timeout_secs=None, enable_rtvi=False
            )
            self.run: asyncio.Task[None] | None = None
            self.ms: list[float] = []

        async def start(self) -> None:
            runner = WorkerRunner(handle_sigint=False)
            await runner.add_workers(self.worker)
            self.run = asyncio.get_running_loop().create_task(runner.run())
            async with asyncio.timeout(timeout_s):
                await self.avatar.ready.wait()

        async def answer(self, number: int) -> None:
            self.sink.first_s = None
            self.sink.stopped.clear()
            frames = [
                LLMFullResponseStartFrame(),
                *(LLMTextFrame(c) for c in chunks),
                LLMFullResponseEndFrame(),
            ]
            sent_s = time.monotonic()
            await self.worker.queue_frames(frames)
            async with asyncio.timeout(timeout_s):
                await self.sink.stopped.wait()
            if self.sink.first_s is None:
                raise RuntimeError(f"service round {number}: no audio passed on")
            self.ms.append(1000 * (self.sink.first_s - sent_s))

        async def stop(self) -> None:
            await self.worker.cancel()
            if self.run is not None:
                self.run.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.run

    bots = {preroll_ms: Bot(preroll_ms) for preroll_ms in (AvatarService.DEFAULT_AUDIO_PREROLL_MS, 0)}
    client_ms: list[float] = []
    try:
        for bot in bots.values():
            await bot.start()
        await asyncio.sleep(3.0)  # the streams settled
        for number in range(rounds):
            started, first_s = False, None
            sent_s = time.monotonic()
            await client.speak(f"c{number}", chunks)
            await client.wait_utterance_done(f"c{number}", timeout_s=timeout_s)
            if first_s is None:
                raise RuntimeError(f"client round {number}: no audio after speak.started")
            client_ms.append(1000 * (first_s - sent_s))
            for bot in bots.values():
                await asyncio.sleep(1.0)
                await bot.answer(number)
            await asyncio.sleep(1.0)
            figures = ", ".join(f"service (pre-roll {p} ms) {b.ms[-1]:.0f} ms" for p, b in bots.items())
            print(f"round {number}: client {client_ms[-1]:.0f} ms, {figures}", flush=True)
    finally:
        for bot in bots.values():
            await bot.stop()
        await client.close()

    def stats(values: list[float]) -> dict[str, float]:
        return {
            "median": round(statistics.median(values), 1),
            "min": round(min(values), 1),
            "max": round(max(values), 1),
        }

    client_median = statistics.median(client_ms)
    services = {
        f"preroll_{preroll_ms}ms": {
            "audio_preroll_ms": preroll_ms,
            "first_audio_ms": [round(v, 1) for v in bot.ms],
            **stats(bot.ms),
            "added_ms_median": round(statistics.median(bot.ms) - client_median, 1),
            "ratio": round(statistics.median(bot.ms) / client_median, 3),
        }
        for preroll_ms, bot in bots.items()
    }
    default = services[f"preroll_{AvatarService.DEFAULT_AUDIO_PREROLL_MS}ms"]
    return {
        "text": TEXT,
        "chunks": len(chunks),
        "client_first_audio_ms": [round(v, 1) for v in client_ms],
        "client": stats(client_ms),
        "service": services,
        "added_ms_median": default["added_ms_median"],
        "ratio": default["ratio"],
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
