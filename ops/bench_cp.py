"""Context-parallel DiT benchmark (issue 14): one forward and the 8-step loop at cp = 1, 2, 4, 8, side by side.

For each degree, ``cp`` local processes form one group (gloo on CPU, NCCL on GPUs, rank ``r`` on GPU
``r``) and run the served path: rank 0 packs the segment, :class:`engine.context_parallel.DistributedDiT`
scatters the token shards, every rank runs its shard with the Ulysses all-to-alls, rank 0 gathers the
velocity. Per degree the record holds:

* ``forward_s``: one forward on rank 0, median of ``--repeats`` after ``--warmup`` (barrier before each);
* ``comm_s`` / ``comm_share``: wall time inside collectives per forward (rank 0, median; the device is
  synchronised around each collective, which includes waiting for the slowest rank) and its share
  of ``forward_s``; ``comm_s_by_rank`` for every rank;
* ``bytes_per_layer``: what one rank sends to the others in one layer's two all-to-alls (measured,
  and ``bytes_per_layer_model`` from :func:`engine.context_parallel.comm_bytes_per_layer`);
  ``bytes_per_step``: one rank's bytes for a whole forward (all layers, plus scatter of inputs and
  gather of outputs), rank 0 and the mean over ranks; ``bytes_by_kind`` per collective kind;
* ``cpu_s`` / ``cpu_s_by_rank`` / ``cpu_s_total`` / ``cpu_work_vs_cp1``: process CPU time of one forward
  per rank and summed (rank 0: median; others: mean over the job), and that sum over the cp = 1 one.
  On a shared CPU the wall times depend on how the scheduler shares the cores between processes
  (``cp`` processes get a larger share than one); the CPU time is the work itself;
* ``loop_s`` (``--loop``): the distilled loop (``--steps``) on rank 0 with the other ranks following;
* ``speedup_forward`` / ``speedup_loop``: the cp = 1 record's time over this one (same run);
* a refused degree (heads not split, :func:`engine.context_parallel.check_degree`) is a record with
  ``refused`` and the reason.

Models: ``preview`` (6 layers x 192, 6/2 heads: degrees 1, 2, 6), ``preview_h8`` (the preview with
head_dim 24, i.e. 8/2 heads: degrees 1, 2, 4, 8; same width and layers, for cp = 4 on CPU), ``full``
(the released 15 B architecture with seeded weights, GPU).

Usage::

    python -m ops.bench_cp --models preview:1,2 preview_h8:1,2,4 --device cpu
    python -m ops.bench_cp --models full:1,2,4,8 --device cuda     # loop timed by default on cuda
    python -m ops.bench --preset full --cp 1 2 4 8 --device cuda    # the same, through ops/bench.py
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from engine.config import full_config, preview_config
from engine.context_parallel import (
    CommStats,
    DistributedDiT,
    _Channel,
    check_degree,
    comm_bytes_per_layer,
    serve_forwards,
)
from engine.dit import DiTModel, seeded_dit

MODELS = {
    "preview": preview_config,
    "preview_h8": lambda: dataclasses.replace(preview_config(), head_dim=24),
    "full": full_config,
}


def segment_tokens(width: int, height: int, seconds: float) -> dict[str, int]:
    """Latent geometry and token counts of one segment (PIPELINE.md §3): ``A = round(25 s) + 1``,
    ``T = (A - 1) // 4 + 1``, video tokens ``T (H/32) (W/32)``."""
    audio = round(25 * seconds) + 1
    frames = (audio - 1) // 4 + 1
    h, w = height // 16, width // 16
    return {"latent_frames": frames, "latent_height": h, "latent_width": w, "audio_tokens": audio,
            "video_tokens": frames * (h // 2) * (w // 2)}


def _build(model_name: str, device: torch.device, seed: int) -> DiTModel:
    # the 15 B model is drawn on the device (no 30 GB host copy), as ops.bench builds it
    return seeded_dit(MODELS[model_name](), seed, device, draw_on_device=model_name == "full")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rank(rank: int, cp: int, init_file: str, opts: dict, results) -> None:
    from engine.packing import pack, unpack
    from engine.sampler import DISTILL, generator_noise, sample

    cuda = opts["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(opts["threads"])
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    torch.set_grad_enabled(False)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=cp, timeout=dt.timedelta(seconds=opts["timeout_s"]))
    model = _build(opts["model"], device, opts["seed"])
    config = model.config
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[opts["compute_dtype"]]
    geo = segment_tokens(opts["width"], opts["height"], opts["seconds"])
    gen = torch.Generator().manual_seed(opts["seed"])
    video = torch.randn(1, config.latent_channels, geo["latent_frames"], geo["latent_height"], geo["latent_width"],
                        generator=gen).to(device)
    audio = torch.randn(1, geo["audio_tokens"], config.audio_in_channels, generator=gen).to(device)
    text = torch.randn(opts["text_tokens"], config.text_in_channels, generator=gen).to(device)
    stats = CommStats(sync=True)
    record: dict = {}
    dist.barrier()  # every rank has built its model before rank 0 starts the clock
    if rank == 0:
        channel = _Channel(device, stats=stats)
        dit = DistributedDiT(model, 0, channel)
        packed = pack(video, audio, text, in_channels=config.in_channels)

        def forward():
            return dit(packed.x, packed.coords, packed.modality, spans=packed.spans,
                       local_ranges=packed.local_ranges, compute_dtype=dtype)

        times, comm, cpu = [], [], []
        for i in range(opts["warmup"] + opts["repeats"]):
            stats.reset()
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            forward()
            _sync(device)
            if i >= opts["warmup"]:
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                comm.append(stats.seconds)
        by_kind = {k: {"calls": v[0], "bytes": v[1], "seconds": v[2]} for k, v in stats.by_kind.items()}
        channel.finish()
        record.update(forward_s=statistics.median(times), forward_s_all=times, comm_s=statistics.median(comm),
                      cpu_s=statistics.median(cpu),
                      bytes_by_kind=by_kind)
        if cp == 1:  # the plain model on the same inputs: what the CP wrapper costs at cp = 1
            plain = []
            for _ in range(opts["repeats"]):
                _sync(device)
                t0 = time.perf_counter()
                model(packed.x, packed.coords, packed.modality, spans=packed.spans,
                      local_ranges=packed.local_ranges, compute_dtype=dtype)
                _sync(device)
                plain.append(time.perf_counter() - t0)
            record["plain_forward_s"] = statistics.median(plain)
        if opts["loop"]:
            def velocity(v, a, timestep, conditional):
                p = pack(v, a, text, in_channels=config.in_channels)
                out = dit(p.x, p.coords, p.modality, spans=p.spans, local_ranges=p.local_ranges, compute_dtype=dtype)
                return unpack(out, p, config.audio_in_channels)

            loops = []
            for _ in range(opts["loop_repeats"]):
                loop_gen = torch.Generator(device=device).manual_seed(opts["seed"])
                config_loop = dataclasses.replace(DISTILL, num_steps=opts["steps"])
                _sync(device)
                t0 = time.perf_counter()
                sample(velocity, video, audio, config_loop, image_latent=video[:, :, :1],
                       noise_fn=generator_noise(loop_gen))
                _sync(device)
                loops.append(time.perf_counter() - t0)
            channel.finish()
            record.update(loop_s=statistics.median(loops), loop_s_all=loops)
        record["seq_len"] = packed.length
    else:
        c0 = time.process_time()
        n = serve_forwards([model], device=device, stats=stats)  # every forward of rank 0's timing job
        record["cpu_s"] = (time.process_time() - c0) / max(1, n)
        record["comm_s"] = stats.seconds / max(1, n)
        record["bytes_by_kind"] = {k: {"calls": v[0] // max(1, n), "bytes": v[1] // max(1, n),
                                       "seconds": v[2] / max(1, n)} for k, v in stats.by_kind.items()}
        if opts["loop"]:
            serve_forwards([model], device=device)
    gathered = [None] * cp
    dist.all_gather_object(gathered, record)
    if rank == 0:
        results.put(gathered)
    dist.destroy_process_group()


def _summarise(per_rank: list[dict], model_name: str, cp: int, opts: dict) -> dict:
    config = MODELS[model_name]()
    rec = dict(per_rank[0])
    layers = config.num_layers
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[opts["compute_dtype"]]
    rec["comm_share"] = rec["comm_s"] / rec["forward_s"] if rec["forward_s"] else None
    rec["comm_s_by_rank"] = [rec["comm_s"]] + [r["comm_s"] for r in per_rank[1:]]
    rec["cpu_s_by_rank"] = [r["cpu_s"] for r in per_rank]
    rec["cpu_s_total"] = sum(rec["cpu_s_by_rank"])  # CPU time of one forward, all ranks: load-independent work
    kinds0 = rec["bytes_by_kind"]
    a2a = sum(kinds0.get(k, {}).get("bytes", 0) for k in ("all_to_all_qkv", "all_to_all_out"))
    rec["bytes_per_layer"] = a2a // layers if cp > 1 else 0
    rec["bytes_per_layer_model"] = comm_bytes_per_layer(config, rec["seq_len"], cp, dtype)
    step_bytes = [sum(v["bytes"] for v in r["bytes_by_kind"].values()) for r in per_rank]  # per forward
    rec["bytes_per_step_rank0"] = step_bytes[0] if cp > 1 else 0
    rec["bytes_per_step_mean"] = int(statistics.mean(step_bytes)) if cp > 1 else 0
    rec["bytes_per_step_all_ranks"] = sum(step_bytes) if cp > 1 else 0
    rec["bytes_by_kind_by_rank"] = [r["bytes_by_kind"] for r in per_rank]  # one forward each
    rec.update(model=model_name, cp=cp)
    return rec


def run(args: argparse.Namespace) -> dict:
    device_type = args.device
    threads_total = args.threads or torch.get_num_threads()
    host_load = [os.getloadavg()[0]]
    geo = segment_tokens(args.width, args.height, args.seconds)
    records = []
    for spec in args.models:
        name, _, degrees = spec.partition(":")
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; known: {sorted(MODELS)}")
        for cp in [int(d) for d in (degrees or "1,2,4").split(",")]:
            config = MODELS[name]()
            try:
                check_degree(config, cp)
            except ValueError as exc:
                records.append({"model": name, "cp": cp, "refused": str(exc)})
                print(f"{name} cp={cp}: refused ({exc})", flush=True)
                continue
            if device_type == "cuda" and torch.cuda.device_count() < cp:
                records.append({"model": name, "cp": cp, "refused": f"{torch.cuda.device_count()} GPUs visible"})
                continue
            opts = dict(device=device_type, model=name, seed=args.seed, compute_dtype=args.compute_dtype,
                        width=args.width, height=args.height, seconds=args.seconds, text_tokens=args.text_tokens,
                        warmup=args.warmup, repeats=args.repeats, loop=args.loop, loop_repeats=args.loop_repeats,
                        steps=args.steps, timeout_s=args.timeout_s, threads=max(1, threads_total // cp))
            ctx = torch.multiprocessing.get_context("spawn")
            results = ctx.SimpleQueue()
            with tempfile.TemporaryDirectory(prefix="bench-cp-") as tmp:
                torch.multiprocessing.start_processes(_rank, args=(cp, os.path.join(tmp, "store"), opts, results),
                                                     nprocs=cp, join=True, start_method="spawn")
            rec = _summarise(results.get(), name, cp, opts)
            rec["threads_per_rank"] = opts["threads"] if device_type == "cpu" else None
            records.append(rec)
            print(f"{name} cp={cp}: forward {rec['forward_s']:.3f} s, comm {rec['comm_s']:.3f} s "
                  f"({100 * rec['comm_share']:.0f} %), {rec['bytes_per_layer'] / 1e6:.2f} MB/layer/rank"
                  + (f", loop {rec['loop_s']:.3f} s" if "loop_s" in rec else ""), flush=True)
    for rec in records:
        base = next((r for r in records if r.get("model") == rec.get("model") and r.get("cp") == 1
                     and "forward_s" in r), None)
        if base and "forward_s" in rec:
            rec["speedup_forward"] = base["forward_s"] / rec["forward_s"]
            rec["cpu_work_vs_cp1"] = rec["cpu_s_total"] / base["cpu_s_total"]
            if "loop_s" in rec and "loop_s" in base:
                rec["speedup_loop"] = base["loop_s"] / rec["loop_s"]
    host_load.append(os.getloadavg()[0])
    if device_type == "cuda":
        device_name = torch.cuda.get_device_name(0)
    else:
        device_name = f"cpu: {platform.processor() or platform.machine()}"
    return {
        "schema": "avatar-server-bench-cp/1",
        "command": "python -m ops.bench_cp " + " ".join(sys.argv[1:]),
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name, "device_type": device_type, "gpus": torch.cuda.device_count() if device_type == "cuda" else 0,
        "torch": torch.__version__, "python": platform.python_version(), "host_cpus": os.cpu_count(),
        "host_load_avg_1m": host_load, "cpu_threads_total": threads_total, "compute_dtype": args.compute_dtype,
        "geometry": {"width": args.width, "height": args.height, "seconds": args.seconds, **geo,
                     "text_tokens": args.text_tokens},
        "warmup": args.warmup, "repeats": args.repeats, "steps": args.steps,
        "results": records,
    }


def format_table(doc: dict) -> str:
    lines = [f"{'model':<11} {'cp':>2} {'L':>5} {'forward_s':>9} {'speedup':>7} {'comm_s':>7} {'comm%':>5} "
             f"{'cpu_s':>7} {'MB/layer':>8} {'MB/step':>8} {'loop_s':>7}"]
    for r in doc["results"]:
        if "refused" in r:
            lines.append(f"{r['model']:<11} {r['cp']:>2} refused: {r['refused']}")
            continue
        lines.append(f"{r['model']:<11} {r['cp']:>2} {r['seq_len']:>5} {r['forward_s']:>9.3f} "
                     f"{r.get('speedup_forward', 0):>7.2f} {r['comm_s']:>7.3f} {100 * r['comm_share']:>5.1f} {r['cpu_s_total']:>7.2f} "
                     f"{r['bytes_per_layer'] / 1e6:>8.2f} {r['bytes_per_step_rank0'] / 1e6:>8.2f} "
                     f"{r.get('loop_s', float('nan')):>7.3f}")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ops.bench_cp", description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=None,
                   help="MODEL:DEGREES entries (models: preview, preview_h8, full); default preview:1,2 "
                        "preview_h8:1,2,4")
    p.add_argument("--cp", type=int, nargs="+", default=None,
                   help="degrees for --preset (the form ops/bench.py --cp passes on)")
    p.add_argument("--preset", choices=sorted(MODELS), default="preview", help="model of --cp")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--width", type=int, default=448, help="pixels (448x256: the 256p example size)")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--text-tokens", type=int, default=400)
    p.add_argument("--compute-dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loop", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the distilled loop (default: on for cuda)")
    p.add_argument("--loop-repeats", type=int, default=1)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="CPU threads shared by the ranks (default: torch's)")
    p.add_argument("--timeout-s", type=float, default=600.0, help="collective timeout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.cp:
        args.models = [f"{args.preset}:{','.join(str(d) for d in args.cp)}"]
    args.models = args.models or ["preview:1,2", "preview_h8:1,2,4"]
    if args.loop is None:
        args.loop = args.device == "cuda"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    doc = run(args)
    print(format_table(doc))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
