"""Helpers of the headless-Chromium tests (``test_browser_e2e.py``, ``test_browser_controls.py``):
the browser's flags, ``avatar-server serve --engine testpattern`` in a subprocess, a fake
microphone file, and a wait that fails with what the page and the server saw.

ICE runs on loopback only: the server offers 127.0.0.1, and Chromium gathers loopback
candidates only with ``--allow-loopback-in-peer-connection``.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e_support import load_audio, write_wav_mono16

CHROMIUM = Path("/usr/bin/chromium")
INSTALL_HINT = "run .ci/run (it installs Debian's chromium and the Python package playwright)"
SAMPLE_RATE_HZ = 48_000

CHROMIUM_ARGS = [
    # the machine's closed network: no background connections, no GPU
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # media: a fake camera/microphone with no permission prompt; loopback ICE candidates
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection",
]

# Stats of the page's peer connection: inbound video and audio, outbound audio (microphone).
STATS_JS = """async () => {
  const pc = window.avatar.pc;
  const out = {connection: pc ? pc.connectionState : null};
  if (!pc) return out;
  (await pc.getStats()).forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "video") {
      out.video = {t: s.timestamp, framesDecoded: s.framesDecoded ?? 0, framesDropped: s.framesDropped ?? 0,
                   framesPerSecond: s.framesPerSecond ?? null, width: s.frameWidth ?? null,
                   height: s.frameHeight ?? null, packetsReceived: s.packetsReceived ?? 0};
    } else if (s.type === "inbound-rtp" && s.kind === "audio") {
      out.audio = {t: s.timestamp, packetsReceived: s.packetsReceived ?? 0,
                   totalSamplesReceived: s.totalSamplesReceived ?? 0};
    } else if (s.type === "outbound-rtp" && s.kind === "audio") {
      out.mic = {t: s.timestamp, packetsSent: s.packetsSent ?? 0};
    }
  });
  return out;
}"""

# The audio m-section of the page's offer: its direction and whether it names a track (msid).
OFFER_AUDIO_JS = """() => {
  const sdp = window.avatar.pc.localDescription.sdp;
  const section = sdp.split(/\\r\\n(?=m=)/).find((s) => s.startsWith("m=audio")) || "";
  const direction = (section.match(/^a=(sendrecv|sendonly|recvonly|inactive)$/m) || [])[1] || null;
  const msid = (section.match(/^a=msid:(\\S+) (\\S+)$/m) || []).slice(1);
  return {direction, msid};
}"""


def require_browser() -> None:
    """Fail (not skip) when the browser or Playwright is missing: CI installs both."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: {INSTALL_HINT}", pytrace=False)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail(f"the Python package playwright is not installed: {INSTALL_HINT}", pytrace=False)


@contextlib.contextmanager
def server_process(
    tmp_path: Path, *extra_args: str, env: dict[str, str] | None = None
) -> Iterator[tuple[str, Path]]:
    """``avatar-server serve --engine testpattern`` on a free loopback port, ready: URL and log.
    ``extra_args`` are more ``serve`` flags, ``env`` more environment variables."""
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "avatar_server.cli", "serve", "--engine", "testpattern", "--host", "127.0.0.1",
             "--port", "0", "--testpattern-delay-s", "0.2", "--log-level", "INFO", *extra_args],
            stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, **(env or {})},
        )  # fmt: skip
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stdout], [], [], 0.5)[0]:
                match = re.search(r"open (http://\S+/) ", proc.stdout.readline())
                url = match and match.group(1)
        assert url, f"the server did not start:\n{log_path.read_text()}"
        while time.monotonic() < deadline:  # like a load balancer: wait for /readyz
            try:
                with urllib.request.urlopen(url + "readyz", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail(f"the server did not become ready:\n{log_path.read_text()}")
        yield url, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def write_fake_microphone(tmp_path: Path, media_dir: Path) -> Path:
    """``jfk.flac`` as a 48 kHz mono 16-bit WAV (decoded and resampled with PyAV): what
    Chromium's ``--use-file-for-fake-audio-capture`` reads (and loops)."""
    samples = load_audio(media_dir / "jfk.flac", SAMPLE_RATE_HZ)
    return write_wav_mono16(tmp_path / "jfk_48k.wav", samples, SAMPLE_RATE_HZ)


class PageWaiter:
    """``wait(condition_js, what, timeout_s)``: wait for a condition in the page; on timeout fail
    with the page's stats, the server messages it received, its console and the server log."""

    def __init__(self, page: Any, server_log: Path) -> None:
        self.page = page
        self.server_log = server_log
        self.console: list[str] = []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))

    def wait(self, condition_js: str, what: str, timeout_s: float) -> None:
        from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

        try:
            self.page.wait_for_function(condition_js, timeout=timeout_s * 1000)
        except PlaywrightTimeoutError:
            events = self.page.evaluate("window.avatarEvents.filter((m) => m.type !== 'stats')")
            pytest.fail(
                f"no {what} within {timeout_s} s\npage stats: {self.page.evaluate(STATS_JS)}\n"
                f"server messages: {events}\nconsole: {self.console}\nserver log (tail):\n"
                + "\n".join(self.server_log.read_text().splitlines()[-30:]),
                pytrace=False,
            )

    def page_errors(self) -> list[str]:
        """Uncaught exceptions in the page so far."""
        return [line for line in self.console if line.startswith("pageerror")]
