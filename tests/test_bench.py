"""The benchmark (ops.bench): the CLI end to end on the preview preset, and its FLOP model.

What this catches: a command that no longer runs on CPU, a JSON without the figures the results
README promises (or with nonsense values), a FLOP model that drifts from TIMING.md §2, and a seeded
on-device build that leaves uninitialised memory (``to_empty``) behind.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from engine.config import full_config, preview_config
from engine.dit import FourierRope, seeded_dit
from ops.bench import (
    REQUIRED_KEYS,
    flops_per_forward,
    linear_flops_per_token,
    peak_flops_for,
)

ROOT = Path(__file__).resolve().parents[1]


def test_flop_model_matches_timing_md():
    cfg = full_config()
    assert linear_flops_per_token(cfg) == 21_825_290_240  # TIMING.md §2.1
    for text, total_tf in ((640, 110.48), (400, 103.57), (0, 92.26)):  # TIMING.md §2.3
        flops = flops_per_forward(cfg, 3584, 126, text)
        length = 3710 + text
        assert flops["attention"] == 819_200 * length**2
        assert abs(flops["total"] / 1e12 - total_tf) < 0.01
    assert peak_flops_for("NVIDIA H100 80GB HBM3", fp8=False) == 989e12
    assert peak_flops_for("NVIDIA H200", fp8=True) == 1979e12
    assert peak_flops_for("NVIDIA H100 PCIe", fp8=False) == 756e12
    assert peak_flops_for("NVIDIA A10G", fp8=False) is None


def test_seeded_build_on_device_initialises_everything():
    cfg = preview_config()
    model = seeded_dit(cfg, seed=3, device="cpu", draw_on_device=True)
    params = dict(model.named_parameters())
    assert all(torch.isfinite(p.float()).all() for p in params.values())
    w = params["block.layers.4.mlp.up_gate_proj.weight"].float()
    assert abs(w.std().item() * math.sqrt(w.shape[1]) - 1.0) < 0.05  # std 1/sqrt(fan_in)
    assert torch.equal(model.adapter.rope.bands, FourierRope(cfg.head_dim).bands)
    again = seeded_dit(cfg, seed=3, device="cpu", draw_on_device=True)
    assert torch.equal(again.block.layers[0].attention.linear_qkv.weight, model.block.layers[0].attention.linear_qkv.weight)


def test_cli_preview_cpu_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "ops.bench", "--preset", "preview", "--device", "cpu", "--backend", "eager,fp8,tensorrt",
           "--seconds", "0.4", "--steps", "2", "--text-tokens", "8", "--repeats", "1", "--warmup", "0",
           "--loop-repeats", "1", "--profile", "5", "--profile-trace-dir", str(tmp_path / "traces"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loop_s" in proc.stdout  # the table
    doc = json.loads(out.read_text())
    assert doc["device_type"] == "cpu" and doc["torch"] == torch.__version__ and doc["steps"] == 2
    assert doc["geometry"]["latent"] == [48, 3, 8, 14]
    records = {r["backend"]: r for r in doc["results"]}
    assert set(records) == {"eager", "fp8", "tensorrt"}
    assert "tensorrt" in records["tensorrt"]["error"] and "pip install" in records["tensorrt"]["error"]
    for name in ("eager", "fp8"):
        r = records[name]
        assert all(key in r for key in REQUIRED_KEYS), sorted(set(REQUIRED_KEYS) - set(r))
        assert r["text_tokens"] == 8 and r["device"] == doc["device"]
        for key in ("forward_s", "dit_8step_s", "decode_s", "segment_s", "first_frame_s", "peak_mem_gb"):
            assert r[key] > 0, key
        assert r["first_frame_s"] <= r["segment_core_s"] + 1e-6
        assert 0 < r["mfu"] < 1
        assert r["flops_per_forward"] == flops_per_forward(preview_config(), 84, 11, 8)["total"]
    assert records["eager"]["rel_err_vs_eager"] == 0.0
    assert 1e-3 < records["fp8"]["rel_err_vs_eager"] < 0.2
    assert records["fp8"]["backend_info"]["fp8"] == "emulate"
    # the profile: top 5 CPU operators of one forward, largest first, shares of the whole
    for name in ("eager", "fp8"):
        prof = records[name]["profile_forward"]
        assert prof["sort"] == "self_cpu_time" and len(prof["top"]) == 5, prof
        times = [row["self_ms"] for row in prof["top"]]
        assert times == sorted(times, reverse=True) and times[-1] > 0
        assert sum(row["share"] for row in prof["top"]) <= 1.0 + 1e-9
        assert abs(prof["top"][0]["share"] - prof["top"][0]["self_ms"] / prof["total_ms"]) < 1e-9
        assert (tmp_path / "traces" / f"{name}-8.trace.json").stat().st_size > 1000
    names = {row["name"] for row in records["eager"]["profile_forward"]["top"]}
    assert names & {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
                    "aten::_scaled_dot_product_flash_attention_for_cpu"}, names  # GEMMs/attention dominate
    assert "top 5 by self_cpu_time in one forward: eager" in proc.stdout
