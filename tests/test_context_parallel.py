"""Ulysses context parallelism (engine.context_parallel) on CPU: gloo process groups of 2 and 4 ranks on
127.0.0.1, checked against the one-process forward of the same weights.

Tolerance of the fp32 path (``compute_dtype=float32``): ``rel_l2 <= 1e-5`` and ``max_abs <= 5e-5``, the
fixtures README's fp32-path tolerance (§1.5). Splitting the sequence changes no formula, only the row
count of every GEMM (each rank multiplies ``L/cp`` rows), so BLAS may pick other blockings and reassociate
fp32 sums: measured 1.3e-6 rel_l2 / 5e-6 max_abs over the six layers of the tiny config. A layout error
(a query head reading the wrong K/V head, a rotary or local-attention window at a local instead of the
global position, a padding token used as a key) moves the output by 1e-2 or more.

The bf16 path (the reference numerics) is compared with the fixture README's bf16 tolerance (rel_l2 3e-2):
the different GEMM blockings flip bf16 roundings of single elements (measured up to 9e-3 rel_l2 on the
6-token case d, 1e-7 elsewhere).

Every spawned group uses a file store in a temporary directory and a short collective timeout, so a
broken test fails within seconds instead of hanging.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.config import DiTConfig, full_config, preview_config
from engine.context_parallel import (
    CommStats,
    ContextParallelEngine,
    ContextParallelError,
    DistributedDiT,
    ShardPlan,
    _Channel,
    allowed_degrees,
    check_degree,
    comm_bytes_per_layer,
    distributed_step,
    forward_replicated,
    serve_forwards,
)
from engine.dit import DiTModel, init_seeded

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "upstream"
REPO = Path(__file__).resolve().parents[1]
FP32_REL, FP32_ABS = 1e-5, 5e-5
BF16_REL = 3e-2
CASES = ("case_a_t2v_v2", "case_b_sr_v1", "case_c_no_audio_v2", "case_d_single_frame_v2", "case_e_local_attn_v2")

needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"shared fixtures not found at {FIXTURES}")


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny_config() -> DiTConfig:
    meta = json.loads((FIXTURES / "dit_tiny_config.json").read_text())
    return DiTConfig.from_dict(meta["model_config"])


def spawn(fn, cp: int, *args) -> None:
    """Run ``fn(rank, cp, init_file, *args)`` on ``cp`` spawned processes; a rank's exception fails the test."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(fn, args=(cp, os.path.join(tmp, "store"), *args), nprocs=cp, join=True,
                           start_method="spawn")


def _init(rank: int, cp: int, init_file: str, timeout_s: float = 60.0) -> None:
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=cp,
                            timeout=dt.timedelta(seconds=timeout_s))


# ---------------------------------------------------------------------------------------------
# pure functions (no processes)


def test_degrees_that_split_the_heads():
    assert allowed_degrees(full_config(), 16) == [1, 2, 4, 8]  # 40 query / 8 K/V heads
    assert allowed_degrees(preview_config(), 16) == [1, 2, 6]  # 6 / 2: 3 and 4 refused


@needs_fixtures
def test_refused_degrees_name_the_reason():
    config = tiny_config()  # 8 query heads, 2 K/V heads
    with pytest.raises(ValueError, match=r"cp 3 does not divide the 8 query heads.*\[1, 2, 4, 8\]"):
        check_degree(config, 3)
    with pytest.raises(ValueError, match=r"cp 4 does not divide the 6 query heads"):
        check_degree(preview_config(), 4)
    with pytest.raises(ValueError, match="cp 3 neither divides the 2 key/value heads"):
        check_degree(preview_config(), 3)
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        check_degree(config, 0)
    check_degree(config, 4)  # K/V heads repeated twice: allowed


def test_shard_plan_pads_the_tail_as_text():
    plan = ShardPlan(10, 4)  # 10 tokens over 4 ranks: 3 each, 2 padding tokens
    spans = [(0, 0, 6), (1, 6, 8), (2, 8, 10)]
    assert (plan.padded_length, plan.local_length, plan.pad) == (12, 3, 2)
    assert [plan.bounds(r) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert plan.padded_spans(spans) == [(0, 0, 6), (1, 6, 8), (2, 8, 12)]
    assert [plan.local_spans(spans, r) for r in range(4)] == [
        [(0, 0, 3)], [(0, 0, 3)], [(1, 0, 2), (2, 2, 3)], [(2, 0, 3)]]
    # no text tokens (a sequence ending in audio): the padding becomes its own text run
    assert ShardPlan(7, 2).local_spans([(0, 0, 5), (1, 5, 7)], 1) == [(0, 0, 1), (1, 1, 3), (2, 3, 4)]


def test_comm_bytes_per_layer_of_the_released_model():
    # 256p, 5 s, 400 text tokens: 3584 video + 126 audio + 400 text = 4110 tokens; bf16
    got = comm_bytes_per_layer(full_config(), 4110, 2, torch.bfloat16)
    per_head = 2055 * 128 * 2 // 2  # half of this rank's 2055 tokens leave it
    assert got["qkv"] == per_head * (40 + 16) and got["out"] == per_head * 40
    # cp 8: one K/V head per rank, none repeated; 4112 tokens = 514 per rank
    assert comm_bytes_per_layer(full_config(), 4112, 8, torch.bfloat16)["qkv"] == 514 * 128 * 2 * 7 // 8 * 56


# ---------------------------------------------------------------------------------------------
# forward equality on 2 and 4 ranks


def _fixture_inputs(case: dict):
    from safetensors.torch import load_file

    from engine.packing import pack

    f = load_file(FIXTURES / f"dit_tiny_{case['name']}.safetensors")
    return pack(f["in_video_latent"], f["in_audio_latent"], f["in_txt_feat"], num_audio=case["A"],
                num_text=case["L"], in_channels=f["x"].shape[1], coords_style=case["coords_style"],
                frame_receptive_field=case["frame_receptive_field"])


def _check_fixture_cases(rank: int) -> list[str]:
    """Every fixture case, fp32 and bf16, all layer outputs and the DiT output against cp = 1."""
    from safetensors.torch import load_file

    meta = json.loads((FIXTURES / "dit_tiny_config.json").read_text())
    base = DiTConfig.from_dict(meta["model_config"])
    weights = load_file(FIXTURES / "dit_tiny_weights.safetensors")
    seen = []
    for case in meta["cases"]:
        config = dataclasses.replace(base, local_attn_layers=tuple(case.get("local_attn_layers") or ()))
        model = DiTModel(config)
        model.load_state_dict(weights)
        packed = _fixture_inputs(case)
        for dtype in (torch.float32, torch.bfloat16):
            kwargs = dict(spans=packed.spans, local_ranges=packed.local_ranges, compute_dtype=dtype)
            ref_taps, cp_taps = {}, {}
            ref = model(packed.x, packed.coords, packed.modality, intermediates=ref_taps, **kwargs)
            out = forward_replicated(model, packed.x, packed.coords, intermediates=cp_taps, **kwargs)
            assert out.shape == ref.shape
            if dtype == torch.float32:
                for key in ("rope", "adapter_out", *[f"layer{i}_out" for i in range(config.num_layers)]):
                    err = rel_l2(cp_taps[key], ref_taps[key])
                    assert err <= FP32_REL, f"{case['name']} {key}: rel_l2 {err:.3g}"
                assert rel_l2(out, ref) <= FP32_REL, case["name"]
                assert (out - ref).abs().max().item() <= FP32_ABS, case["name"]
            else:
                assert rel_l2(out, ref) <= BF16_REL, case["name"]
            seen.append(f"{case['name']}/{dtype}")
        if config.local_attn_layers:  # the local window must matter, or the check above proves nothing
            full = model(packed.x, packed.coords, packed.modality, spans=packed.spans, compute_dtype=torch.float32)
            assert rel_l2(full, ref) > 1e-3
    return seen


def _masked_reference(model: DiTModel, packed, drop: int) -> torch.Tensor:
    """One-process output of the sequence without its last ``drop`` (text) tokens: what the real rows
    of a forward whose key mask hides those tokens must equal (they are then no key of any query)."""
    keep = packed.length - drop
    spans = [(m, s, min(e, keep)) for m, s, e in packed.spans if s < keep]
    return model(packed.x[:keep], packed.coords[:keep], packed.modality[:keep], spans=spans,
                 compute_dtype=torch.float32)


def _key_mask(length: int, drop: int) -> torch.Tensor:
    mask = torch.ones(length, dtype=torch.bool)
    mask[length - drop:] = False
    return mask


def _preview_inputs(seconds: float, width: int, height: int, text_tokens: int, seed: int):
    from engine.geometry import SegmentGeometry
    from engine.packing import pack

    geo = SegmentGeometry.for_audio_latents(round(25 * seconds) + 1, width, height)
    gen = torch.Generator().manual_seed(seed)
    video = torch.randn(1, 48, geo.latent_frames, geo.latent_height, geo.latent_width, generator=gen)
    audio = torch.randn(1, geo.audio_latents, 64, generator=gen)
    text = torch.randn(text_tokens, 128, generator=gen)
    return pack(video, audio, text, in_channels=preview_config().in_channels)


def _rank_cp2(rank: int, cp: int, init_file: str) -> None:
    _init(rank, cp, init_file)
    seen = _check_fixture_cases(rank)
    assert len(seen) == 2 * len(CASES)
    # a key mask (e.g. text padded to a length bucket): the hidden tokens are no key of any query
    meta = json.loads((FIXTURES / "dit_tiny_config.json").read_text())
    case = meta["cases"][0]
    model = DiTModel(tiny_config())
    init_seeded(model, 5)
    packed = _fixture_inputs(case)
    want = _masked_reference(model, packed, 3)
    got = forward_replicated(model, packed.x, packed.coords, spans=packed.spans, compute_dtype=torch.float32,
                             key_mask=_key_mask(packed.length, 3))[: packed.length - 3]
    assert rel_l2(got, want) <= FP32_REL
    unmasked = forward_replicated(model, packed.x, packed.coords, spans=packed.spans, compute_dtype=torch.float32)
    assert rel_l2(unmasked[: packed.length - 3], want) > 1e-3  # the mask matters
    # the preview preset at its real token counts: 5 s at 224x128 with 256 text tokens = 1278 tokens
    from engine.factory import PREVIEW_HEIGHT, PREVIEW_TEXT_TOKENS, PREVIEW_WIDTH

    model = DiTModel(preview_config())
    init_seeded(model, 0)
    packed = _preview_inputs(5.0, PREVIEW_WIDTH, PREVIEW_HEIGHT, PREVIEW_TEXT_TOKENS, seed=1)
    assert packed.length == 896 + 126 + 256
    kwargs = dict(spans=packed.spans, local_ranges=packed.local_ranges, compute_dtype=torch.float32)
    ref = model(packed.x, packed.coords, packed.modality, **kwargs)
    stats = CommStats()
    out = forward_replicated(model, packed.x, packed.coords, stats=stats, **kwargs)
    assert rel_l2(out, ref) <= FP32_REL and (out - ref).abs().max().item() <= FP32_ABS
    # two all-to-alls per layer, each moving what comm_bytes_per_layer predicts, plus the final all-gather
    per_layer = comm_bytes_per_layer(model.config, packed.length, cp, torch.float32)
    a2a = stats.by_kind["all_to_all_qkv"][1] + stats.by_kind["all_to_all_out"][1]
    assert stats.by_kind["all_to_all_qkv"][0] == model.config.num_layers
    assert a2a == per_layer["total"] * model.config.num_layers
    dist.destroy_process_group()


@needs_fixtures
def test_cp2_forward_equals_one_process_on_every_fixture_case_and_the_preview():
    spawn(_rank_cp2, 2)


def _rank_cp4(rank: int, cp: int, init_file: str) -> None:
    _init(rank, cp, init_file)
    _check_fixture_cases(rank)
    # the rank-0 driven 8-step loop (DistributedDiT + serve_forwards) on the tiny config, odd length -> padding
    from engine.packing import pack, unpack
    from engine.sampler import DISTILL, generator_noise, sample

    config = tiny_config()
    model = DiTModel(config)
    init_seeded(model, 3)
    text = torch.randn(5, config.text_in_channels, generator=torch.Generator().manual_seed(4))
    if rank == 0:
        def run(dit):
            def velocity(video, audio, timestep, conditional):
                packed = pack(video, audio, text, in_channels=config.in_channels)
                out = dit(packed.x, packed.coords, packed.modality, spans=packed.spans,
                          local_ranges=packed.local_ranges, compute_dtype=torch.float32)
                return unpack(out, packed, config.audio_in_channels)

            gen = torch.Generator().manual_seed(7)
            video = torch.randn(1, 48, 3, 4, 6, generator=gen)  # 18 video + 9 audio + 5 text = 32 + ... tokens
            audio = torch.randn(1, 9, 64, generator=gen)
            return sample(velocity, video, audio, DISTILL, image_latent=video[:, :, :1] * 0.5,
                          noise_fn=generator_noise(gen))

        channel = _Channel("cpu")
        dit = DistributedDiT(model, 0, channel)
        packed = pack(torch.randn(1, 48, 2, 4, 4), torch.randn(1, 5, 64), text, in_channels=config.in_channels)
        masked = dit(packed.x, packed.coords, packed.modality, spans=packed.spans, compute_dtype=torch.float32,
                     key_mask=_key_mask(packed.length, 2))  # 8 + 5 + 5 = 18 tokens: 2 padding on 4 ranks
        assert rel_l2(masked[: packed.length - 2], _masked_reference(model, packed, 2)) <= FP32_REL
        got = run(dit)
        channel.finish()
        assert channel.calls == DISTILL.num_steps + 1
        want = run(model)
        for a, b in zip(got, want, strict=True):
            assert rel_l2(a, b) <= FP32_REL, rel_l2(a, b)
        # a runner with a backend (fp8: the step runs the backend's shadow of the DiT): rank 0's step
        # through distributed_step, the other ranks run their own runners' fp8 shadows
        split, single, eager = (_fp8_runner(model, name) for name in ("fp8", "fp8", "eager"))
        split.forward = distributed_step(split, 0, channel)
        video, audio = torch.randn(1, 48, 3, 4, 6), torch.randn(1, 9, 64)
        outs = []
        for runner in (split, single, eager):
            inputs = runner.prepare(video.shape, audio.shape[1], text, text.shape[0])
            outs.append(torch.cat([v.flatten() for v in runner.velocity(inputs, video, audio)]))
        channel.finish()
        assert channel.calls == DISTILL.num_steps + 2
        assert rel_l2(outs[0], outs[1]) <= 1e-3 < 2e-2 < rel_l2(outs[1], outs[2]), (
            rel_l2(outs[0], outs[1]), rel_l2(outs[1], outs[2]))
    else:
        assert serve_forwards([model], device="cpu") == DISTILL.num_steps + 1
        assert serve_forwards([_fp8_runner(model, "fp8")], device="cpu") == 1
    dist.destroy_process_group()


def _fp8_runner(model, backend: str):
    from engine.backends import apply_backend
    from engine.runner import DiTRunner

    runner = DiTRunner(model, compute_dtype=torch.float32)
    apply_backend(runner, backend, "cpu", fp8_impl="emulate")
    return runner


@needs_fixtures
def test_cp4_forward_and_8_step_loop_equal_one_process():
    spawn(_rank_cp4, 4)


@needs_fixtures
def test_parity_cli_with_cp2():
    proc = subprocess.run([sys.executable, "-m", "engine.parity", str(FIXTURES), "--cp", "2", "--family", "dit"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for case in CASES:
        assert any(line.startswith("PASS") and f"dit/{case}/dit_out_fp32path [cp=2]" in line for line in lines)
    assert lines[-1].endswith(" passed, 0 failed")


@needs_fixtures
def test_parity_cli_refuses_cp3():
    proc = subprocess.run([sys.executable, "-m", "engine.parity", str(FIXTURES), "--cp", "3", "--family", "dit"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "cp 3 does not divide the 8 query heads" in proc.stderr


# ---------------------------------------------------------------------------------------------
# the engine on worker processes: same segment, and failures end the job within the timeout


def _preview_fp32(device: str = "cpu", sr: bool = False):
    from engine.factory import build_preview_engine

    return build_preview_engine(seed=0, device=device, compute_dtype=torch.float32, sr=sr)


def _request(engine, seconds: float = 0.5):
    from engine.api import SegmentKind, SegmentRequest

    image = np.random.default_rng(0).integers(0, 256, (96, 160, 3), dtype=np.uint8)
    identity = engine.prepare_identity(image, "a person")
    return SegmentRequest(identity=identity, kind=SegmentKind.SPEAK, prompt="Hello there.", text="Hello there.",
                          seconds=seconds, seed=11)


def test_engine_on_two_ranks_matches_one_process_and_survives_a_killed_rank():
    """A full 8-step segment from the same seed equals the one-process engine's, and so does its SR
    upgrade (the SR DiT split too); a killed rank ends the job with ContextParallelError naming it, and
    the next job runs on fresh ranks."""
    engine = ContextParallelEngine(functools.partial(_preview_fp32, sr=True), 2, timeout_s=10.0, threads_per_rank=1)
    try:
        assert engine.name == "preview-cp2" and (engine.width, engine.height) == (224, 128)
        assert (engine.sr_width, engine.sr_height) == (448, 256)
        single = _preview_fp32(sr=True)
        want = single.generate(_request(single))
        got = engine.generate(_request(engine))
        assert got.frames.shape == want.frames.shape
        assert rel_l2(got.continuation.video_latent, want.continuation.video_latent) <= FP32_REL
        assert rel_l2(got.continuation.audio_latent, want.continuation.audio_latent) <= FP32_REL
        assert np.abs(got.frames.astype(int) - want.frames.astype(int)).max() <= 1
        assert got.timings_s["dit"] > 0
        sr_want, sr_got = single.super_resolve(want), engine.super_resolve(got)
        assert sr_got.super_resolved and sr_got.frames.shape == sr_want.frames.shape == (13, 256, 448, 3)
        assert np.abs(sr_got.frames.astype(int) - sr_want.frames.astype(int)).max() <= 1

        from engine.api import CancelledError, EngineInputError

        bad = _request(engine)
        bad.seconds = 99.0
        with pytest.raises(EngineInputError, match="seconds 99.0"):
            engine.generate(bad)  # an input error leaves the ranks up
        cancel = threading.Event()
        cancel.set()
        with pytest.raises(CancelledError):
            engine.generate(_request(engine), cancel)  # so does a cancelled job
        assert engine.restarts == 0
        # rank 1 dies during a job: stopped first so the job is surely running when it is killed
        pids = engine.pids
        request = _request(engine, 0.5)
        os.kill(pids[1], signal.SIGSTOP)
        result: dict = {}

        def job():
            try:
                engine.generate(request)
            except Exception as exc:  # noqa: BLE001 - inspected below
                result["error"] = exc

        worker = threading.Thread(target=job)
        worker.start()
        time.sleep(1.0)
        start = time.monotonic()
        os.kill(pids[1], signal.SIGKILL)
        worker.join(timeout=30.0)
        assert not worker.is_alive()
        assert time.monotonic() - start < 5.0  # a dead process is seen at once, not after the timeout
        assert isinstance(result.get("error"), ContextParallelError)
        assert "rank 1 of 2 died (exit code -9) during generate" in str(result["error"])
        again = engine.generate(_request(engine, 0.5))  # fresh ranks
        assert engine.pids != pids and engine.restarts == 1
        assert again.frames.shape[0] == 13
        ranks = engine.pids
    finally:
        engine.close()
    # close() stops and reaps every rank: no process of the restarted ranks is left (zombies included).
    assert ranks and not any(psutil.pid_exists(pid) for pid in ranks)
    assert engine.pids == []


def _preview_fp32_seed(seed: int, device: str = "cpu"):
    from engine.factory import build_preview_engine

    return build_preview_engine(seed=seed, device=device, compute_dtype=torch.float32)


def test_engine_dit_calls_of_rank_0_run_on_every_rank():
    """Rank 0's runner steps are split over the ranks (distributed_step): with other DiT weights on
    rank 1 the segment changes. (A rank 0 that ran every forward alone would give the one-process
    segment exactly.)"""
    engine = ContextParallelEngine(functools.partial(_preview_fp32), 2, timeout_s=30.0, threads_per_rank=1,
                                   worker_factory=functools.partial(_preview_fp32_seed, 1))
    try:
        got = engine.generate(_request(engine))
    finally:
        engine.close()
    single = _preview_fp32()
    want = single.generate(_request(single))
    assert rel_l2(got.continuation.video_latent, want.continuation.video_latent) > 1e-2


def test_engine_hung_rank_raises_within_the_collective_timeout():
    timeout_s = 4.0
    engine = ContextParallelEngine(functools.partial(_preview_fp32), 2, timeout_s=timeout_s, threads_per_rank=1)
    try:
        request = _request(engine, 0.5)
        os.kill(engine.pids[1], signal.SIGSTOP)  # alive but silent: only the collective timeout sees it
        start = time.monotonic()
        with pytest.raises(ContextParallelError, match="rank 0"):
            engine.generate(request)
        elapsed = time.monotonic() - start
        assert timeout_s * 0.9 <= elapsed < timeout_s + 20.0, elapsed
    finally:
        engine.close()


def test_full_preset_workers_load_only_the_dits(tmp_path):
    """The non-zero ranks of ``full`` read the same DiT weights as rank 0's engine, and nothing else."""
    from engine.context_parallel import full_preset_dits
    from engine.stack import preview_dit, write_preview_stack

    root = write_preview_stack(tmp_path / "stack", seed=1, variants=["distill", "540p_sr"])
    got = full_preset_dits(str(root), sr=True)
    assert set(vars(got)) == {"dit", "sr_dit"}
    for model, variant in ((got.dit, "distill"), (got.sr_dit, "540p_sr")):
        want = preview_dit(variant, seed=1).state_dict()
        have = model.state_dict()
        assert set(have) == set(want)
        assert all(torch.equal(have[k], want[k]) for k in want), variant
    assert full_preset_dits(str(root)).sr_dit is None


def test_engine_refuses_a_degree_before_starting():
    with pytest.raises(ValueError, match="cp 4 does not divide the 6 query heads"):
        ContextParallelEngine.from_preset("preview", 4)
    with pytest.raises(ValueError, match="no DiT"):
        ContextParallelEngine.from_preset("testpattern", 2)
