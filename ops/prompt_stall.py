"""Issue 18's prompt, old server against new, on the preview engine: one client streams a session
over WebRTC while a second client starts a session whose appearance prompt is 4,000 emoji (4,000
characters, within ``max_prompt_chars``; 16,001 tokens of the preview's byte tokenizer) and
speaks one short sentence. Reported per server: what the second session got (``session.ready`` or
the error code), the streaming session's underruns (``stats.underruns``) in the window, and the
server's RSS before, at the peak and after.

Usage::

    git worktree add --detach /tmp/old d170f62
    python -m ops.prompt_stall --old-dir /tmp/old --out ops/results/2026-12-06_cpu-prompt-stall.json
    git worktree remove /tmp/old
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
from pathlib import Path
from typing import Any

import psutil

from ops.bench_prompt import HOSTILE
from ops.measure_http import REPO_DIR, PeakRss, server_process, write_result
from ops.measure_live import DEFAULT_IMAGE


async def run_one(repo_dir: Path, image: bytes, window_s: float) -> dict[str, Any]:
    from clients.client import AvatarClient

    async with server_process(repo_dir, engine="preview") as (url, pid):
        proc = psutil.Process(pid)
        victim, attacker = AvatarClient(url), AvatarClient(url)
        await victim.connect()
        await attacker.connect()
        try:
            await victim.start_session(image, "A person.", timeout_s=120)
            await victim.start_media(timeout_s=120)
            await asyncio.sleep(8.0)  # past the first segments
            underruns_before = victim.messages("stats")[-1].underruns
            rss_before = proc.memory_info().rss
            async with PeakRss(pid) as rss:
                try:
                    await attacker.start_session(image, HOSTILE, timeout_s=120)
                    attacker_got = "session.ready"
                    await attacker.speak("u1", ["Hello there."])
                except Exception as exc:  # a refusal (RefusedError carries the code) or a timeout
                    attacker_got = getattr(exc, "code", None) or f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(window_s)
            peak = rss.peak_bytes
            underruns_after = victim.messages("stats")[-1].underruns
            rss_after = proc.memory_info().rss
        finally:
            await attacker.close()
            await victim.close()
    return {
        "attacker_got": attacker_got,
        "victim_underruns_in_window": underruns_after - underruns_before,
        "window_s": window_s,
        "rss_before_mb": round(rss_before / 2**20, 1),
        "rss_peak_mb": round(peak / 2**20, 1),
        "rss_after_mb": round(rss_after / 2**20, 1),
    }


async def _main(args: argparse.Namespace, image: bytes) -> dict[str, Any]:
    results = {}
    for name, repo_dir in (("old", Path(args.old_dir)), ("new", REPO_DIR)):
        print(f"{name} server ({repo_dir})", file=sys.stderr, flush=True)
        results[name] = await run_one(repo_dir, image, args.window_s)
    return {"schema": "avatar-server-prompt-stall/1", "date": dt.date.today().isoformat(),
            "engine": "preview", "prompt": "4,000 x U+1F600 (16,001 byte tokens)", **results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old-dir", required=True)
    parser.add_argument("--image", default=str(DEFAULT_IMAGE))
    parser.add_argument("--window-s", type=float, default=40.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    write_result(asyncio.run(_main(args, Path(args.image).read_bytes())), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
