"""End to end in a real browser: headless Chromium (Debian's ``chromium``, driven by Playwright)
loads the page, starts a session, and is measured through the page's own WebRTC stats.

The server is ``avatar-server serve --engine testpattern`` in a subprocess (0.2 s simulated
generation time per segment), so that its media pacing does not share a process with the test.
Chromium's fake capture device plays ``jfk.flac`` (converted to a 48 kHz WAV, which is what
``--use-file-for-fake-audio-capture`` reads) as the microphone.

What is checked, all from the page (``pc.getStats()``, ``window.avatarEvents``, the DOM):

* Start stays disabled until an image is chosen; then video frames are decoded at 25 fps
  (20-30 fps over 6 s) and audio arrives (RTP packets and decoded samples at ~48 kHz);
* the overlay shows the page's own figures and the server's ``stats`` fields with units;
* text typed and spoken with Ctrl+Enter gives ``speak.started``; the Interrupt button gives
  ``interrupted`` for that utterance;
* the microphone toggle sends audio (outbound RTP) and the server hears voice (``listening``);
* an error from the server (an utterance over ``max_utterance_chars``) is shown in the alert,
  and Esc interrupts.

ICE runs on loopback only: the server offers 127.0.0.1, and Chromium gathers loopback
candidates only with ``--allow-loopback-in-peer-connection``. Screenshots go to the test's
``tmp_path``.
"""

from __future__ import annotations

import contextlib
import re
import select
import subprocess
import sys
import time
import urllib.request
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.e2e_support import load_audio

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
INSTALL_HINT = "run .ci/run (it installs Debian's chromium and the Python package playwright)"
SAMPLE_RATE_HZ = 48_000
MEASURE_S = 6.0

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

# Addresses of the selected ICE candidate pair.
ICE_PAIR_JS = """async () => {
  const report = await window.avatar.pc.getStats();
  let pair = null;
  report.forEach((s) => { if (s.type === "transport" && s.selectedCandidatePairId) pair = report.get(s.selectedCandidatePairId); });
  if (!pair) return null;
  const local = report.get(pair.localCandidateId), remote = report.get(pair.remoteCandidateId);
  return {local: local.address, remote: `${remote.address}:${remote.port}`, protocol: local.protocol};
}"""

SPOKEN_TEXT = (
    "Good evening. This is a test of the streaming avatar in a real browser, and this sentence "
    "is long enough to still be playing when the interrupt button is pressed a moment after the "
    "first frame of it has left the server."
)


def require_browser() -> None:
    """Fail (not skip) when the browser or Playwright is missing: CI installs both."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: {INSTALL_HINT}", pytrace=False)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail(f"the Python package playwright is not installed: {INSTALL_HINT}", pytrace=False)


@contextlib.contextmanager
def server_process(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``avatar-server serve --engine testpattern`` on a free loopback port, ready: URL and log."""
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "avatar_server.cli", "serve", "--engine", "testpattern", "--host", "127.0.0.1",
             "--port", "0", "--testpattern-delay-s", "0.2", "--log-level", "INFO"],
            stdout=subprocess.PIPE, stderr=log, text=True,
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


@pytest.fixture
def fake_microphone(tmp_path: Path, media_dir: Path) -> Path:
    """``jfk.flac`` as a 48 kHz mono 16-bit WAV (decoded and resampled with PyAV)."""
    samples = load_audio(media_dir / "jfk.flac", SAMPLE_RATE_HZ)
    path = tmp_path / "jfk_48k.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE_HZ)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def _rate(a: dict, b: dict, key: str) -> float:
    return (b[key] - a[key]) / ((b["t"] - a["t"]) / 1000)


def test_browser_session(fake_microphone: Path, media_dir: Path, tmp_path: Path) -> None:
    require_browser()
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
    from playwright.sync_api import expect, sync_playwright

    shots = tmp_path / "screenshots"
    shots.mkdir()
    with server_process(tmp_path) as (server_url, server_log), sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=[*CHROMIUM_ARGS, f"--use-file-for-fake-audio-capture={fake_microphone}"],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            console: list[str] = []
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))

            def wait_for(condition_js: str, what: str, timeout_s: float) -> None:
                """Wait for a condition in the page; on timeout fail with what the page and server saw."""
                try:
                    page.wait_for_function(condition_js, timeout=timeout_s * 1000)
                except PlaywrightTimeoutError:
                    events = page.evaluate("window.avatarEvents.filter((m) => m.type !== 'stats')")
                    pytest.fail(
                        f"no {what} within {timeout_s} s\npage stats: {page.evaluate(STATS_JS)}\n"
                        f"server messages: {events}\nconsole: {console}\nserver log (tail):\n"
                        + "\n".join(server_log.read_text().splitlines()[-30:]),
                        pytrace=False,
                    )

            page.goto(server_url)

            # Start needs an image, and says so.
            expect(page.locator("#start")).to_be_disabled()
            expect(page.locator("#image-hint")).to_contain_text("Required")
            page.set_input_files("#image", str(media_dir / "portrait.png"))
            expect(page.locator("#start")).to_be_enabled()
            page.fill("#prompt", "A person looks at the camera.")
            page.click("#start")

            # Media flows: measure decoded video and received audio over MEASURE_S.
            wait_for(
                "() => window.avatar.pc && window.avatar.pc.connectionState === 'connected'",
                "WebRTC connection (ICE on loopback: is --allow-loopback-in-peer-connection honoured?)",
                30,
            )
            wait_for("() => window.avatar.figures.framesDecoded > 25", "decoded video frames", 15)
            first = page.evaluate(STATS_JS)
            page.wait_for_timeout(MEASURE_S * 1000)
            last = page.evaluate(STATS_JS)
            span_s = (last["video"]["t"] - first["video"]["t"]) / 1000
            fps = _rate(first["video"], last["video"], "framesDecoded")
            audio_packets_per_s = _rate(first["audio"], last["audio"], "packetsReceived")
            audio_samples_per_s = _rate(first["audio"], last["audio"], "totalSamplesReceived")
            page.screenshot(path=str(shots / "1-streaming.png"))
            ice_pair = page.evaluate(ICE_PAIR_JS)
            # the server's only candidate is 127.0.0.1; the browser's may be any local address
            assert ice_pair and ice_pair["remote"].startswith("127.0.0.1:"), ice_pair

            assert (last["video"]["width"], last["video"]["height"]) == (224, 128), last
            assert 20 <= fps <= 30, (fps, first, last)
            assert 40 <= audio_packets_per_s <= 60, (audio_packets_per_s, first, last)  # 20 ms packets
            assert 0.8 <= audio_samples_per_s / SAMPLE_RATE_HZ <= 1.2, (audio_samples_per_s, last)

            # The overlay: the page's own figures and the server's stats with units.
            expect(page.locator("#overlay")).to_be_visible()
            expect(page.locator("#stat-fps")).to_have_text(re.compile(r"^\d+\.\d$"))
            expect(page.locator("#stat-jitter")).to_have_text(re.compile(r"^\d+ ms$"))
            expect(page.locator("#stat-ttff")).to_have_text(re.compile(r"^\d+ ms$"))
            expect(page.locator('dd[data-field="buffer_ms"]')).to_have_text(re.compile(r"^\d+ ms$"))
            expect(page.locator('dd[data-field="frames_sent"]')).to_have_text(re.compile(r"^\d+$"))
            overlay_text = page.inner_text("#overlay")

            # Speak (typed, Ctrl+Enter, a language), then the Interrupt button.
            page.select_option("#language", "English")
            page.click("#text")
            page.keyboard.type(SPOKEN_TEXT)
            sent_s = time.monotonic()
            page.keyboard.press("Control+Enter")
            expect(page.locator("#text")).to_have_value("")
            wait_for(
                "() => window.avatarEvents.some((m) => m.type === 'speak.started' && m.utterance_id === 'u1')",
                "speak.started for u1",
                20,
            )
            speak_latency_s = time.monotonic() - sent_s
            page.wait_for_timeout(1000)
            page.screenshot(path=str(shots / "2-speaking.png"))
            page.click("#interrupt")
            wait_for(
                "() => window.avatarEvents.some((m) => m.type === 'interrupted' && m.utterance_id === 'u1')",
                "interrupted for u1",
                10,
            )
            events = page.evaluate("window.avatarEvents")
            interrupted = next(m for m in events if m["type"] == "interrupted")
            assert interrupted["played_ms"] > 0, interrupted
            assert not any(m["type"] == "speak.ended" and m["utterance_id"] == "u1" for m in events), events

            # Microphone: jfk.flac goes out over RTP and the server hears a voice.
            mic_before = page.evaluate(STATS_JS).get("mic", {"packetsSent": 0})
            page.click("#mic")
            expect(page.locator("#mic")).to_have_attribute("aria-pressed", "true")
            wait_for(
                "() => window.avatarEvents.some((m) => m.type === 'state' && m.state === 'listening')",
                "state listening with the microphone on",
                20,
            )
            page.wait_for_timeout(1000)
            mic_after = page.evaluate(STATS_JS)["mic"]
            mic_packets = mic_after["packetsSent"] - mic_before["packetsSent"]
            assert mic_packets >= 40, (mic_before, mic_after)  # 20 ms packets, over 1 s and more
            page.click("#mic")
            expect(page.locator("#mic")).to_have_attribute("aria-pressed", "false")

            # A server error is shown; Esc interrupts.
            page.fill("#text", "word " * 2100)  # over max_utterance_chars (10000)
            page.click("#speak")
            expect(page.locator("#error")).to_be_visible(timeout=10_000)
            expect(page.locator("#error-text")).to_contain_text("utterance_too_long")
            page.screenshot(path=str(shots / "3-error.png"))
            count_js = "window.avatarEvents.filter((m) => m.type === 'interrupted').length"
            interrupts_before = page.evaluate(count_js)
            page.keyboard.press("Escape")
            wait_for(
                f"() => {count_js} > {interrupts_before}",
                "interrupted after Esc",
                10,
            )
            page.click("#error-close")
            expect(page.locator("#error")).to_be_hidden()

            # The figures overlay can be hidden and shown again.
            page.click("#figures")
            expect(page.locator("#overlay")).to_be_hidden()
            page.click("#figures")
            expect(page.locator("#overlay")).to_be_visible()

            assert not [line for line in console if line.startswith("pageerror")], console
            page.click("#stop")
            expect(page.locator("#start")).to_be_enabled()
        finally:
            browser.close()

    print(
        f"\nbrowser: video {fps:.2f} fps decoded over {span_s:.1f} s (framesPerSecond "
        f"{last['video']['framesPerSecond']}, dropped {last['video']['framesDropped']}), audio "
        f"{audio_packets_per_s:.1f} packets/s, {audio_samples_per_s:.0f} samples/s; speak->speak.started "
        f"{1000 * speak_latency_s:.0f} ms; interrupted after played_ms {interrupted['played_ms']}; "
        f"mic packets sent {mic_packets}; ICE pair {ice_pair}\noverlay:\n{overlay_text}\n"
        f"screenshots in {shots}"
    )
