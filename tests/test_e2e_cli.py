"""``avatar-server client`` as a separate process against an in-process server: sends the
portrait and French text, records what it receives to MP4 (aiortc MediaRecorder)."""

from __future__ import annotations

import asyncio
import json
import sys

import av
import pytest

from tests.e2e_support import running_server

pytestmark = pytest.mark.slow


async def test_cli_client_records_mp4(media_dir, tmp_path) -> None:
    record = tmp_path / "client.mp4"
    async with running_server() as app:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "avatar_server.cli",
            "client",
            "--url",
            f"http://127.0.0.1:{app.port}/",
            "--image",
            str(media_dir / "portrait.png"),
            "--prompt-file",
            str(media_dir / "prompt.txt"),
            "--say",
            "Bonjour, je suis un avatar. Je parle français aujourd'hui.",
            "--language",
            "French",
            "--record",
            str(record),
            "--duration",
            "1",
            "--timeout",
            "30",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 50)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    lines = [json.loads(line) for line in stdout.decode().splitlines() if line.startswith("{")]
    types = [m["type"] for m in lines]
    assert types[0] == "session.ready" and "speak.started" in types and "speak.ended" in types
    summary = lines[-1]
    print("\nclient summary:", summary)
    assert summary["type"] == "summary" and 22.5 <= summary["video_fps"] <= 27.5
    with av.open(str(record)) as container:
        assert {s.type for s in container.streams} == {"video", "audio"}
        stream = container.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height) == (224, 128)
        assert sum(1 for _ in container.decode(video=0)) >= summary["video_frames"] - 5
