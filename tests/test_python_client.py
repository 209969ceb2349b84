"""``avatar-server client`` flags, each run as a separate process against an in-process
test-pattern server (0.2 s simulated generation per segment), checked on what the client
prints, what the server saw and the files on disk:

* ``--server-record``: ``record.started``/``record.stopped`` are printed and the summary
  carries the latter; the server's MP4 exists under ``recordings_dir``, its length is
  ``duration_ms`` (within 2 frames) and 0.9-1.02 of the client's own ``--record`` MP4, which
  spans the whole media period (the server's file starts at ``record.start``, sent after the
  peer connection is up);
* a recording ended by the server (``max_recording_s``) is reported, not stopped twice;
* ``--barge-in`` in ``--mode conversation``: a microphone file that stays silent for 3 s and
  then speaks interrupts a long utterance (``interrupted``, played 1.5-6 s), while the same run
  without the flag lets it end (``speak.ended``); ``session.ready`` echoes mode and barge-in;
* ``--interrupt-after``: ``interrupted`` with ``played_ms`` near the delay; the notice of
  ``session.ready`` is written to stderr;
* ``--audio`` alone (``microphone`` mode, the session's ``lipsync``): sent at real-time pace
  (the run lasts at least the file), the avatar listens then lip-syncs, and the server's
  recording carries the user's speech (RMS envelope correlation > 0.8);
* bad flag combinations exit 2 with a message naming the flag, before connecting.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from tests.e2e_support import best_lag_correlation, load_audio, rms_envelope, running_server, write_wav_mono16

pytestmark = pytest.mark.slow

SAMPLE_RATE_HZ = 48_000
SILENCE_S = 3.0  # before the speech of the barge-in microphone file
SPEECH_S = 4.0
LONG_TEXT = (  # about 9 s of speech at 2.5 words a second
    "This is a long sentence that the avatar says while the user stays quiet for a while, and "
    "then the user starts to talk to it."
)


@pytest.fixture
def late_speech(tmp_path: Path, media_dir: Path) -> Path:
    """A 48 kHz mono WAV: ``SILENCE_S`` of silence, then ``SPEECH_S`` of jfk.flac."""
    speech = load_audio(media_dir / "jfk.flac", SAMPLE_RATE_HZ)[: int(SPEECH_S * SAMPLE_RATE_HZ)]
    samples = np.concatenate([np.zeros(int(SILENCE_S * SAMPLE_RATE_HZ), np.float32), speech])
    return write_wav_mono16(tmp_path / "late_speech.wav", samples, SAMPLE_RATE_HZ)


async def run_cli(port: int, *args: str, timeout_s: float = 60) -> tuple[int, list[dict], str]:
    """``avatar-server client`` against the server on ``port``: exit status, JSON lines, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "avatar_server.cli", "client", "--url", f"http://127.0.0.1:{port}/",
        "--timeout", "30", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout_s)
    lines = [json.loads(line) for line in stdout.decode().splitlines() if line.startswith("{")]
    return proc.returncode, lines, stderr.decode()


def of_type(lines: list[dict], type_: str) -> list[dict]:
    return [m for m in lines if m["type"] == type_]


def mp4_duration_s(path: Path) -> tuple[float, int]:
    """Container duration in seconds and the number of video frames."""
    with av.open(str(path)) as container:
        duration_s = container.duration / av.time_base
        frames = sum(1 for _ in container.decode(video=0))
    return duration_s, frames


async def test_server_record_writes_the_file_it_reports(media_dir, tmp_path) -> None:
    recordings = tmp_path / "recordings"
    client_mp4 = tmp_path / "client.mp4"
    async with running_server(recordings_dir=recordings) as app:
        code, lines, stderr = await run_cli(
            app.port, "--image", str(media_dir / "portrait.png"), "--say", "Hello there, this is a recorded test.",
            "--server-record", "--record", str(client_mp4), "--duration", "1",
        )  # fmt: skip
    assert code == 0, stderr[-2000:]
    check_server_recording(lines, recordings, client_mp4)


def check_server_recording(lines: list[dict], recordings: Path, client_mp4: Path) -> None:
    started, stopped = of_type(lines, "record.started"), of_type(lines, "record.stopped")
    assert len(started) == 1 and len(stopped) == 1, lines
    types = [m["type"] for m in lines]
    assert types.index("record.started") < types.index("speak.started") < types.index("record.stopped")
    summary = lines[-1]
    assert summary["server_recording"] == {k: v for k, v in stopped[0].items() if k != "type"}
    assert (
        stopped[0]["recording_id"] == started[0]["recording_id"] and stopped[0]["path"] == started[0]["path"]
    )
    assert stopped[0]["error"] is None and stopped[0]["dropped_frames"] == 0
    assert stopped[0].get("reason", "stopped") == "stopped", stopped  # a newer field: record.stop

    path = recordings / stopped[0]["path"]  # the name under the server's recordings_dir
    assert path.parent == recordings and path.is_file()
    server_s, server_frames = mp4_duration_s(path)
    client_s, _ = mp4_duration_s(client_mp4)
    duration_s = stopped[0]["duration_ms"] / 1000
    print(
        f"\nserver recording {server_s:.2f} s ({server_frames} frames, record.stopped {duration_s:.2f} s); "
        f"client recording {client_s:.2f} s; ratio {server_s / client_s:.3f}"
    )
    assert duration_s > 3.0  # the utterance (about 3 s) and the 1 s idle after it
    assert abs(server_s - duration_s) <= 0.08 and abs(server_frames / 25 - duration_s) <= 0.08
    assert 0.9 <= server_s / client_s <= 1.02


async def test_server_record_stopped_by_a_limit_is_reported(media_dir, tmp_path) -> None:
    """A recording the server ends itself (``max_recording_s``) is not stopped again: its
    ``record.stopped`` (with ``reason``, where the server sends one) is the summary's, and a
    line on stderr says why."""
    async with running_server(recordings_dir=tmp_path / "recordings", limits={"max_recording_s": 1.5}) as app:
        code, lines, stderr = await run_cli(
            app.port, "--image", str(media_dir / "portrait.png"), "--say", LONG_TEXT, "--server-record",
            "--interrupt-after", "2.5", "--duration", "0.5",
        )  # fmt: skip
    assert code == 0, stderr[-2000:]
    stopped = of_type(lines, "record.stopped")
    assert len(stopped) == 1, lines
    assert lines[-1]["server_recording"] == {k: v for k, v in stopped[0].items() if k != "type"}
    assert 1400 <= stopped[0]["duration_ms"] <= 1600, stopped
    if "reason" in stopped[0]:
        assert stopped[0]["reason"] == "max_duration", stopped
        assert f"the server stopped recording {stopped[0]['recording_id']} (max_duration)" in stderr, stderr


async def test_barge_in_flag_lets_the_users_voice_interrupt(media_dir, late_speech) -> None:
    common = ["--image", str(media_dir / "portrait.png"), "--mode", "conversation", "--audio", str(late_speech),
              "--say", LONG_TEXT, "--duration", "0.5"]  # fmt: skip
    async with running_server() as app:
        (code_on, on, err_on), (code_off, off, err_off) = await asyncio.gather(
            run_cli(app.port, *common, "--barge-in"), run_cli(app.port, *common)
        )
    assert code_on == 0, err_on[-2000:]
    assert code_off == 0, err_off[-2000:]
    ready_on, ready_off = of_type(on, "session.ready")[0], of_type(off, "session.ready")[0]
    assert (ready_on["mode"], ready_on["barge_in"]) == ("conversation", True)
    assert (ready_off["mode"], ready_off["barge_in"]) == ("conversation", False)

    interrupted = [m for m in of_type(on, "interrupted") if m["utterance_id"] == "u1"]
    print(f"\nbarge-in: {interrupted}; without: {of_type(off, 'speak.ended')}")
    assert len(interrupted) == 1, on
    # The voice starts SILENCE_S into the file; speech started a little after media did.
    assert 1500 <= interrupted[0]["played_ms"] <= 6000, interrupted
    assert not [m for m in of_type(on, "speak.ended") if m["utterance_id"] == "u1"], on
    # Without barge-in the avatar finishes its sentence.
    assert [m["utterance_id"] for m in of_type(off, "speak.ended")] == ["u1"], off
    assert not of_type(off, "interrupted"), off


async def test_interrupt_after(media_dir) -> None:
    async with running_server() as app:
        code, lines, stderr = await run_cli(
            app.port, "--image", str(media_dir / "portrait.png"), "--say", LONG_TEXT, "--interrupt-after", "1.0",
            "--duration", "0.5",
        )  # fmt: skip
    assert code == 0, stderr[-2000:]
    interrupted = of_type(lines, "interrupted")
    assert [m["utterance_id"] for m in interrupted] == ["u1"], lines
    # 1 s after speak.started, plus the message's trip and the cut at the next frame.
    assert 800 <= interrupted[0]["played_ms"] <= 1600, interrupted
    assert not of_type(lines, "speak.ended"), lines
    # session.ready's notice (what the test pattern is) goes to stderr as a readable line
    notice = of_type(lines, "session.ready")[0]["notice"]
    assert notice and f"avatar-server client: note: {notice}" in stderr


async def test_audio_file_is_a_live_microphone_for_lipsync(media_dir, late_speech, tmp_path) -> None:
    recordings = tmp_path / "recordings"
    async with running_server(recordings_dir=recordings) as app:
        code, lines, stderr = await run_cli(
            app.port, "--image", str(media_dir / "portrait.png"), "--audio", str(late_speech), "--server-record",
            "--duration", "3",
        )  # fmt: skip
    assert code == 0, stderr[-2000:]
    ready = of_type(lines, "session.ready")[0]
    assert (ready["mode"], ready["barge_in"]) == ("lipsync", False)
    summary = lines[-1]
    assert summary["microphone_s"] == SILENCE_S + SPEECH_S
    assert summary["elapsed_s"] >= SILENCE_S + SPEECH_S  # real-time pace, not as fast as it decodes
    states = [m["state"] for m in of_type(lines, "state")]
    assert "listening" in states and "speaking" in states[states.index("listening") :], states

    # Lip-sync plays the user's own audio: the server's recording carries the speech.
    recorded = load_audio(recordings / summary["server_recording"]["path"], SAMPLE_RATE_HZ)
    sent_env = rms_envelope(load_audio(late_speech, SAMPLE_RATE_HZ))
    onset = int(np.flatnonzero(sent_env > 0.1 * sent_env.max())[0])
    reference = sent_env[onset : onset + 300]  # 3 s of speech, 10 ms steps
    corr, lag = best_lag_correlation(reference, rms_envelope(recorded))
    print(f"\nmicrophone {summary['microphone_s']} s sent in a run of {summary['elapsed_s']} s; states {states}; "
          f"speech in the server's recording: correlation {corr:.3f} at {lag / 100:.2f} s")  # fmt: skip
    assert corr > 0.8


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "microphone"], "--mode microphone: needs --audio"),
        (["--mode", "conversation"], "--mode conversation: needs --audio"),
        (["--mode", "text", "--audio", "x.wav"], "--audio: a microphone is sent only with"),
        (["--barge-in"], "--barge-in: needs a microphone"),
        (["--audio", "missing.wav"], "--audio: missing.wav: no such file"),
        (["--chunk-words", "0"], "--chunk-words: must be at least 1"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(media_dir, args, message) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "avatar_server.cli", "client", "--url", "http://127.0.0.1:9/",
         "--image", str(media_dir / "portrait.png"), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result
    assert message in result.stderr, result.stderr


def test_undecodable_audio_file_exits_2(media_dir, tmp_path) -> None:
    bogus = tmp_path / "bogus.wav"
    bogus.write_bytes(b"not audio at all" * 10)
    result = subprocess.run(
        [sys.executable, "-m", "avatar_server.cli", "client", "--url", "http://127.0.0.1:9/",
         "--image", str(media_dir / "portrait.png"), "--audio", str(bogus)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result
    assert f"audio: cannot decode {bogus}" in result.stderr, result.stderr
