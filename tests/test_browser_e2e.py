"""End to end in a real browser: headless Chromium (Debian's ``chromium``, driven by Playwright)
loads the page, starts a session in the Text mode, and is measured through the page's own
WebRTC stats.

The server is ``avatar-server serve --engine testpattern`` in a subprocess (0.2 s simulated
generation time per segment), so that its media pacing does not share a process with the test.
The microphone modes, barge-in and server-side recording are driven in
``test_browser_controls.py``.

What is checked, all from the page (``pc.getStats()``, ``window.avatarEvents``, the DOM):

* Start stays disabled until an image is chosen; then video frames are decoded at 25 fps
  (20-30 fps over 6 s) and audio arrives (RTP packets and decoded samples at ~48 kHz);
* the Text mode sends no microphone: the offer's audio section is ``recvonly``, the microphone
  button is hidden, the mode selector is locked and barge-in is off (``session.ready``);
* the overlay shows the page's own figures and the server's ``stats`` fields with units;
* text typed and spoken with Ctrl+Enter gives ``speak.started`` and the state line says
  ``speaking``; the Interrupt button gives ``interrupted`` for that utterance;
* an error from the server (an utterance over ``max_utterance_chars``) is shown in the alert,
  and Esc interrupts; Stop returns the state line to ``not connected``.

ICE runs on loopback only (see ``tests/browser_support.py``). Screenshots go to the test's
``tmp_path``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.browser_support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    OFFER_AUDIO_JS,
    SAMPLE_RATE_HZ,
    STATS_JS,
    PageWaiter,
    require_browser,
    server_process,
)

pytestmark = pytest.mark.slow

MEASURE_S = 6.0

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


def _rate(a: dict, b: dict, key: str) -> float:
    return (b[key] - a[key]) / ((b["t"] - a["t"]) / 1000)


def test_browser_session(media_dir: Path, tmp_path: Path) -> None:
    require_browser()
    from playwright.sync_api import expect, sync_playwright

    shots = tmp_path / "screenshots"
    shots.mkdir()
    with server_process(tmp_path) as (server_url, server_log), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            waiter = PageWaiter(page, server_log)
            wait_for = waiter.wait
            console = waiter.console

            page.goto(server_url)

            # Start needs an image, and says so. The Text mode is the default.
            expect(page.locator("#start")).to_be_disabled()
            expect(page.locator("#image-hint")).to_contain_text("Required")
            expect(page.locator("#state")).to_have_text("not connected")
            expect(page.locator("#mode")).to_have_value("text")
            expect(page.locator("#barge-in")).to_be_disabled()
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

            # Text mode: no microphone goes out, and the session says so.
            assert page.evaluate(OFFER_AUDIO_JS) == {"direction": "recvonly", "msid": []}
            assert "mic" not in last, last
            ready = page.evaluate("window.avatarEvents.find((m) => m.type === 'session.ready')")
            assert ready["barge_in"] is False, ready
            # A new user is told what the picture is (the test pattern here; the preview's noise).
            expect(page.locator("#notice")).to_be_visible()
            expect(page.locator("#notice")).to_have_text(ready["notice"])
            assert "Test-pattern engine" in ready["notice"], ready
            start_sent = page.evaluate("window.avatarSent[0]")
            assert start_sent["type"] == "session.start" and start_sent["barge_in"] is False, start_sent
            assert "mode" not in start_sent, start_sent
            expect(page.locator("#mic")).to_be_hidden()
            expect(page.locator("#mode")).to_be_disabled()
            expect(page.locator("#record")).to_be_enabled()

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
            expect(page.locator("#state")).to_have_text("speaking")
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

            assert not waiter.page_errors(), console
            page.click("#stop")
            expect(page.locator("#start")).to_be_enabled()
            expect(page.locator("#state")).to_have_text("not connected")
            expect(page.locator("#mode")).to_be_enabled()
        finally:
            browser.close()

    print(
        f"\nbrowser: video {fps:.2f} fps decoded over {span_s:.1f} s (framesPerSecond "
        f"{last['video']['framesPerSecond']}, dropped {last['video']['framesDropped']}), audio "
        f"{audio_packets_per_s:.1f} packets/s, {audio_samples_per_s:.0f} samples/s; speak->speak.started "
        f"{1000 * speak_latency_s:.0f} ms; interrupted after played_ms {interrupted['played_ms']}; "
        f"ICE pair {ice_pair}\noverlay:\n{overlay_text}\n"
        f"screenshots in {shots}"
    )
