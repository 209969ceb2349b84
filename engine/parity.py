"""Check this engine against reference fixtures: ``python -m engine.parity DIR``.

``DIR`` is laid out like ``shared/fixtures/upstream`` (see its README). Every fixture family is
checked and one line per check is printed with the measured error and the tolerance::

    PASS  dit/case_a_t2v_v2/dit_out_fp32path   rel_l2 1.04e-06 <= 1e-05   max_abs 3.58e-06 <= 5e-05

The command exits 1 if any check fails or a family's files are missing, else 0.

Tolerances (fixtures README §1.5, §3.5, §4, §5):

* DiT fp32 path (every bf16 cast replaced by fp32) vs ``*_fp32path``: rel_l2 <= 1e-5 and
  max_abs <= 5e-5. This is the tight check: it catches any formula or layout error.
* DiT bf16 path vs ``dit_out`` / ``layer<i>_out``: rel_l2 <= 3e-2, max_abs <= 0.03 x max|ref|
  for layer outputs and <= 0.1 for ``dit_out`` (bf16 roundings flip with kernel details).
* packing: exact; rotary tables: max_abs <= 1e-6; scheduler, trajectories and loops:
  max_abs <= 1e-5; SR noise: max_abs <= 1e-6; Turbo decoder: see
  :func:`engine.codecs.turbo_vae.check_turbo_fixtures`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.config import DiTConfig
from engine.dit import DiTModel, FourierRope
from engine.packing import build_coords, local_attention_ranges, pack, unpack
from engine.runner import DiTRunner
from engine.sampler import SamplerConfig, prepare_sr_inputs, sample
from engine.schedules import flow_timesteps, sr_signal_table, video_guidance_scale


@dataclass
class Check:
    """One parity check: ``error <= tolerance`` for every (metric, error, tolerance) triple."""

    name: str
    metrics: list[tuple[str, float, float]]
    note: str = ""

    @property
    def passed(self) -> bool:
        return all(err <= tol for _, err, tol in self.metrics) and not self.note

    def line(self) -> str:
        parts = [f"{m} {e:.3g} <= {t:.3g}" for m, e, t in self.metrics]
        status = "PASS" if self.passed else "FAIL"
        return f"{status}  {self.name:<52} " + "   ".join(parts) + (f"   {self.note}" if self.note else "")


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    denom = ref.norm().item()
    return (a - ref).norm().item() / denom if denom else (a - ref).norm().item()


def max_abs(a: torch.Tensor, ref: torch.Tensor) -> float:
    if a.shape != ref.shape:
        return float("inf")
    return (a.double() - ref.double()).abs().max().item() if ref.numel() else 0.0


def exact(name: str, a: torch.Tensor, ref: torch.Tensor) -> Check:
    ok = a.shape == ref.shape and torch.equal(a.to(ref.dtype), ref)
    return Check(name, [("mismatch", 0.0 if ok else 1.0, 0.0)])


def _missing(family: str, path: Path) -> list[Check]:
    return [Check(f"{family}", [], note=f"missing {path.name}")]


def check_dit(fixture_dir: Path, model_cls: type[DiTModel] = DiTModel) -> list[Check]:
    """``dit_tiny_*``: packing of each case, rotary table, layer outputs and DiT output."""
    config_path = fixture_dir / "dit_tiny_config.json"
    if not config_path.exists():
        return _missing("dit", config_path)
    meta = json.loads(config_path.read_text())
    base = DiTConfig.from_dict(meta["model_config"])
    weights = load_file(fixture_dir / "dit_tiny_weights.safetensors")
    checks = []
    for case in meta["cases"]:
        name = case["name"]
        path = fixture_dir / f"dit_tiny_{name}.safetensors"
        if not path.exists():
            checks += _missing(f"dit/{name}", path)
            continue
        f = load_file(path)
        config = dataclasses.replace(base, local_attn_layers=tuple(case.get("local_attn_layers") or ()))
        model = model_cls(config)
        model.load_state_dict(weights, strict=True)
        packed = pack(
            f["in_video_latent"], f["in_audio_latent"], f["in_txt_feat"],
            num_audio=case["A"], num_text=case["L"], in_channels=f["x"].shape[1],
            coords_style=case["coords_style"], frame_receptive_field=case["frame_receptive_field"],
        )
        prefix = f"dit/{name}"
        checks += [
            exact(f"{prefix}/x", packed.x, f["x"]),
            exact(f"{prefix}/coords_mapping", packed.coords, f["coords_mapping"]),
            exact(f"{prefix}/modality_mapping", packed.modality, f["modality_mapping"]),
            exact(f"{prefix}/local_q_ranges", packed.local_ranges.q_ranges, f["local_q_ranges"]),
            exact(f"{prefix}/local_k_ranges", packed.local_ranges.k_ranges, f["local_k_ranges"]),
        ]
        for dtype, suffix in ((torch.float32, "_fp32path"), (torch.bfloat16, "")):
            taps: dict = {}
            with torch.no_grad():
                out = model(f["x"], f["coords_mapping"], f["modality_mapping"], spans=packed.spans,
                            local_ranges=packed.local_ranges, compute_dtype=dtype, intermediates=taps)
            keys = [k for k in f if k.endswith(suffix) and (k.startswith("layer") or k.startswith("dit_out"))]
            if suffix == "":
                keys = [k for k in f if (k.startswith("layer") or k == "dit_out") and "fp32path" not in k]
            for key in sorted(keys):
                ref = f[key]
                got = out if key.startswith("dit_out") else taps[key.removesuffix(suffix)]
                if dtype == torch.float32:
                    metrics = [("rel_l2", rel_l2(got, ref), 1e-5), ("max_abs", max_abs(got, ref), 5e-5)]
                else:
                    limit = 0.1 if key == "dit_out" else 0.03 * ref.abs().max().item()
                    metrics = [("rel_l2", rel_l2(got, ref), 3e-2), ("max_abs", max_abs(got, ref), limit)]
                checks.append(Check(f"{prefix}/{key}", metrics))
            if dtype == torch.float32:
                checks.append(Check(f"{prefix}/rope", [("max_abs", max_abs(taps["rope"], f["rope"]), 1e-6)]))
                checks.append(Check(f"{prefix}/adapter_out",
                                    [("rel_l2", rel_l2(taps["adapter_out"], f["adapter_out"]), 1e-5)]))
                checks += _runner_checks(prefix, model, case, f, dtype)
            else:
                runner = DiTRunner(model, compute_dtype=dtype, coords_style=case["coords_style"],
                                   frame_receptive_field=case["frame_receptive_field"])
                inputs = runner.prepare(f["in_video_latent"].shape, case["A"], f["in_txt_feat"], case["L"])
                video, audio = runner.velocity(inputs, f["in_video_latent"], f["in_audio_latent"])
                checks.append(Check(f"{prefix}/video_out", [("rel_l2", rel_l2(video, f["video_out"]), 3e-2)]))
                if f["audio_out"].numel():
                    checks.append(Check(f"{prefix}/audio_out", [("rel_l2", rel_l2(audio, f["audio_out"]), 3e-2)]))
                else:
                    checks.append(exact(f"{prefix}/audio_out_shape", torch.tensor(audio.shape),
                                        torch.tensor(f["audio_out"].shape)))
    return checks


def _runner_checks(prefix: str, model: DiTModel, case: dict, f: dict, dtype: torch.dtype) -> list[Check]:
    """The fp32 path through :class:`engine.runner.DiTRunner`, unpadded and with the text padded to a
    bucket of ``L + 5`` rows (masked out of attention), against the unpacked ``dit_out_fp32path``:
    the same fp32 tolerance as the DiT output, since the padding may change only summation order."""
    ref_video, ref_audio = unpack(f["dit_out_fp32path"], pack(
        f["in_video_latent"], f["in_audio_latent"], f["in_txt_feat"], num_audio=case["A"], num_text=case["L"],
        coords_style=case["coords_style"]), model.config.audio_in_channels)
    checks = []
    for label, buckets in (("runner", None), ("runner_text_bucket", (case["L"] + 5,))):
        runner = DiTRunner(model, compute_dtype=dtype, coords_style=case["coords_style"], text_buckets=buckets,
                           frame_receptive_field=case["frame_receptive_field"])
        inputs = runner.prepare(f["in_video_latent"].shape, case["A"], f["in_txt_feat"], case["L"])
        video, audio = runner.velocity(inputs, f["in_video_latent"], f["in_audio_latent"])
        got, ref = torch.cat([video.flatten(), audio.flatten()]), torch.cat([ref_video.flatten(), ref_audio.flatten()])
        checks.append(Check(f"{prefix}/{label}_fp32path", [("rel_l2", rel_l2(got, ref), 1e-5),
                                                           ("max_abs", max_abs(got, ref), 5e-5)]))
    return checks


def check_packing(fixture_dir: Path) -> list[Check]:
    """``packing_*``: coords/modality of the real 256p/540p/1080p shapes, local ranges, the real
    head_dim-128 rotary table, and the index-valued small case including unpacking."""
    summary_path = fixture_dir / "packing_summary.json"
    real_path = fixture_dir / "packing_real_shapes.safetensors"
    small_path = fixture_dir / "packing_small_index.safetensors"
    if not (summary_path.exists() and real_path.exists() and small_path.exists()):
        return _missing("packing", summary_path if not summary_path.exists() else real_path)
    summary = json.loads(summary_path.read_text())
    real = load_file(real_path)
    rope128 = FourierRope(128)
    checks = []
    for prefix, info in summary.items():
        if f"{prefix}.coords_mapping" not in real:
            continue
        c, t, h, w = info["video_latent_CTHW"]
        coords = build_coords(t, h // 2, w // 2, info["audio_feat_len"], info["txt_feat_len"], info["coords_style"])
        modality = torch.cat([torch.full((info[n],), m, dtype=torch.int64)
                              for m, n in enumerate(("n_video", "n_audio", "n_text"))])
        checks.append(exact(f"packing/{prefix}/coords_mapping", coords, real[f"{prefix}.coords_mapping"]))
        checks.append(exact(f"packing/{prefix}/modality_mapping", modality, real[f"{prefix}.modality_mapping"]))
        ranges = local_attention_ranges(info["n_video"], info["n_tokens"], t, info["frame_receptive_field"])
        checks.append(exact(f"packing/{prefix}/local_q_ranges", ranges.q_ranges,
                            torch.tensor(info["local_attn_q_ranges"], dtype=torch.int32)))
        checks.append(exact(f"packing/{prefix}/local_k_ranges", ranges.k_ranges,
                            torch.tensor(info["local_attn_k_ranges"], dtype=torch.int32)))
        if f"{prefix}.rope_head_dim128" in real:
            ref = real[f"{prefix}.rope_head_dim128"]
            checks.append(Check(f"packing/{prefix}/rope_head_dim128", [("max_abs", max_abs(rope128(coords), ref), 1e-6)]))
        if f"{prefix}.rope_head_dim128_text_rows" in real:
            ref = real[f"{prefix}.rope_head_dim128_text_rows"]
            got = rope128(coords[info["n_video"] + info["n_audio"]:])
            checks.append(Check(f"packing/{prefix}/rope_head_dim128_text_rows", [("max_abs", max_abs(got, ref), 1e-6)]))
    small = load_file(small_path)
    meta = summary.get("small_index", {})
    num_audio = int(meta.get("audio_feat_len", small["in_audio_latent"].shape[1]))
    num_text = int(meta.get("txt_feat_len", 7))
    for style in ("v2", "v1"):
        packed = pack(small["in_video_latent"], small["in_audio_latent"], small["in_txt_feat"],
                      num_audio=num_audio, num_text=num_text, in_channels=small["x"].shape[1], coords_style=style)
        if style == "v2":
            checks.append(exact("packing/small_index/x", packed.x, small["x"]))
            checks.append(exact("packing/small_index/local_q_ranges", packed.local_ranges.q_ranges, small["local_q_ranges"]))
            checks.append(exact("packing/small_index/local_k_ranges", packed.local_ranges.k_ranges, small["local_k_ranges"]))
            for src, key in ((packed.x, "unpack_of_x"), (small["synthetic_dit_out"], "unpack_of_synthetic")):
                video, audio = unpack(src, packed, small["in_audio_latent"].shape[2])
                checks.append(exact(f"packing/small_index/{key}.video", video, small[f"{key}.video"]))
                checks.append(exact(f"packing/small_index/{key}.audio", audio, small[f"{key}.audio"]))
        checks.append(exact(f"packing/small_index/{style}.coords_mapping", packed.coords, small[f"{style}.coords_mapping"]))
        checks.append(exact(f"packing/small_index/{style}.modality_mapping", packed.modality, small[f"{style}.modality_mapping"]))
    return checks


def _fixture_velocity(with_cfg_term: bool):
    """The fixtures' fake model: ``0.3 x + 0.1 sin(t/1000 + x) (± 0.05 cos x)`` (README §3.3-§3.4)."""

    def velocity(video, audio, timestep, conditional):
        t = torch.tensor(float(timestep), dtype=torch.float32)
        sign = (1.0 if conditional else -1.0) if with_cfg_term else 0.0

        def f(x):
            v = 0.3 * x + 0.1 * torch.sin(t / 1000 + x)
            return v + sign * 0.05 * torch.cos(x) if with_cfg_term else v

        return f(video), f(audio)

    return velocity


def _recorded_noise(tensors: dict, prefix: str):
    draws = {w: list(tensors[f"{prefix}.{w}_noise_draws"]) if f"{prefix}.{w}_noise_draws" in tensors else []
             for w in ("video", "audio")}

    def noise(like, which):
        if not draws[which]:
            raise RuntimeError(f"{prefix}: more {which} noise draws requested than recorded")
        return draws[which].pop(0)

    return noise


def check_scheduler(fixture_dir: Path) -> list[Check]:
    """``scheduler_tables`` and ``scheduler_trajectories`` for every stepping mode."""
    tables_path = fixture_dir / "scheduler_tables.safetensors"
    meta_path = fixture_dir / "scheduler_meta.json"
    traj_path = fixture_dir / "scheduler_trajectories.safetensors"
    if not (tables_path.exists() and meta_path.exists() and traj_path.exists()):
        return _missing("scheduler", tables_path)
    checks = []
    tables = load_file(tables_path)
    meta = json.loads(meta_path.read_text())
    for name, info in meta["tables"].items():
        if "num_inference_steps" not in info:
            continue
        timesteps, sigmas = flow_timesteps(info["num_inference_steps"], info["shift"])
        if "video_txt_guidance_scale_per_step" in info:
            scales = torch.tensor([video_guidance_scale(t) for t in timesteps.tolist()])
            checks.append(Check(f"scheduler/{name}.video_guidance", [("max_abs", max_abs(
                scales, torch.tensor(info["video_txt_guidance_scale_per_step"])), 0.0)]))
        checks.append(exact(f"scheduler/{name}.timesteps", timesteps, tables[f"{name}.timesteps"]))
        checks.append(Check(f"scheduler/{name}.sigmas", [("max_abs", max_abs(sigmas, tables[f"{name}.sigmas"]), 0.0)]))
    traj = load_file(traj_path)
    velocity = _fixture_velocity(False)
    for mode, info in meta["trajectories"].items():
        flags = info["flags"]
        config = SamplerConfig(num_steps=info["steps"], shift=info["shift"], cfg_number=flags["cfg_number"],
                               stage="sr" if flags["use_sr_model"] else "base", a2v=flags["is_a2v"],
                               sde=flags["using_sde_flag"])
        videos, audios = [traj["init_video"]], [traj["init_audio"]]
        sample(velocity, traj["init_video"], traj["init_audio"], config, noise_fn=_recorded_noise(traj, mode),
               on_step=lambda k, i, v=videos, a=audios: (v.append(i["video"]), a.append(i["audio"])))
        checks.append(Check(f"scheduler/{mode}.trajectory", [
            ("video_max_abs", max_abs(torch.stack(videos), traj[f"{mode}.video_traj"]), 1e-5),
            ("audio_max_abs", max_abs(torch.stack(audios), traj[f"{mode}.audio_traj"]), 1e-5)]))
    return checks


def check_sampler_loops(fixture_dir: Path) -> list[Check]:
    """``sampler_loops``: whole loops with CFG, TI2V overwrite, A2V, distill, SR and the cfg trick."""
    meta_path, loops_path = fixture_dir / "scheduler_meta.json", fixture_dir / "sampler_loops.safetensors"
    if not (meta_path.exists() and loops_path.exists()):
        return _missing("sampler_loops", loops_path)
    meta = json.loads(meta_path.read_text())
    loops = load_file(loops_path)
    velocity = _fixture_velocity(True)
    checks = []
    for mode, info in meta["loops"].items():
        sr = info["use_sr_model"]
        config = SamplerConfig(num_steps=info["steps"], shift=info["shift"],
                               cfg_number=info["sr_cfg_number"] if sr else info["cfg_number"],
                               stage="sr" if sr else "base", a2v=info["is_a2v"])
        init = "sr_cfg2_init" if f"{mode}.final_video" in loops and loops[f"{mode}.final_video"].shape != loops["init_video"].shape else "init"
        image = loops["image_latent"] if info["mode"] == "ti2v" else None
        steps: list[dict] = []
        video, audio = sample(velocity, loops[f"{init}_video"], loops[f"{init}_audio"], config, image_latent=image,
                              noise_fn=_recorded_noise(loops, mode), on_step=lambda k, i, s=steps: s.append(i))
        metrics = [("video_max_abs", max_abs(video, loops[f"{mode}.final_video"]), 1e-5),
                   ("audio_max_abs", max_abs(audio, loops[f"{mode}.final_audio"]), 1e-5)]
        for key, field in (("v_cfg_video", "v_video"), ("v_cfg_audio", "v_audio"), ("video_after_step", "video"),
                           ("audio_after_step", "audio"), ("video_model_input", "model_input")):
            if f"{mode}.{key}" in loops:
                metrics.append((key, max_abs(torch.stack([s[field] for s in steps]), loops[f"{mode}.{key}"]), 1e-5))
        checks.append(Check(f"sampler_loops/{mode}", metrics))
    return checks


def check_sr_noise(fixture_dir: Path) -> list[Check]:
    """``sr_noise``: the zero-terminal-SNR table and the SR stage inputs for each noise value."""
    path = fixture_dir / "sr_noise.safetensors"
    if not path.exists():
        return _missing("sr_noise", path)
    f = load_file(path)
    checks = [Check("sr_noise/sigma_table", [("max_abs", max_abs(sr_signal_table(), f["sigma_table"]), 1e-6)])]
    runs = sorted({k.split(".")[0] for k in f if k.startswith("noise_value_")})
    for run in runs:
        value = int(run.removeprefix("noise_value_"))
        draw_keys = sorted((k for k in f if k.startswith(f"{run}.draw")), key=lambda k: int(k.rsplit("draw", 1)[1]))
        draws = [f[k] for k in draw_keys[2:]]  # draw0/draw1: the base stage's initial noise
        target = f[f"{run}.sr_stage_video_in"]
        video, audio = prepare_sr_inputs(
            f[f"{run}.br_stage_video_out"], f[f"{run}.br_stage_audio_out"], target.shape[-2], target.shape[-1],
            lambda like, which, d=draws: d.pop(0), noise_value=value)
        checks.append(Check(f"sr_noise/{run}", [
            ("interp_max_abs", max_abs(
                torch.nn.functional.interpolate(f[f"{run}.br_stage_video_out"], size=target.shape[2:],
                                                mode="trilinear", align_corners=True),
                f[f"{run}.sr_interpolated_before_noise"]), 1e-6),
            ("video_max_abs", max_abs(video, target), 1e-6),
            ("audio_max_abs", max_abs(audio, f[f"{run}.sr_stage_audio_in"]), 1e-6),
            ("final_audio_max_abs", max_abs(f[f"{run}.br_stage_audio_out"], f[f"{run}.final_audio"]), 1e-6)]))
    return checks


def check_turbo(fixture_dir: Path) -> list[Check]:
    """``turbo_vaed_tiny_*`` through :func:`engine.codecs.turbo_vae.check_turbo_fixtures`."""
    if not (fixture_dir / "turbo_vaed_tiny_config.json").exists():
        return _missing("turbo_vaed", fixture_dir / "turbo_vaed_tiny_config.json")
    try:
        from engine.codecs.turbo_vae import check_turbo_fixtures
    except ImportError as exc:
        return [Check("turbo_vaed", [], note=f"missing implementation ({exc})")]
    return [Check(f"turbo_vaed/{name}", [("error", err, tol)], note="" if ok else "failed")
            for name, err, tol, ok in check_turbo_fixtures(fixture_dir)]


FAMILIES = {
    "dit": check_dit,
    "packing": check_packing,
    "scheduler": check_scheduler,
    "sampler_loops": check_sampler_loops,
    "sr_noise": check_sr_noise,
    "turbo_vaed": check_turbo,
}


def run(fixture_dir: Path, families: list[str] | None = None, stream=sys.stdout) -> list[Check]:
    """Run the named families (default all) and print one line per check."""
    checks = []
    for family in families or list(FAMILIES):
        for check in FAMILIES[family](fixture_dir):
            print(check.line(), file=stream, flush=True)
            checks.append(check)
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.parity", description=__doc__.splitlines()[0])
    parser.add_argument("fixture_dir", type=Path, help="directory laid out like shared/fixtures/upstream")
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES), help="only these families")
    parser.add_argument("--cp", type=int, default=1, metavar="N",
                        help="run the DiT cases with the forward split over N local gloo processes "
                             "(engine.parity.run_parity)")
    args = parser.parse_args(argv)
    if not args.fixture_dir.is_dir():
        print(f"error: fixture directory {args.fixture_dir} does not exist", file=sys.stderr)
        return 2
    if args.cp != 1:

        try:
            return run_parity(args.fixture_dir, args.cp, args.family)
        except ValueError as exc:
            print(f"error: --cp {args.cp}: {exc}", file=sys.stderr)
            return 2
    torch.set_grad_enabled(False)
    checks = run(args.fixture_dir, args.family)
    failed = [c for c in checks if not c.passed]
    print(f"{len(checks) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0



# ---------------------------------------------------------------------------------------------
# the dit family with the forward split over context-parallel ranks (python -m engine.parity DIR --cp N)


def _parity_rank(rank: int, cp: int, init_file: str, fixture_dir: str, timeout_s: float, results) -> None:
    import datetime as dt

    import torch.distributed as dist

    from engine.context_parallel import ContextParallelDiT

    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=cp,
                            timeout=dt.timedelta(seconds=timeout_s))
    try:
        # every DiT forward of check_dit runs split over the cp ranks
        checks = check_dit(Path(fixture_dir), model_cls=ContextParallelDiT)
        if rank == 0:
            results.put([(c.name, c.metrics, c.note) for c in checks])
    finally:
        dist.destroy_process_group()


def run_parity(fixture_dir: Path, cp: int, families: list[str] | None = None, *, timeout_s: float = 120.0,
               stream=None) -> int:
    """``python -m engine.parity DIR --cp N``: the ``dit`` family with every forward split over ``cp`` local
    gloo processes (:class:`engine.context_parallel.ContextParallelDiT`; same checks and tolerances as
    :func:`check_dit`), the other requested families in this process. Prints one line per check;
    returns the exit code (0 all passed, 1 else).

    Raises:
        ValueError: ``cp`` does not split the fixture config's heads.
    """
    import os
    import tempfile

    from engine.context_parallel import check_degree

    stream = stream or sys.stdout
    fixture_dir = Path(fixture_dir)
    families = families or list(FAMILIES)
    checks: list = []
    if "dit" in families:
        config_path = fixture_dir / "dit_tiny_config.json"
        if config_path.exists():
            check_degree(DiTConfig.from_dict(json.loads(config_path.read_text())["model_config"]), cp)
        ctx = torch.multiprocessing.get_context("spawn")
        results = ctx.SimpleQueue()
        with tempfile.TemporaryDirectory(prefix="avatar-cp-parity-") as tmp:
            torch.multiprocessing.start_processes(
                _parity_rank, args=(cp, os.path.join(tmp, "store"), str(fixture_dir), timeout_s, results),
                nprocs=cp, join=True, start_method="spawn")
        for name, metrics, note in results.get():
            check = Check(f"{name} [cp={cp}]", metrics, note)
            print(check.line(), file=stream, flush=True)
            checks.append(check)
    rest = [f for f in families if f != "dit"]
    if rest:
        checks += run(fixture_dir, rest, stream=stream)
    failed = [c for c in checks if not c.passed]
    print(f"{len(checks) - len(failed)} passed, {len(failed)} failed", file=stream)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
