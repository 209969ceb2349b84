"""Preview lip-sync segment benchmark on CPU: where the time of one live-microphone segment goes.

Builds :func:`engine.factory.build_preview_engine` and generates ``--repeats`` lip-sync segments
(``SegmentKind.LIPSYNC``) of ``--seconds`` seconds of real speech (default: the first seconds of
``shared/media/english.wav``, resampled to the microphone's 48 kHz as a live session sends it, with
the prompt a live session builds for lip-sync). Prints, per stage of ``segment.timings_s``
(``encode_audio``, ``text``, ``dit``, ``decode_video``, ``decode_audio``, ``encode_last_frame``,
``total``), the minimum and the median in seconds, the real-time factor (generation time / media
duration) of the total, ``torch.get_num_threads()`` and the 1-minute load average before and after
(on a shared machine read the minima; a load average above the CPU count means neighbours ran).

``--encode-only`` also times the Oobleck encode alone (``OobleckAudioVAE.encode``) on the same audio.
``--oobleck-rate 51200`` swaps in the preview Oobleck VAE at the released model rate (hop 2048, bf16
encoder: the preview engine before it moved to 12.8 kHz), for before/after comparisons in one run.

Usage::

    python -m ops.bench_lipsync --repeats 7
    python -m ops.bench_lipsync --repeats 7 --json ops/results/<date>_cpu-lipsync.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import soxr
import torch

SHARED_MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"
MIC_RATE_HZ = 48_000  # streaming.microphone.MIC_SAMPLE_RATE_HZ (what a live session passes)
STAGES = ("encode_audio", "text", "dit", "decode_video", "decode_audio", "encode_last_frame", "total")


def load_speech(path: Path, seconds: float, rate_hz: int) -> np.ndarray:
    """First ``seconds`` of ``path`` as mono float32 ``[round(seconds * rate_hz)]`` at ``rate_hz`` Hz.

    Raises:
        ValueError: the file is shorter than ``seconds``.
    """
    import av

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=stream.rate)
        chunks = [out.to_ndarray().reshape(-1) for frame in container.decode(stream)
                  for out in resampler.resample(frame)]
        source_rate = stream.rate
    mono = np.concatenate(chunks).astype(np.float32)
    if source_rate != rate_hz:
        mono = soxr.resample(mono, source_rate, rate_hz).astype(np.float32, copy=False)
    n = int(round(seconds * rate_hz))
    if mono.shape[0] < n:
        raise ValueError(f"{path} has {mono.shape[0] / rate_hz:.2f} s of audio, need {seconds} s")
    return mono[:n]


def _load_1m() -> float:
    return os.getloadavg()[0]


def _summary(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "all": values}


def run(args: argparse.Namespace) -> dict:
    """Build the preview engine, time the segments, return the figures (seconds)."""
    from PIL import Image

    from engine.api import SegmentKind, SegmentRequest
    from engine.factory import build_preview_engine
    from streaming.text import build_prompt

    load_start = _load_1m()
    t0 = time.perf_counter()
    engine = build_preview_engine(seed=0)
    if args.oobleck_rate is not None:
        from engine.codecs.audio_vae import OobleckAudioVAE

        engine.audio_vae = OobleckAudioVAE.preview(seed=0, encode_dtype=torch.bfloat16,
                                                   model_sample_rate=args.oobleck_rate)
    build_s = time.perf_counter() - t0
    image = np.asarray(Image.open(SHARED_MEDIA / "portrait.png").convert("RGB"))
    appearance = "A man in a green shirt at a cooking demo."
    identity = engine.prepare_identity(image, appearance)
    speech = load_speech(args.audio, args.seconds, MIC_RATE_HZ)
    prompt = build_prompt(appearance, SegmentKind.LIPSYNC, "")
    stages: dict[str, list[float]] = {name: [] for name in STAGES}
    rtf: list[float] = []
    for i in range(args.warmup + args.repeats):
        request = SegmentRequest(identity=identity, kind=SegmentKind.LIPSYNC, prompt=prompt, seconds=args.seconds,
                                 seed=i, audio=speech, audio_sample_rate=MIC_RATE_HZ)
        segment = engine.generate(request)
        if i < args.warmup:
            continue
        for name in STAGES:
            stages[name].append(segment.timings_s.get(name, 0.0))
        rtf.append(segment.timings_s["total"] / segment.duration_s)
    result = {
        "schema": "avatar-server-bench-lipsync/1",
        "date": dt.date.today().isoformat(),
        "command": " ".join(["python -m ops.bench_lipsync", *sys.argv[1:]]),
        "cpu": platform.processor() or platform.machine(),
        "host_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "seconds": args.seconds,
        "audio": str(args.audio.name),
        "audio_rate_hz": MIC_RATE_HZ,
        "frames": int(segment.frames.shape[0]),
        "media_s": segment.duration_s,
        "oobleck_model_rate_hz": int(getattr(engine.audio_vae, "model_sample_rate", 51_200)),
        "build_s": build_s,
        "repeats": args.repeats,
        "stages_s": {name: _summary(values) for name, values in stages.items()},
        "rtf": _summary(rtf),
    }
    if args.encode_only:
        enc = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            engine.audio_vae.encode(speech, MIC_RATE_HZ, generator=torch.Generator().manual_seed(0))
            enc.append(time.perf_counter() - t0)
        result["encode_only_s"] = _summary(enc)
    result["host_load_avg_1m"] = {"start": load_start, "end": _load_1m()}
    return result


def _print(result: dict) -> None:
    print(f"preview lip-sync, {result['seconds']} s of {result['audio']} at {result['audio_rate_hz']} Hz -> "
          f"{result['frames']} frames ({result['media_s']:.2f} s); Oobleck model rate "
          f"{result['oobleck_model_rate_hz']} Hz; torch threads {result['torch_threads']} of "
          f"{result['host_cpus']} CPUs; load avg 1m {result['host_load_avg_1m']['start']:.2f} -> "
          f"{result['host_load_avg_1m']['end']:.2f}; {result['repeats']} repeats")
    print(f"{'stage':<18} {'min s':>8} {'median s':>9}")
    for name, fig in result["stages_s"].items():
        print(f"{name:<18} {fig['min']:8.3f} {fig['median']:9.3f}")
    print(f"{'RTF (total/media)':<18} {result['rtf']['min']:8.3f} {result['rtf']['median']:9.3f}")
    if "encode_only_s" in result:
        fig = result["encode_only_s"]
        print(f"{'encode alone':<18} {fig['min']:8.3f} {fig['median']:9.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ops.bench_lipsync", description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=2.0, help="segment length (the live session's default, 2 s)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--audio", type=Path, default=SHARED_MEDIA / "english.wav")
    p.add_argument("--encode-only", action="store_true", help="also time the Oobleck encode alone")
    p.add_argument("--oobleck-rate", type=int, choices=(12_800, 51_200), default=None,
                   help="Oobleck model rate in Hz (default: the preview engine's own)")
    p.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    args = p.parse_args(argv)
    result = run(args)
    _print(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
