"""What a hostile prompt costs the engine (issue 18): one preview segment with an ordinary prompt
vs a 4,000-emoji prompt (16,001 byte tokens), timed, with the tokens that reached the text encoder
and the process's peak RSS.

    python -m ops.bench_prompt --out ops/results/DATE_cpu-prompt-cost.json

``--repo DIR`` runs the same measurement on another checkout (e.g. an older commit from
``git worktree add``) in a subprocess, so before and after come from one command.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ORDINARY = "A woman with short dark hair, wearing a blue blouse, looks at the camera in a bright office."
HOSTILE = "\N{GRINNING FACE}" * 4000


def measure(repeats: int) -> dict:
    """Segment time (s, median of ``repeats``) per prompt, tokens the encoder saw, peak RSS (MB)."""
    import numpy as np

    try:
        from engine.factory import build_preview_engine
    except ImportError:  # checkouts before engine.factory
        from engine.pipeline import build_preview_engine
    from engine.api import SegmentKind, SegmentRequest

    engine = build_preview_engine(seed=0)
    identity = engine.prepare_identity(np.full((256, 256, 3), 128, np.uint8), ORDINARY)
    figures = {}
    for name, prompt in (("ordinary", ORDINARY), ("emoji_4000", HOSTILE)):
        times = []
        for i in range(repeats):
            request = SegmentRequest(identity=identity, kind=SegmentKind.SPEAK, prompt=prompt, seconds=2.0, seed=i)
            t0 = time.perf_counter()
            engine.generate(request)
            times.append(time.perf_counter() - t0)
        figures[name] = {"segment_s": sorted(times)[len(times) // 2], "runs_s": [round(t, 3) for t in times],
                         "characters": len(prompt)}
        if hasattr(engine, "count_text_tokens"):
            figures[name]["tokens"] = engine.count_text_tokens(prompt)
            figures[name]["tokens_reaching_the_encoder"] = min(figures[name]["tokens"], engine.max_prompt_tokens)
            figures[name]["text_rows_reaching_the_dit"] = min(figures[name]["tokens"], engine.max_text_tokens)
    figures["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ops.bench_prompt", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--repo", type=Path, action="append", default=[],
                   help="another checkout to measure the same way (repeatable); this one is always measured")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.json_only:
        print(json.dumps(measure(args.repeats)))
        return 0
    doc = {}
    for repo in [*args.repo, Path(__file__).resolve().parents[1]]:
        # this file run with the other checkout first on the path, so it measures that checkout's engine
        proc = subprocess.run([sys.executable, __file__, "--json-only", "--repeats", str(args.repeats)],
                              cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)},
                              capture_output=True, text=True, check=True)
        doc[str(repo)] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(repo, json.dumps(doc[str(repo)]))
    if args.out:
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
