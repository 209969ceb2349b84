"""Issue 17: time from submitting a segment's job to its first frame in a playout buffer, whole
segments against streamed chunks, on the served pieces (``EngineWorker`` in front of the engine,
``PlayoutBuffer`` and ``SegmentWriter`` as ``streaming.session`` uses them).

The same request each time: a speech segment of ``--seconds`` (the planner's default speech
length is 2 s) continuing from a previous segment (steady state: the continuation drops its first
decoded frame), same seed. ``whole``: ``generate`` without ``on_chunk`` and ``PlayoutBuffer.append``
of the result, as before issue 17; ``streamed``: each decoded window goes through ``on_chunk`` to a
``SegmentWriter`` on the event loop. Reported per run: ``to_buffer_s`` (submission to the first
frame in the buffer), the engine's stage timings, and the ratio of the medians ``streamed / whole``
of ``to_buffer_s``. The modes alternate so that load on a shared machine hits both; since the DiT's
time varies more with that load than the decode takes, the paired figure is the one to read: in each
streamed run, the first frame's time over the time the whole segment was there (``to_whole_s``,
what the whole mode waits for under the same load).

Usage::

    python -m ops.stream_first_frame --engine preview --seconds 2 --rounds 2 \\
        --out ops/results/2026-12-06_cpu-stream-first-frame.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from engine.api import SegmentKind, SegmentRequest
from engine.factory import create_engine
from ops.measure_http import write_result
from streaming.engine_client import EngineWorker
from streaming.playout import PlayoutBuffer, SegmentWriter
from streaming.text import build_prompt

MEDIA_DIR = Path(__file__).resolve().parents[2] / "shared" / "media"
TEXT = "Hello, and welcome to the kitchen. Today we cook something simple."


async def one_run(worker: EngineWorker, request: SegmentRequest, *, streamed: bool) -> dict[str, Any]:
    """Submit ``request`` once; seconds from submission to the first frame in a fresh buffer."""
    engine = worker.engine
    buffer = PlayoutBuffer(width=engine.width, height=engine.height, fps=engine.fps)
    writer: list[SegmentWriter] = []
    first: list[float] = []
    started = time.monotonic()

    def on_chunk(chunk) -> None:
        if not writer:
            writer.append(SegmentWriter(buffer, chunk.sample_rate, chunk.total_frames, kind=request.kind))
        writer[0].write(chunk.frames, chunk.audio, last=chunk.last)
        if not first and buffer.end_frame > 0:
            first.append(time.monotonic() - started)

    segment = await worker.generate(request, threading.Event(), on_chunk=on_chunk if streamed else None)
    if not streamed:
        buffer.append(segment.frames, segment.audio, segment.sample_rate, kind=request.kind)
        first.append(time.monotonic() - started)
    whole_s = time.monotonic() - started
    assert buffer.end_frame == segment.num_frames
    return {"to_buffer_s": round(first[0], 3), "to_whole_s": round(whole_s, 3), "frames": segment.num_frames,
            "timings_s": {k: round(v, 3) for k, v in segment.timings_s.items()}}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    engine = create_engine(args.engine, device="cpu")
    worker = EngineWorker(engine)
    image = np.asarray(Image.open(MEDIA_DIR / "portrait.png").convert("RGB"))
    runs: dict[str, list[dict[str, Any]]] = {"whole": [], "streamed": []}
    try:
        identity = await worker.prepare_identity(image, "A man in a green shirt at a cooking demo.")
        prompt = build_prompt(identity.appearance, SegmentKind.SPEAK, TEXT)
        # the previous segment (and warm-up: first-call allocations), not reported
        previous = await worker.generate(SegmentRequest(identity=identity, kind=SegmentKind.IDLE, prompt=prompt,
                                                        seconds=1.0, seed=1), threading.Event())
        request = SegmentRequest(identity=identity, kind=SegmentKind.SPEAK, prompt=prompt, text=TEXT,
                                 seconds=args.seconds, seed=2, continue_from=previous.continuation)
        for _ in range(args.rounds):
            for mode in ("whole", "streamed"):
                runs[mode].append(await one_run(worker, request, streamed=mode == "streamed"))
    finally:
        worker.close(wait_s=5.0)
    median = {mode: statistics.median(r["to_buffer_s"] for r in rows) for mode, rows in runs.items()}
    streamed = runs["streamed"]
    return {
        "what": "seconds from submitting a speech segment's job to its first frame in the playout buffer",
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()} CPU (shared, 2 cores), Python {platform.python_version()}",
        "engine": args.engine,
        "decoder": type(getattr(engine, "video_decoder", None)).__name__,
        "segment_seconds": args.seconds,
        "runs": runs,
        "median_to_buffer_s": median,
        "ratio_streamed_over_whole": round(median["streamed"] / median["whole"], 3),
        # the same run, so the same load: first frame vs the moment the whole segment was there
        "median_first_frame_over_whole_same_run": round(
            statistics.median(r["to_buffer_s"] / r["to_whole_s"] for r in streamed), 3),
        "median_first_frame_earlier_s": round(statistics.median(r["to_whole_s"] - r["to_buffer_s"] for r in streamed), 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="preview", choices=("preview", "testpattern"))
    parser.add_argument("--seconds", type=float, default=2.0, help="speech segment length, s")
    parser.add_argument("--rounds", type=int, default=2, help="whole/streamed pairs")
    parser.add_argument("--timeout-s", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    args = parser.parse_args(argv)
    write_result(asyncio.run(main_async(args)), args.out)


if __name__ == "__main__":
    main()
