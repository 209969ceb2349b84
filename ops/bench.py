"""Segment benchmark of the MagiHuman DiT and its decoders, backend by backend (issue 5).

Measures, for one segment geometry (default 5 s; 448x256 for ``full``, the preview engine's size for
``preview``) and each requested text length and backend:

* ``forward_s``: one DiT forward (median of ``--repeats``);
* ``dit_8step_s``: the distilled sampling loop (``--steps``, default 8) including packing/unpacking;
* ``decode_s``: video decode of the final latent with the pipeline's decoder (Turbo when
  ``engine.codecs.turbo_vae`` provides one, else Wan2.2), plus ``decode_turbo_s`` and ``decode_wan_s``;
* ``first_frame_s``: from the start of the segment (noise drawn, text already encoded) to the first
  decoded frames (Turbo ``decode_chunks`` first window; Wan2.2: its first, causally decodable frame);
* ``segment_s``: end to end. ``preview``: ``build_preview_engine().generate(...)`` (text encoding,
  denoising, video+audio decode, last-frame encode). ``full``: noise, denoising, video decode and
  Oobleck audio decode (no text encoder weights: random text features, text encoding off the
  critical path);
* ``peak_mem_gb``: CUDA ``max_memory_allocated`` per record (decimal GB); on CPU the process's peak
  resident set (``ru_maxrss``, process-wide);
* ``mfu``: FLOPs of the 8-step loop (TIMING.md §2 model, computed from the config) / time / peak.
  Peak: H100 SXM and H200 989 TFLOP/s bf16, 1,979 TFLOP/s FP8 (``fp8`` backend); H100 PCIe 756 /
  1,513; unknown GPUs need ``--peak-tflops``. On CPU the "peak" is a measured GEMM rate in the compute
  dtype (``peak_source`` says so), so CPU MFU is relative to what that CPU's BLAS reaches.
* ``rel_err_vs_eager``: ``‖v - v_eager‖ / ‖v_eager‖`` of one forward's velocity on the same inputs.
* ``compile_s``: wall time of the first forward after applying the backend (compile + autotune for
  ``compile``; near the forward time otherwise).
* ``--graph-loop``: also ``dit_8step_graph_s``, the same loop through :class:`engine.graphs.GraphLoop`
  (noise drawn up front, static inputs; one CUDA graph per shape on CUDA where the backend allows it,
  ``graph_captured``), timed like ``dit_8step_s`` including the up-front noise draws;
  ``graph_first_call_s`` (its first call: warm-up and capture) and ``rel_err_graph_vs_sample`` (final video
  latent against ``sample`` with the same seed); ``segment_s`` then runs the engine with its graph loop on.
  Compare ``dit_8step_graph_s`` with ``dit_8step_s`` per backend ("compile with and without CUDA graphs").
* ``profile_forward`` (``--profile K``): ``torch.profiler`` over one forward, the top ``K`` operators
  and kernels by self time on the device (CUDA kernels on a GPU, CPU operators otherwise), with
  their share of the total; ``--profile-trace-dir`` also writes Chrome traces.

Full preset on a GPU: the 15.3 B model is built on the meta device, materialised with ``to_empty``
and filled with seeded normal draws generated on the device in chunks (:func:`engine.dit.seeded_dit`), so
no checkpoint and no 30 GB of host RAM are needed. Timing: CUDA events around each region after
``--warmup`` runs, median of the repeats.

Usage::

    python -m ops.bench --preset preview --device cpu --backend all --out ops/results/2026-11-22_cpu-preview.json
    python -m ops.bench --preset full --device cuda --backend all --text-tokens 400 640 --profile 15
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib
import json
import logging
import math
import os
import platform
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from engine.config import DiTConfig
from engine.factory import preset_geometry, seeded_preset_dit
from engine.geometry import SegmentGeometry
from engine.runner import DiTRunner
from engine.sampler import DISTILL, generator_noise, sample
from ops.export_onnx import example_inputs, export_name

logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("device", "backend", "text_tokens", "dit_8step_s", "decode_s", "segment_s", "first_frame_s",
                 "peak_mem_gb", "mfu")
DEFAULT_BACKENDS = ("eager", "fast", "compile", "fp8")
AUDIO_CHANNELS = 64

# Dense peak FLOP/s per GPU (bf16, fp8) from NVIDIA's datasheets; H200 has H100 SXM's compute.
PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "H100 PCIe": (756e12, 1513e12),
    "H100 NVL": (835e12, 1671e12),
    "H100": (989e12, 1979e12),  # SXM
    "H200": (989e12, 1979e12),
}

# Wan2.2-TI2V-5B VAE at full size (CODECS.md §1.7).
WAN22_FULL_DIMS = dict(base_dim=160, decoder_base_dim=256, dim_mult=[1, 2, 4, 4], num_res_blocks=2)
# Turbo decoder config (CODECS.md §2.1), for ``TurboVAED.from_config``.
TURBO_FULL_CONFIG = dict(
    latent_channels=48, out_channels=3, decoder_block_out_channels=[64, 128, 256, 512],
    decoder_layers_per_block=[2, 2, 2, 3, 3], decoder_spatio_temporal_scaling=[False, True, True, True],
    decoder_spatio_only=[False, True, False, False], patch_size=2, use_unpatchify=True, first_chunk_size=7,
    step_size=7, spatial_compression_ratio=16, temporal_compression_ratio=4, decoder_causal=False,
    resnet_norm_eps=1e-6,
)
# Preview Turbo decoder: every stride of the real one, small widths, one resnet per stage.
TURBO_PREVIEW_OVERRIDES = dict(decoder_block_out_channels=[2, 2, 4, 4], decoder_layers_per_block=[1, 1, 1, 1, 1])


# ---------------------------------------------------------------------------------------------
# geometry and FLOPs


def linear_flops_per_token(config: DiTConfig) -> int:
    """2 x the block-linear weights one token touches (its own expert in sandwich layers), TIMING.md §2.1."""
    d = config.hidden_size
    total = 0
    for i in range(config.num_layers):
        gelu = i in config.gelu7_layers
        inner = config.gelu_intermediate if gelu else config.swiglu_intermediate
        up_out = inner if gelu else 2 * inner
        total += d * config.qkv_out_features + d * d + d * up_out + inner * d
    return 2 * total


def flops_per_forward(config: DiTConfig, num_video: int, num_audio: int, num_text: int) -> dict[str, int]:
    """FLOPs of one DiT forward (TIMING.md §2): block linears, full attention (``4 L² Hq D`` per layer),
    embedders and final heads. Local-attention layers are counted as full (none in the distilled model)."""
    length = num_video + num_audio + num_text
    d = config.hidden_size
    linear = linear_flops_per_token(config) * length
    attention = config.num_layers * 4 * config.num_heads_q * config.head_dim * length**2
    vid, aud = config.video_in_channels * num_video, config.audio_in_channels * num_audio
    embed = 2 * d * (vid + aud + config.text_in_channels * num_text) + 2 * d * (vid + aud)
    return {"linear": linear, "attention": attention, "embed": embed, "total": linear + attention + embed}


def peak_flops_for(device_name: str, fp8: bool) -> float | None:
    """Datasheet dense peak of a known GPU (first table key contained in the name), else None."""
    for key, (bf16, f8) in PEAK_FLOPS.items():
        if key.lower() in device_name.lower():
            return f8 if fp8 else bf16
    return None


def measure_gemm_peak(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """Achieved FLOP/s of a square GEMM in ``dtype`` (the CPU's practical ceiling, METHOD.md)."""
    gen = torch.Generator(device=device).manual_seed(1)
    a = torch.randn(size, size, generator=gen, device=device).to(dtype)
    b = torch.randn(size, size, generator=gen, device=device).to(dtype)
    times = measure(lambda: torch.matmul(a, b), device=device, warmup=1, repeats=repeats)
    return 2 * size**3 / min(times)  # a ceiling: the best observed rate


# ---------------------------------------------------------------------------------------------
# models


# ---------------------------------------------------------------------------------------------
# timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], *, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of ``fn``: CUDA events on GPU (after a synchronize), ``perf_counter`` on CPU."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def profile_top(fn: Callable[[], object], device: torch.device, *, top_k: int = 15,
                trace_path: Path | None = None) -> dict:
    """Where one call of ``fn`` spends its time: ``torch.profiler`` over one call (after the caller's
    warm-up), operators and kernels ranked by *self* time on the device (CUDA kernels on a GPU; CPU
    operators otherwise).

    Returns:
        ``{"sort": "self_device_time" | "self_cpu_time", "total_ms": float, "top": [{"name",
        "self_ms", "calls", "share"}, ...]}`` with ``share`` the fraction of ``total_ms`` (the sum of
        self times of every event), at most ``top_k`` rows, largest first. ``trace_path``: also a
        Chrome trace (open in Perfetto or chrome://tracing).
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    if trace_path is not None:
        trace_path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace_path))
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    total_us = sum(getattr(e, attr) for e in events)
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    top = [{"name": e.key, "self_ms": getattr(e, attr) / 1e3, "calls": e.count,
            "share": getattr(e, attr) / total_us if total_us else 0.0} for e in events[:top_k]]
    return {"sort": "self_device_time" if cuda else "self_cpu_time", "total_ms": total_us / 1e3, "top": top}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# ---------------------------------------------------------------------------------------------
# decoders


class VideoDecoder:
    """A video decoder under test: ``decode(latent)`` and ``stream(latent)`` (frame chunks as they are ready)."""

    def __init__(self, name: str, impl, first_frame_method: str):
        self.name, self.impl, self.first_frame_method = name, impl, first_frame_method

    def decode(self, latent: torch.Tensor):
        fn = getattr(self.impl, "decode_to_uint8", None) or self.impl.decode
        return fn(latent)

    def stream(self, latent: torch.Tensor) -> Iterator[object]:
        chunks = getattr(self.impl, "decode_chunks", None)
        if chunks is not None:
            yield from chunks(latent)
        elif self.name == "wan2.2":
            # Wan2.2's decoder is causal in time: latent frame 0 alone decodes to output frame 0, which can be
            # sent while the whole segment decodes (the first frame is decoded twice).
            yield self.impl.decode(latent[:, :, :1])
            yield self.decode(latent)
        else:
            yield self.decode(latent)


def build_wan(preset: str, device: torch.device, seed: int) -> VideoDecoder:
    from engine.codecs.video_vae import WanVideoVAE

    if preset == "preview":
        wan = WanVideoVAE.preview(seed=seed).to(device)
    else:
        from diffusers import AutoencoderKLWan

        from engine.codecs.video_vae import WAN22_LATENT_MEAN, WAN22_LATENT_STD

        torch.manual_seed(seed)
        layout = dict(z_dim=48, temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                      out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
                      latents_mean=list(WAN22_LATENT_MEAN), latents_std=list(WAN22_LATENT_STD))
        wan = WanVideoVAE(AutoencoderKLWan(**WAN22_FULL_DIMS, **layout)).to(device, torch.bfloat16)
    return VideoDecoder("wan2.2", wan, "wan2.2 causal first frame")


def build_turbo(preset: str, device: torch.device, seed: int) -> tuple[VideoDecoder | None, str]:
    """The Turbo decoder of :mod:`engine.codecs.turbo_vae` with seeded default-initialised weights.

    ``full``: ``TurboVAED.from_config`` with the real config (CODECS.md §2.1), bf16 on ``device``;
    ``preview``: ``TurboVAED.preview(seed=...)`` if the class has it, else the same strides at small widths
    (:data:`TURBO_PREVIEW_OVERRIDES`), fp32. Returns ``(decoder or None, status)``; a missing module or an
    unexpected API is reported, not raised, so that the rest is still measured.
    """
    try:
        cls = importlib.import_module("engine.codecs.turbo_vae").TurboVAED
        torch.manual_seed(seed)
        if preset == "full":
            impl = cls.from_config(dict(TURBO_FULL_CONFIG)).to(device, torch.bfloat16)
        elif hasattr(cls, "preview"):
            impl = cls.preview(seed=seed).to(device)
        else:
            impl = cls.from_config({**TURBO_FULL_CONFIG, **TURBO_PREVIEW_OVERRIDES}).to(device)
        impl.eval().requires_grad_(False)
        method = "turbo decode_chunks first window" if hasattr(impl, "decode_chunks") else "turbo full decode"
        return VideoDecoder("turbo", impl, method), "ok"
    except Exception as exc:
        return None, f"unavailable: {type(exc).__name__}: {exc}"


def build_audio_vae(preset: str, device: torch.device, seed: int):
    from engine.codecs.audio_vae import OobleckAudioVAE

    if preset == "preview":  # as build_preview_engine builds it: 12.8 kHz model rate, bf16 encoder
        from engine.factory import PREVIEW_AUDIO_MODEL_RATE_HZ

        return OobleckAudioVAE.preview(seed=seed, encode_dtype=torch.bfloat16,
                                       model_sample_rate=PREVIEW_AUDIO_MODEL_RATE_HZ)
    from diffusers import AutoencoderOobleck

    torch.manual_seed(seed)
    vae = OobleckAudioVAE(AutoencoderOobleck())  # diffusers' defaults are Stable-Audio-Open's (CODECS.md §3.1)
    vae.vae.to(device)
    return vae


# ---------------------------------------------------------------------------------------------
# one segment


def run_segment(velocity, geo: SegmentGeometry, steps: int, device: torch.device, seed: int,
                decoder: VideoDecoder | None, audio_vae) -> dict[str, float]:
    """Noise -> ``steps`` distilled steps -> streamed video decode -> audio decode, with wall-clock marks
    (synchronised). Returns seconds from the start to ``dit``, ``first_frame``, ``video`` and ``end``."""
    marks: dict[str, float] = {}
    _sync(device)
    t0 = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(seed)
    audio = torch.randn(1, geo.audio_tokens, AUDIO_CHANNELS, generator=gen, device=device)
    video = torch.randn(geo.latent_shape(), generator=gen, device=device)
    image_latent = torch.randn(geo.latent_shape()[:2] + (1,) + geo.latent_shape()[3:], generator=gen, device=device)
    config = dataclasses.replace(DISTILL, num_steps=steps)
    with torch.inference_mode():
        video, audio = sample(velocity, video, audio, config, image_latent=image_latent, noise_fn=generator_noise(gen))
        _sync(device)
        marks["dit"] = time.perf_counter() - t0
        if decoder is not None:
            for i, _frames in enumerate(decoder.stream(video)):
                if i == 0:
                    _sync(device)
                    marks["first_frame"] = time.perf_counter() - t0
            _sync(device)
            marks["video"] = time.perf_counter() - t0
        if audio_vae is not None:
            audio_vae.decode(audio)
    _sync(device)
    marks["end"] = time.perf_counter() - t0
    return marks


def _preview_prompt(engine, text_tokens: int) -> tuple[str, int]:
    """A prompt that the preview ByteTokenizer turns into ``text_tokens`` tokens (BOS + bytes)."""
    prompt = "x" * max(text_tokens - 1, 1)
    return prompt, engine.text_encoder.encode(prompt)[1]


def _bench_text_encoder(text_encoder, device: torch.device, text_tokens: int, repeats: int = 3) -> dict:
    """``text_encode_s``: median seconds to encode a prompt of ``text_tokens`` ByteTokenizer tokens
    (cache bypassed) with the resident encoder, its parameter count and dtype."""
    prompt = "x" * max(text_tokens - 1, 1)  # BOS + one token per byte
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        _sync(device)
        t0 = time.perf_counter()
        text_encoder.encode(prompt + " " * len(times))  # another prompt each time: no cache hit
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"text_encode_s": _median(times[1:]),
            "text_encoder_params": sum(p.numel() for p in text_encoder.model.parameters()),
            "text_encoder_dtype": str(next(text_encoder.model.parameters()).dtype).replace("torch.", "")}


# ---------------------------------------------------------------------------------------------
# the benchmark


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu: {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"cpu: {platform.processor() or platform.machine()}"


def _peak_mem_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def bench_backend(args, ctx: dict, backend: str, text_tokens: int) -> dict:
    """One record: every figure of one backend at one text length."""
    from engine.backends import apply_backend

    device, dit, geo = ctx["device"], ctx["dit"], ctx["geo"]
    record: dict = {"device": ctx["device_name"], "backend": backend, "text_tokens": text_tokens,
                    "seq_len": geo.video_tokens + geo.audio_tokens + text_tokens, "steps": args.steps}
    _reset_peak(device)
    options = {"attention": args.attention, "compile_mode": args.compile_mode, "compile_scope": args.compile_scope,
               "fp8_impl": args.fp8_impl}
    if backend == "tensorrt":
        name = export_name(args.preset, geo.width, geo.height, geo.seconds, text_tokens, args.onnx_dtype)
        options = {"onnx_path": Path(args.onnx_dir or ".") / f"{name}.onnx"}
    runner: DiTRunner = ctx["runner"]
    info = apply_backend(runner, backend, device, **options)  # the runner's step; also sets before_call
    record["backend_info"] = info.to_dict()

    packed = ctx["packed"][text_tokens]
    text = ctx["text"][text_tokens]

    def forward():
        if runner.before_call is not None:
            runner.before_call()
        with torch.inference_mode():
            return runner.forward(packed)

    _sync(device)
    t0 = time.perf_counter()
    out = forward()
    _sync(device)
    record["compile_s"] = time.perf_counter() - t0
    eager_out = ctx["eager_out"].get(text_tokens)
    record["rel_err_vs_eager"] = None if eager_out is None else _rel(out, eager_out)
    if backend == "eager":
        ctx["eager_out"][text_tokens] = out.detach().clone()
        record["rel_err_vs_eager"] = 0.0
    forward_times = measure(forward, device=device, warmup=args.warmup, repeats=args.repeats)
    record["forward_s"], record["forward_s_all"] = _median(forward_times), forward_times
    record["forward_min_s"] = min(forward_times) if forward_times else None
    if args.profile:
        trace = None
        if args.profile_trace_dir is not None:
            trace = args.profile_trace_dir / f"{backend.replace('+', '_')}-{text_tokens}.trace.json"
        record["profile_forward"] = profile_top(forward, device, top_k=args.profile, trace_path=trace)

    inputs = runner.prepare(geo.latent_shape(dit.config.latent_channels), geo.audio_tokens, text, text_tokens)
    velocity = runner.velocity_fn(inputs)
    config = dataclasses.replace(DISTILL, num_steps=args.steps)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    video0 = torch.randn(geo.latent_shape(), generator=gen, device=device)
    audio0 = torch.randn(1, geo.audio_tokens, AUDIO_CHANNELS, generator=gen, device=device)

    def loop():
        with torch.inference_mode():
            return sample(velocity, video0, audio0, config, noise_fn=generator_noise(gen))

    loop_times = measure(loop, device=device, warmup=min(args.warmup, 1), repeats=args.loop_repeats)
    record["dit_8step_s"], record["dit_8step_s_all"] = _median(loop_times), loop_times
    record["dit_8step_min_s"] = min(loop_times) if loop_times else None
    if getattr(args, "graph_loop", False):
        record.update(bench_graph_loop(args, runner, inputs, config, video0, audio0))

    decoder = ctx["decoders"][0] if ctx["decoders"] else None
    seg_marks = [run_segment(velocity, geo, args.steps, device, args.seed, decoder, ctx["audio_vae"])
                 for _ in range(args.loop_repeats)]
    record["first_frame_s"] = _median([m["first_frame"] for m in seg_marks if "first_frame" in m])
    record["first_frame_method"] = decoder.first_frame_method if decoder is not None else None
    record["segment_core_s"] = _median([m["end"] for m in seg_marks])
    if args.preset == "preview" and ctx.get("engine") is not None and not args.no_generate:
        record.update(_bench_generate(args, ctx, text_tokens))
    else:
        record["segment_s"] = record["segment_core_s"]
        record["segment_method"] = "noise + denoise + video decode + audio decode (no text encoder)"
    record.update(ctx["decode"])
    text_encoder = ctx.get("text_encoder")
    if text_encoder is not None:
        record.update(_bench_text_encoder(text_encoder, device, text_tokens))
    record["peak_mem_gb"] = _peak_mem_gb(device)

    flops = flops_per_forward(dit.config, geo.video_tokens, geo.audio_tokens, text_tokens)
    record["flops_per_forward"] = flops["total"]
    record["flops_breakdown"] = flops
    peak, source = ctx["peak"](info.fp8 == "scaled_mm")
    record["peak_flops"], record["peak_source"] = peak, source
    peak_bf16 = ctx["peak"](False)[0]
    loop_flops_per_s = args.steps * flops["total"] / record["dit_8step_s"]
    record["achieved_tflops"] = loop_flops_per_s / 1e12
    record["mfu"] = loop_flops_per_s / peak if peak else None
    record["mfu_forward"] = flops["total"] / record["forward_s"] / peak if peak else None
    record["mfu_vs_bf16_peak"] = loop_flops_per_s / peak_bf16 if peak_bf16 else None
    return record


def bench_graph_loop(args, runner: DiTRunner, inputs, config, video0: torch.Tensor, audio0: torch.Tensor) -> dict:
    """The distilled loop through :class:`engine.graphs.GraphLoop` on the prepared ``inputs`` (see the
    module doc's ``--graph-loop``): first call (warm-up and capture), median of ``--loop-repeats`` calls
    including the up-front noise draws, and the relative error of the final video latent against
    :func:`engine.sampler.sample` with the same seed."""
    from engine.graphs import GraphLoop, draw_step_noise

    device = video0.device
    loop = GraphLoop(runner)

    def run_graph(gen: torch.Generator):
        with torch.inference_mode():
            noise = draw_step_noise(gen, video0, audio0, config.num_steps)
            return loop.run(inputs, video0, audio0, config, noise)

    gen = torch.Generator(device=device).manual_seed(args.seed)
    _sync(device)
    t0 = time.perf_counter()
    graph_video, _ = run_graph(torch.Generator(device=device).manual_seed(args.seed))
    _sync(device)
    first_s = time.perf_counter() - t0
    with torch.inference_mode():
        ref_video, _ = sample(runner.velocity_fn(inputs), video0, audio0, config,
                              noise_fn=generator_noise(torch.Generator(device=device).manual_seed(args.seed)))
    times = measure(lambda: run_graph(gen), device=device, warmup=min(args.warmup, 1), repeats=args.loop_repeats)
    return {"dit_8step_graph_s": _median(times), "dit_8step_graph_s_all": times,
            "dit_8step_graph_min_s": min(times) if times else None, "graph_first_call_s": first_s,
            "graph_captured": loop.captures > 0, "rel_err_graph_vs_sample": _rel(graph_video, ref_video)}


def _bench_generate(args, ctx: dict, text_tokens: int) -> dict:
    """Median wall time of ``engine.generate`` for a speak segment of the geometry (preview only)."""
    from engine.api import SegmentKind, SegmentRequest

    engine = ctx["engine"]
    engine.sampler = dataclasses.replace(engine.sampler, num_steps=args.steps)
    prompt, num_text = _preview_prompt(engine, text_tokens)
    request = SegmentRequest(identity=ctx["identity"], kind=SegmentKind.SPEAK, prompt=prompt,
                             seconds=args.seconds, seed=args.seed)
    times, timings = [], {}
    for i in range(args.loop_repeats + min(args.warmup, 1)):
        _sync(ctx["device"])
        t0 = time.perf_counter()
        segment = engine.generate(request)
        _sync(ctx["device"])
        if i >= min(args.warmup, 1):
            times.append(time.perf_counter() - t0)
            timings = segment.timings_s
    return {"segment_s": _median(times), "segment_s_all": times, "segment_text_tokens": num_text,
            "segment_method": "build_preview_engine().generate (text, denoise, video+audio decode, last-frame encode)",
            "segment_stage_s": timings}


def _decode_figures(args, ctx: dict) -> dict:
    device, geo = ctx["device"], ctx["geo"]
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    latent = torch.randn(geo.latent_shape(), generator=gen, device=device)
    figures = {"decode_turbo_s": None, "decode_wan_s": None, "turbo_status": ctx["turbo_status"]}
    for decoder in ctx["decoders"]:
        times = measure(lambda d=decoder: d.decode(latent), device=device, warmup=min(args.warmup, 1),
                        repeats=args.loop_repeats)
        figures["decode_turbo_s" if decoder.name == "turbo" else "decode_wan_s"] = _median(times)
    primary = ctx["decoders"][0] if ctx["decoders"] else None
    figures["decoder"] = primary.name if primary else None
    figures["decode_s"] = figures["decode_turbo_s"] if primary and primary.name == "turbo" else figures["decode_wan_s"]
    return figures


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ops.bench", description="MagiHuman segment benchmark (issue 5)")
    p.add_argument("--preset", choices=("full", "preview"), default="preview")
    p.add_argument("--backend", default="all",
                   help="eager|fast|compile|fp8|tensorrt (components combine with '+', e.g. fp8+compile), a comma "
                        "list, or 'all' (= eager,fast,compile,fp8, plus fp8+compile on CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--text-tokens", type=int, nargs="+", default=[400, 640])
    p.add_argument("--seconds", type=float, default=5.0, help="segment length (5 s: 126 audio latents, T = 32)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10, help="repeats of the single forward")
    p.add_argument("--loop-repeats", type=int, default=3, help="repeats of the loop, decode and segment")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compute-dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 on CUDA, fp32 on CPU (the preview engine's choice)")
    p.add_argument("--attention", default=None, help="force an attention kernel (flash_attn_3, flash_attn_2, sdpa)")
    p.add_argument("--compile-mode", default=None)
    p.add_argument("--compile-scope", choices=("layer", "model"), default="layer")
    p.add_argument("--compile-cache", type=Path, default=None, help="mega-cache blob to load before and save after")
    p.add_argument("--fp8-impl", choices=("auto", "scaled_mm", "emulate"), default="auto")
    p.add_argument("--onnx-dir", type=Path, default=None, help="tensorrt: directory of ops.export_onnx files")
    p.add_argument("--onnx-dtype", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the peak used for MFU")
    p.add_argument("--no-generate", action="store_true", help="preview: skip engine.generate")
    p.add_argument("--graph-loop", action="store_true",
                   help="also time the distilled loop through engine.graphs.GraphLoop (one CUDA graph per shape on "
                        "CUDA); the preview engine's generate runs with it too")
    p.add_argument("--resident-text-encoder", action="store_true",
                   help="keep the text encoder resident (full: T5Gemma 9B shapes, seeded, bf16) so peak_mem_gb counts "
                        "DiT + Turbo decoder + text encoder; adds text_encode_s per record")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--profile", type=int, default=0, metavar="K",
                   help="torch.profiler over one forward per record: the top K operators/kernels by self time")
    p.add_argument("--profile-trace-dir", type=Path, default=None, help="with --profile: write Chrome traces here")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def _backends(spec: str, device: torch.device) -> list[str]:
    if spec == "all":  # FP8 is only worth compiling where it is real (emulated on CPU)
        names = list(DEFAULT_BACKENDS) + (["fp8+compile"] if device.type == "cuda" else [])
    else:
        names = [b.strip() for b in spec.split(",") if b.strip()]
    if "eager" in names:  # the reference first, so that every record can report its error against it
        names.remove("eager")
    return ["eager", *names]


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark described by ``args``; returns the result document."""
    from engine.backends import BackendUnavailableError, reset_backend

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.compute_dtype)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    geo = preset_geometry(args.preset, args.seconds, args.width, args.height)
    if args.compile_cache is not None:
        from engine.backends.compile import load_compile_cache

        load_compile_cache(args.compile_cache)

    load_before = os.getloadavg()
    ctx: dict = {"device": device, "geo": geo, "dtype": dtype, "device_name": _device_name(device), "eager_out": {}}
    t0 = time.perf_counter()
    if args.preset == "preview":
        from engine.factory import build_preview_engine

        engine = build_preview_engine(seed=args.seed, device=str(device), width=geo.width, height=geo.height,
                                      compute_dtype=dtype, graph_loop=args.graph_loop)
        ctx["engine"], ctx["dit"], ctx["runner"] = engine, engine.dit, engine.runner
        rng = np.random.default_rng(args.seed)
        image = rng.integers(0, 256, (geo.height, geo.width, 3), dtype=np.uint8)
        ctx["identity"] = engine.prepare_identity(image, "benchmark identity")
    else:
        ctx["dit"] = seeded_preset_dit("full", device, args.seed)
        ctx["runner"] = DiTRunner(ctx["dit"], compute_dtype=dtype)
    build_s = time.perf_counter() - t0
    if args.resident_text_encoder:
        if ctx.get("engine") is not None:
            ctx["text_encoder"] = ctx["engine"].text_encoder
        else:
            from engine.codecs.text_encoder import T5GemmaTextEncoder

            t1 = time.perf_counter()
            ctx["text_encoder"] = T5GemmaTextEncoder.seeded(device, torch.bfloat16, args.seed)
            logger.info("seeded T5Gemma 9B encoder resident on %s in %.1f s", device, time.perf_counter() - t1)
    turbo, ctx["turbo_status"] = build_turbo(args.preset, device, args.seed)
    ctx["decoders"] = [d for d in (turbo, build_wan(args.preset, device, args.seed)) if d is not None]
    ctx["audio_vae"] = build_audio_vae(args.preset, device, args.seed)

    cfg = ctx["dit"].config
    gen = torch.Generator().manual_seed(args.seed + 2)
    ctx["text"] = {n: torch.randn(640, cfg.text_in_channels, generator=gen).to(device) for n in args.text_tokens}
    ctx["packed"] = {n: example_inputs(cfg, geo, n, device, seed=args.seed) for n in args.text_tokens}

    if args.peak_tflops:
        fixed = args.peak_tflops * 1e12
        ctx["peak"] = lambda fp8: (fixed, "--peak-tflops")
    elif device.type == "cuda":
        name = ctx["device_name"]
        ctx["peak"] = lambda fp8: (peak_flops_for(name, fp8), f"datasheet dense {'fp8' if fp8 else 'bf16'} ({name})")
    else:
        gemm = measure_gemm_peak(device, dtype)
        ctx["peak"] = lambda fp8: (gemm, f"measured {str(dtype).replace('torch.', '')} 2048^3 GEMM on this CPU")
    ctx["decode"] = _decode_figures(args, ctx)

    records = []
    for text_tokens in args.text_tokens:
        for backend in _backends(args.backend, device):
            logger.info("benchmark %s, %d text tokens", backend, text_tokens)
            try:
                records.append(bench_backend(args, ctx, backend, text_tokens))
            except Exception as exc:  # one failing backend (missing package, OOM) must not lose the others
                if isinstance(exc, BackendUnavailableError):
                    logger.warning("backend %s unavailable: %s", backend, exc)
                else:
                    logger.exception("backend %s failed", backend)
                records.append({"device": ctx["device_name"], "backend": backend, "text_tokens": text_tokens,
                                "error": f"{type(exc).__name__}: {exc}"})
            finally:
                reset_backend(ctx["runner"])
    if args.compile_cache is not None:
        from engine.backends.compile import save_compile_cache

        save_compile_cache(args.compile_cache)

    return {
        "schema": "avatar-server-bench/1",
        "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m ops.bench " + " ".join(sys.argv[1:]),
        "preset": args.preset,
        "device": ctx["device_name"],
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "compute_dtype": str(dtype).replace("torch.", ""),
        "geometry": geo.to_dict(),
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "loop_repeats": args.loop_repeats,
        "graph_loop": args.graph_loop,
        "model_build_s": build_s,
        "host_cpus": os.cpu_count(),
        "host_load_avg_1m": {"start": load_before[0], "end": os.getloadavg()[0]},
        "results": records,
    }


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 10 ** -digits or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)


def format_table(doc: dict) -> str:
    """A fixed-width table of the records (seconds, GB, MFU in %)."""
    cols = [("backend", "backend"), ("text_tokens", "Nt"), ("forward_s", "fwd_s"), ("dit_8step_s", "loop_s"),
            ("dit_8step_graph_s", "graph_loop_s"),
            ("decode_s", "dec_s"), ("first_frame_s", "first_s"), ("segment_s", "seg_s"), ("compile_s", "first_call_s"),
            ("peak_mem_gb", "mem_gb"), ("mfu", "mfu_%"), ("rel_err_vs_eager", "rel_err")]
    rows = [[h for _, h in cols]]
    for r in doc["results"]:
        if "error" in r:
            rows.append([r["backend"], str(r["text_tokens"]), "error: " + r["error"][:80]])
            continue
        row = []
        for key, _ in cols:
            v = r.get(key)
            row.append(_fmt(100 * v, 1) if key == "mfu" and v is not None else _fmt(v))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows if i < len(r) and len(r) == len(cols)) for i in range(len(cols))]
    lines = [f"{doc['device']} | torch {doc['torch']} | cuda {doc['cuda']} | {doc['preset']} "
             f"{doc['geometry']['width']}x{doc['geometry']['height']} {doc['geometry']['seconds']:g} s, "
             f"{doc['steps']} steps, {doc['compute_dtype']}"]
    for row in rows:
        if len(row) == len(cols):
            lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        else:
            lines.append("  ".join(row))
    return "\n".join(lines)


def format_profile(record: dict) -> str:
    """The ``profile_forward`` of one record as lines: share, self time, calls, name."""
    prof = record["profile_forward"]
    lines = [f"top {len(prof['top'])} by {prof['sort']} in one forward: {record['backend']}, "
             f"{record['text_tokens']} text tokens (total {prof['total_ms']:.1f} ms)"]
    for row in prof["top"]:
        lines.append(f"  {100 * row['share']:5.1f} %  {row['self_ms']:9.2f} ms  {row['calls']:6d}x  {row['name'][:90]}")
    return "\n".join(lines)


def default_out(doc: dict) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", doc["device"].lower().replace("nvidia", "")).strip("-")
    if doc["device_type"] == "cpu":
        slug = "cpu"
    date = doc["created_utc"][:10]
    return Path(__file__).resolve().parent / "results" / f"{date}_{slug}-{doc['preset']}.json"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--cp" in argv:  # context-parallel scaling (issue 14) is measured by ops/bench_cp.py
        from ops import bench_cp

        return bench_cp.main(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = _parse(argv)
    doc = run(args)
    out = args.out or default_out(doc)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    print(format_table(doc))
    for r in doc["results"]:
        if "profile_forward" in r:
            print(format_profile(r))
    print(f"wrote {out}")
    return 0


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


if __name__ == "__main__":
    raise SystemExit(main())
