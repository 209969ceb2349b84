"""ops/bench_cp (issue 14): the context-parallel benchmark's records on CPU (gloo), at a tiny geometry.

Checks what the benchmark reports, not how fast it is: the bytes each rank sends per layer equal the
two all-to-alls' sizes from :func:`engine.context_parallel.comm_bytes_per_layer`, a degree that does not
split the heads is a ``refused`` record with the reason, and ``ops/bench.py --cp`` reaches the same code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from engine.config import preview_config
from engine.context_parallel import comm_bytes_per_layer

REPO = Path(__file__).resolve().parents[1]


def test_bench_cp_records(tmp_path):
    out = tmp_path / "cp.json"
    cmd = [sys.executable, "-m", "ops.bench", "--cp", "1", "2", "4", "--preset", "preview", "--device", "cpu",
           "--seconds", "0.5", "--width", "224", "--height", "128", "--text-tokens", "16", "--warmup", "0",
           "--repeats", "1", "--loop", "--steps", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    by_cp = {r["cp"]: r for r in doc["results"]}
    assert set(by_cp) == {1, 2, 4}
    assert "cp 4 does not divide the 6 query heads" in by_cp[4]["refused"]
    tokens = 4 * 4 * 7 + 13 + 16  # T 4 x (8/2) x (14/2) video + 13 audio + 16 text
    one, two = by_cp[1], by_cp[2]
    assert one["seq_len"] == two["seq_len"] == tokens
    assert one["bytes_per_layer"] == 0 and one["speedup_forward"] == 1.0
    model = comm_bytes_per_layer(preview_config(), tokens, 2, torch.bfloat16)
    assert two["bytes_per_layer"] == model["total"] == two["bytes_per_layer_model"]["total"]
    # rank 0 also scatters the inputs ([L/2, in_channels 192 + 9 coords] fp32) to rank 1, which sends its
    # [L/2, 192] outputs back
    kinds0, kinds1 = two["bytes_by_kind_by_rank"]
    local = (tokens + 1) // 2  # 141 tokens: one padding token, 71 per rank
    assert kinds0["scatter_inputs"]["bytes"] == local * (192 + 9) * 4
    assert kinds1["gather_out"]["bytes"] == local * 192 * 4
    assert 0 < two["comm_share"] <= 1 and two["loop_s"] > 0 and len(two["comm_s_by_rank"]) == 2
