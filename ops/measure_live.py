"""Live behaviour measured at a receiving WebRTC client on loopback (issue 4).

The server runs in a child process (its own event loop and GIL, as in production) with the
chosen engine wrapped in :class:`MarkedEngine`, which stamps markers on every segment so that
the client can measure:

* **time to first frame after ``speak``**: from sending the first text chunk to ``speak.started``
  arriving, and to the first received audio of the speech (a continuous 440 Hz tone in every
  ``SPEAK`` segment; idle and listening audio is silent);
* **A/V offset** at the client: every second of each segment starts with a white frame (flash)
  and, at the same media time, a 5 ms 1 kHz click; the offset is click minus flash, by
  presentation timestamp (what a player lines up) and by arrival;
* **interrupt-to-silence**: from sending ``interrupt`` while the tone plays to the first
  received 20 ms audio frame that is silent (RMS < 0.05), by arrival;
* **underruns** (the server's ``stats.underruns``) while the generator keeps up, and gaps in the
  received audio timeline.

The markers replace the engine's own picture and sound only at those instants (test pattern:
its own flashes and clicks are the same; preview: its noise video gets white frames, its noise
audio is replaced), so the preview figures are those of the real streaming path under the
preview model's compute load.

Usage::

    python -m ops.measure_live --engine testpattern --engine preview
    python -m ops.measure_live --engine preview --utterances 3 --interrupts 3 --out ops/results/x.json

It prints one table row per engine and writes JSON (schema ``avatar-server-live/1``) to
``ops/results/<date>_<device>-live.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from engine.api import Segment, SegmentKind, SegmentRequest
from ops._process import stop_process

TONE_HZ = 440.0
TONE_AMPLITUDE = 0.25
CLICK_HZ = 1000.0
CLICK_MS = 10.0  # longer than the 5 ms of a segment head that a join cross-fades
CLICK_AMPLITUDE = 0.9
CLICK_LEVEL = 0.5  # above the tone's peak, below the click's
FLASH_LUMA = 200.0
SPEECH_RMS = 0.1  # a 20 ms frame of the tone has RMS 0.18
SILENCE_RMS = 0.05

SPEECH = (
    "Hello there, this is a measurement of the live avatar. It speaks a sentence or two, "
    "and then it waits for the next one."
)
LONG_SPEECH = (
    "This is a long answer that goes on for a while, so that there is time to interrupt it in the "
    "middle of a sentence, and the measurement sees how fast the voice stops when it is told to. "
) * 3

REPO_DIR = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = REPO_DIR.parent / "shared" / "media" / "portrait.png"


# --------------------------------------------------------------------------------- engine
class MarkedEngine:
    """Any :class:`~engine.api.SegmentEngine` with measurement markers (module docstring).

    Frame ``i`` of a segment with ``i % fps == 0`` becomes white; audio is silence, plus the
    tone in ``SPEAK`` segments, plus a click at each of those frames' media time. ``LIPSYNC``
    audio (the user's) is left alone. Other attributes (``sr_width``, ``upgrade``, ...) are the
    inner engine's.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.width, self.height, self.fps = inner.width, inner.height, inner.fps
        self.sample_rate = inner.sample_rate
        self.max_segment_seconds = inner.max_segment_seconds
        self.name = inner.name
        self.notice = inner.notice

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def prepare_identity(self, image: np.ndarray, appearance: str):
        return self.inner.prepare_identity(image, appearance)

    def generate(self, request: SegmentRequest, cancel: Any = None) -> Segment:
        segment = self.inner.generate(request, cancel)
        frames = np.array(segment.frames, copy=True)
        frames[:: self.fps] = 255
        audio = segment.audio
        if request.kind is not SegmentKind.LIPSYNC:
            audio = marker_audio(frames.shape[0], self.fps, segment.sample_rate, tone=request.kind is SegmentKind.SPEAK)
        return dataclasses.replace(segment, frames=frames, audio=audio)


def marker_audio(num_frames: int, fps: int, sample_rate: int, *, tone: bool) -> np.ndarray:
    """Silence (or the tone) with a click at every ``fps``-th frame's media time."""
    count = round(num_frames / fps * sample_rate)
    t = np.arange(count, dtype=np.float64) / sample_rate
    audio = (TONE_AMPLITUDE * np.sin(2 * np.pi * TONE_HZ * t)) if tone else np.zeros(count)
    click_len = round(CLICK_MS / 1000 * sample_rate)
    click = CLICK_AMPLITUDE * np.sin(2 * np.pi * CLICK_HZ * np.arange(click_len) / sample_rate)
    for frame in range(0, num_frames, fps):
        start = round(frame / fps * sample_rate)
        stop = min(count, start + click_len)
        audio[start:stop] = click[: stop - start]
    return audio.astype(np.float32)


def build_marked_engine(name: str, *, delay_s: float = 0.2, sr: bool = False) -> MarkedEngine:
    if name == "testpattern":
        from engine.testpattern import TestPatternEngine

        return MarkedEngine(TestPatternEngine(generate_delay_s=delay_s))
    from engine.factory import build_preview_engine

    if name != "preview":
        raise ValueError(f"engine {name!r}: measure_live runs testpattern or preview")
    return MarkedEngine(build_preview_engine(sr=sr))


# --------------------------------------------------------------------------------- analysis
def frame_rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples)))) if samples.size else 0.0


def flash_onsets(video) -> list:
    return [
        rec
        for i, rec in enumerate(video)
        if rec.mean_luma > FLASH_LUMA and (i == 0 or video[i - 1].mean_luma <= FLASH_LUMA)
    ]


def click_onsets(audio, level: float = CLICK_LEVEL) -> list[tuple[float, float]]:
    """``(pts_s, arrival_s)`` of each click (first sample above ``level`` after >= 0.1 s quiet;
    segments that cut into idle ones start off the one-second grid)."""
    clicks: list[tuple[float, float]] = []
    last_s = -1.0
    for rec in audio:
        loud = np.flatnonzero(np.abs(rec.samples) > level)
        if loud.size == 0:
            continue
        onset_s = rec.pts_s + loud[0] / rec.sample_rate
        if onset_s - last_s > 0.1:
            clicks.append((onset_s, rec.arrival_s + loud[0] / rec.sample_rate))
        last_s = rec.pts_s + loud[-1] / rec.sample_rate
    return clicks


def av_offsets_ms(video, audio, click_level: float = CLICK_LEVEL) -> tuple[list[float], list[float]]:
    """Click minus flash, by pts and by arrival, for every flash with a click within 0.5 s (ms)."""
    clicks = click_onsets(audio, click_level)
    by_pts, by_arrival = [], []
    if not clicks:
        return by_pts, by_arrival
    for flash in flash_onsets(video):
        pts_s, arrival_s = min(clicks, key=lambda c, f=flash: abs(c[0] - f.pts_s))
        if abs(pts_s - flash.pts_s) < 0.5:
            by_pts.append(1000 * (pts_s - flash.pts_s))
            by_arrival.append(1000 * (arrival_s - flash.arrival_s))
    return by_pts, by_arrival


def first_speech_arrival(audio, after_s: float) -> float | None:
    """Arrival of the first of two consecutive tone frames received after ``after_s``."""
    previous = False
    for rec in audio:
        if rec.arrival_s < after_s:
            continue
        loud = frame_rms(rec.samples) > SPEECH_RMS and np.abs(rec.samples).max() < CLICK_LEVEL
        if loud and previous:
            return rec.arrival_s - 0.02
        previous = loud
    return None


def first_silence_arrival(audio, after_s: float) -> float | None:
    """Arrival of the first silent 20 ms frame received after ``after_s``."""
    for rec in audio:
        if rec.arrival_s >= after_s and frame_rms(rec.samples) < SILENCE_RMS:
            return rec.arrival_s
    return None


def summary(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "median": None, "min": None, "max": None}
    return {
        "n": len(values),
        "median": round(statistics.median(values), 1),
        "min": round(min(values), 1),
        "max": round(max(values), 1),
    }


# --------------------------------------------------------------------------------- client side
async def measure(
    url: str, image: bytes, *, utterances: int = 3, interrupts: int = 3, warm_s: float = 3.0, timeout_s: float = 60.0
) -> dict[str, Any]:
    """Run the measurement against a server at ``url`` (module docstring); returns the figures."""
    from clients.client import AvatarClient, split_chunks

    client = AvatarClient(url)
    await client.connect()
    ttff_msg, ttff_audio, silence = [], [], []
    try:
        await client.start_session(image, "A person in front of a plain wall.", timeout_s=timeout_s)
        await client.start_media(timeout_s=timeout_s)
        await asyncio.sleep(warm_s)
        for number in range(utterances):
            utterance_id = f"m{number}"
            sent_s = time.monotonic()
            await client.speak(utterance_id, split_chunks(SPEECH, 3), language="English")
            started = await client.wait_for("speak.started", lambda m, u=utterance_id: m.utterance_id == u, timeout_s=timeout_s)
            ttff_msg.append(1000 * (_arrival(client, started) - sent_s))
            await client.wait_for("speak.ended", lambda m, u=utterance_id: m.utterance_id == u, timeout_s=timeout_s)
            heard_s = first_speech_arrival(client.received.audio, sent_s)
            if heard_s is not None:
                ttff_audio.append(1000 * (heard_s - sent_s))
            await asyncio.sleep(1.0)
        for number in range(interrupts):
            utterance_id = f"i{number}"
            sent_s = time.monotonic()
            await client.speak(utterance_id, split_chunks(LONG_SPEECH, 3), language="English")
            await client.wait_for("speak.started", lambda m, u=utterance_id: m.utterance_id == u, timeout_s=timeout_s)
            deadline_s = time.monotonic() + timeout_s
            while first_speech_arrival(client.received.audio, sent_s) is None:
                if time.monotonic() > deadline_s:
                    raise TimeoutError(f"{utterance_id}: no speech heard within {timeout_s} s")
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.7)  # well inside the speech
            interrupted_s = time.monotonic()
            await client.interrupt()
            await client.wait_for("interrupted", timeout_s=timeout_s)
            await asyncio.sleep(1.0)
            quiet_s = first_silence_arrival(client.received.audio, interrupted_s)
            if quiet_s is not None:
                silence.append(1000 * (quiet_s - interrupted_s))
        await asyncio.sleep(0.5)
        stats = client.messages("stats")[-1].model_dump() if client.messages("stats") else {}
    finally:
        await client.close()
    video, audio = client.received.video, client.received.audio
    by_pts, by_arrival = av_offsets_ms(video, audio)
    audio_steps = np.round(np.diff([a.pts_s for a in audio]) * 1000).astype(int) if len(audio) > 1 else np.zeros(0)
    span_s = video[-1].arrival_s - video[0].arrival_s if len(video) > 1 else 0.0
    return {
        "ttff_speak_started_ms": summary(ttff_msg),
        "ttff_speech_audio_ms": summary(ttff_audio),
        "av_offset_pts_ms": summary(by_pts),
        "av_offset_arrival_ms": summary(by_arrival),
        "interrupt_to_silence_ms": summary(silence),
        "server_interrupt_to_silence_ms": stats.get("interrupt_ms"),
        "underruns": stats.get("underruns"),
        "server_av_offset_ms": stats.get("av_offset_ms"),
        "server_encode_ms": stats.get("encode_ms"),
        "rtf": stats.get("rtf"),
        "gen_ms": stats.get("gen_ms"),
        "audio_timeline_gaps": int(np.count_nonzero(audio_steps != 20)),
        "video_frames": len(video),
        "video_fps": round((len(video) - 1) / span_s, 2) if span_s > 0 else None,
        "max_audio_arrival_gap_ms": round(1000 * max(np.diff([a.arrival_s for a in audio]), default=0.0), 1),
    }


def _arrival(client, message) -> float:
    for arrival_s, candidate in client.received.messages:
        if candidate is message:
            return arrival_s
    return time.monotonic()


# --------------------------------------------------------------------------------- server side
async def _serve(engine_name: str, delay_s: float, sr: bool) -> None:
    """Child process: the server with a marked engine; prints its URL; SIGTERM stops it."""
    from avatar_server.server import build_app
    from avatar_server.settings import Settings

    engine = await asyncio.to_thread(build_marked_engine, engine_name, delay_s=delay_s, sr=sr)
    app = build_app(Settings(engine="testpattern", port=0, sr=sr, log_level="WARNING"), engine)
    await app.start()
    for _ in range(6000):  # engine warm-up: up to 5 minutes
        if app.readiness()[0]:
            break
        await asyncio.sleep(0.05)
    print(f"URL {app.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await app.close()


@contextlib.asynccontextmanager
async def server_process(engine_name: str, *, delay_s: float = 0.2, sr: bool = False, timeout_s: float = 300.0):
    """A child process serving ``engine_name`` (marked); yields its URL."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ops.measure_live", "--serve", engine_name, "--delay-s", str(delay_s),
        *(["--sr"] if sr else []),
        stdout=asyncio.subprocess.PIPE,
        cwd=str(REPO_DIR),
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(timeout_s):
            while True:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    raise RuntimeError(f"server for {engine_name} exited with {await proc.wait()}")
                if line.startswith("URL "):
                    break
        yield line.split()[1]
    finally:
        await stop_process(proc, 20)


# --------------------------------------------------------------------------------- CLI
def _row(engine: str, r: dict[str, Any]) -> str:
    def med(key: str) -> str:
        value = r[key]["median"]
        return "-" if value is None else f"{value:.0f}"

    return (
        f"| {engine} | {med('ttff_speak_started_ms')} | {med('ttff_speech_audio_ms')} | "
        f"{r['av_offset_pts_ms']['median']} [{r['av_offset_pts_ms']['min']}, {r['av_offset_pts_ms']['max']}] | "
        f"{r['av_offset_arrival_ms']['median']} | {med('interrupt_to_silence_ms')} "
        f"(max {r['interrupt_to_silence_ms']['max']}) | {r['underruns']} | {r['rtf']} |"
    )


def _device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0).lower().replace("nvidia ", "").replace(" ", "-")
    except ImportError:
        pass
    return "cpu"


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    image = await asyncio.to_thread(Path(args.image).read_bytes)
    results: dict[str, Any] = {}
    for engine in args.engine:
        async with server_process(engine, delay_s=args.delay_s, sr=args.sr) as url:
            results[engine] = await measure(url, image, utterances=args.utterances, interrupts=args.interrupts)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ops.measure_live", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", action="append", choices=["testpattern", "preview"], help="repeatable")
    p.add_argument("--utterances", type=int, default=3)
    p.add_argument("--interrupts", type=int, default=3)
    p.add_argument("--delay-s", type=float, default=0.2, help="testpattern's simulated generation time")
    p.add_argument("--sr", action="store_true", help="idle super-resolution (preview: 2x)")
    p.add_argument("--image", default=str(DEFAULT_IMAGE))
    p.add_argument("--out", type=Path)
    p.add_argument("--serve", help=argparse.SUPPRESS)  # internal: the server child process
    args = p.parse_args(argv)
    if args.serve:
        asyncio.run(_serve(args.serve, args.delay_s, args.sr))
        return 0
    args.engine = args.engine or ["testpattern", "preview"]
    import logging

    logging.basicConfig(level=logging.WARNING)
    started = time.time()
    results = asyncio.run(_main(args))
    doc = {
        "schema": "avatar-server-live/1",
        "command": "python -m ops.measure_live " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "device": _device(),
        "host_cpus": os.cpu_count(),
        "host_load_avg_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "wall_s": round(time.time() - started, 1),
        "results": results,
    }
    print(
        "| engine | speak->speak.started ms | speak->speech heard ms | A/V offset by pts ms (median [min, max]) "
        "| A/V by arrival ms | interrupt->silence ms | underruns | rtf |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for engine, result in results.items():
        print(_row(engine, result))
    out = args.out or Path(__file__).resolve().parent / "results" / f"{dt.date.today()}_{_device()}-live.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
