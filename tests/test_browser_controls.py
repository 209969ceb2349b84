"""The page's session controls in headless Chromium against ``avatar-server serve --engine
testpattern`` (a subprocess, recordings in the test's ``tmp_path``). Chromium's fake capture
device plays ``jfk.flac`` (looped) as the microphone; the page's own records of what it sent
(``window.avatarSent``) and received (``window.avatarEvents``) are compared with what the server
answered and wrote:

* mode selector ``Microphone (lip-sync)`` + barge-in: ``session.start`` carries ``mode:
  lipsync`` and ``barge_in: true`` and ``session.ready`` echoes both; the offer's audio section
  is ``sendrecv`` with a track, RTP goes out, the server hears a voice (``listening``) and
  lip-syncs it (``speaking``); the state line shows the last ``state`` the server sent; the
  microphone button mutes the track; the text mode cannot be chosen during the session;
* switching to ``Conversation`` and turning barge-in off while running send
  ``session.update``, and the server's ``stats`` report the new mode;
* the Record button: ``record.started`` (REC badge, button pressed), then ``record.stopped``;
  the page shows the id, duration and path; the server's MP4 exists and lasts ``duration_ms``
  (within 2 frames), about as long as the button was on (within 1.5 s);
* a second recording runs into the server's ``max_recording_s``: the page shows the reason
  (when ``record.stopped`` carries one) and the button is ready again;
* Stop: the state line says ``not connected`` and the recording controls are disabled.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import av
import pytest

from tests.browser_support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    OFFER_AUDIO_JS,
    STATS_JS,
    PageWaiter,
    require_browser,
    server_process,
    write_fake_microphone,
)

pytestmark = pytest.mark.slow

RECORD_S = 3.0
LIMIT_S = 5.0  # max_recording_s of the server: the second recording runs into it

SENT_OF_TYPE_JS = "(type) => window.avatarSent.filter((m) => m.type === type)"
# The last state the server sent and the state line, read at the same instant.
STATE_NOW_JS = """() => {
  const states = window.avatarEvents.filter((m) => m.type === "state" || (m.type === "stats" && m.state));
  return {server: states.length ? states[states.length - 1].state : null,
          line: document.getElementById("state").textContent};
}"""


def test_mode_barge_in_and_server_recording(media_dir: Path, tmp_path: Path) -> None:
    require_browser()
    from playwright.sync_api import expect, sync_playwright

    fake_microphone = write_fake_microphone(tmp_path, media_dir)
    recordings = tmp_path / "recordings"
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with (
        server_process(
            tmp_path,
            "--recordings-dir",
            str(recordings),
            env={"AVATAR_SERVER_LIMITS__MAX_RECORDING_S": str(LIMIT_S)},
        ) as (server_url, server_log),
        sync_playwright() as p,
    ):
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=[*CHROMIUM_ARGS, f"--use-file-for-fake-audio-capture={fake_microphone}"],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            waiter = PageWaiter(page, server_log)
            page.goto(server_url)

            # Before connecting: Text mode, barge-in unavailable, no recording.
            expect(page.locator("#mode")).to_have_value("text")
            expect(page.locator("#barge-in")).to_be_disabled()
            expect(page.locator("#record")).to_be_disabled()
            expect(page.locator("#state")).to_have_text("not connected")
            page.select_option("#mode", "lipsync")
            expect(page.locator("#barge-in")).to_be_enabled()
            page.check("#barge-in")
            page.set_input_files("#image", str(media_dir / "portrait.png"))
            page.click("#start")

            waiter.wait(
                "() => window.avatar.pc && window.avatar.pc.connectionState === 'connected'",
                "WebRTC connection",
                30,
            )
            start_sent = page.evaluate(SENT_OF_TYPE_JS, "session.start")[0]
            assert (start_sent["mode"], start_sent["barge_in"]) == ("lipsync", True), start_sent
            ready = page.evaluate("window.avatarEvents.find((m) => m.type === 'session.ready')")
            assert (ready["mode"], ready["barge_in"]) == ("lipsync", True), ready

            # The microphone goes out on the offer's audio section, and the server hears it.
            offer_audio = page.evaluate(OFFER_AUDIO_JS)
            assert offer_audio["direction"] == "sendrecv" and len(offer_audio["msid"]) == 2, offer_audio
            expect(page.locator("#mic")).to_be_visible()
            expect(page.locator("#mic")).to_have_attribute("aria-pressed", "true")
            expect(page.locator("#mode option[value='text']")).to_be_disabled()
            waiter.wait(
                "() => window.avatarEvents.some((m) => m.type === 'state' && m.state === 'listening')",
                "state listening (the server hears the microphone)",
                20,
            )
            waiter.wait(
                "() => window.avatarEvents.some((m) => m.type === 'state' && m.state === 'speaking')",
                "state speaking (lip-sync of the microphone)",
                20,
            )
            now = page.evaluate(STATE_NOW_JS)
            assert now["line"] == now["server"], now
            mic = page.evaluate(STATS_JS)["mic"]
            assert mic["packetsSent"] >= 50, mic  # 20 ms packets for over a second
            page.screenshot(path=str(shots / "1-lipsync.png"))

            # Options while running: conversation mode, barge-in off -> session.update.
            page.select_option("#mode", "conversation")
            waiter.wait(
                "() => window.avatarEvents.some((m) => m.type === 'stats' && m.mode === 'conversation')",
                "stats with mode conversation after session.update",
                10,
            )
            page.uncheck("#barge-in")
            updates = page.evaluate(SENT_OF_TYPE_JS, "session.update")
            assert updates == [
                {"type": "session.update", "mode": "conversation"},
                {"type": "session.update", "barge_in": False},
            ], updates

            # Mute: the track is detached.
            page.click("#mic")
            expect(page.locator("#mic")).to_have_attribute("aria-pressed", "false")
            assert page.evaluate(
                "window.avatar.pc.getSenders().filter((s) => s.track && s.track.kind === 'audio').length"
            ) == 0  # fmt: skip

            # Server recording.
            page.click("#record")
            waiter.wait(
                "() => window.avatarEvents.some((m) => m.type === 'record.started')", "record.started", 10
            )
            clicked_on_s = time.monotonic()
            expect(page.locator("#record")).to_have_attribute("aria-pressed", "true")
            expect(page.locator("#rec-badge")).to_be_visible()
            started = page.evaluate("window.avatarEvents.find((m) => m.type === 'record.started')")
            expect(page.locator("#record-status")).to_contain_text(started["recording_id"])
            page.wait_for_timeout(RECORD_S * 1000)
            page.click("#record")
            clicked_off_s = time.monotonic()
            waiter.wait(
                "() => window.avatarEvents.some((m) => m.type === 'record.stopped')", "record.stopped", 20
            )
            stopped = page.evaluate("window.avatarEvents.find((m) => m.type === 'record.stopped')")
            expect(page.locator("#record")).to_have_attribute("aria-pressed", "false")
            expect(page.locator("#rec-badge")).to_be_hidden()
            status = page.locator("#record-status")
            seconds = f"{stopped['duration_ms'] / 1000:.1f} s"
            expect(status).to_contain_text(
                re.compile(rf"Recorded {stopped['recording_id']}: {re.escape(seconds)}")
            )
            expect(status).to_contain_text(stopped["path"])
            expect(page.locator("#error")).to_be_hidden()
            page.screenshot(path=str(shots / "2-recorded.png"))
            sent_types = [m["type"] for m in page.evaluate("window.avatarSent")]
            assert sent_types.count("record.start") == 1 and sent_types.count("record.stop") == 1, sent_types

            # A recording the server ends at a limit: the page says why and offers Record again.
            page.click("#record")
            waiter.wait(
                "() => window.avatarEvents.filter((m) => m.type === 'record.stopped').length === 2",
                "record.stopped of the second recording (max_recording_s)",
                LIMIT_S + 10,
            )
            limited = page.evaluate("window.avatarEvents.filter((m) => m.type === 'record.stopped')[1]")
            expect(page.locator("#record")).to_have_attribute("aria-pressed", "false")
            expect(page.locator("#rec-badge")).to_be_hidden()
            if "reason" in limited:  # a newer field of record.stopped
                assert limited["reason"] == "max_duration", limited
                expect(status).to_contain_text("the server stopped it: its maximum duration was reached")
                expect(status).to_have_class(re.compile(r"\bwarn\b"))
            assert abs(limited["duration_ms"] / 1000 - LIMIT_S) <= 0.1, limited
            sent_types = [m["type"] for m in page.evaluate("window.avatarSent")]
            assert sent_types.count("record.stop") == 1, sent_types  # the page did not stop it

            assert not waiter.page_errors(), waiter.console
            page.click("#stop")
            expect(page.locator("#state")).to_have_text("not connected")
            expect(page.locator("#record")).to_be_disabled()
            expect(page.locator("#mic")).to_be_hidden()
        finally:
            browser.close()

    path = recordings / stopped["path"]  # the name under the server's recordings_dir
    assert path.parent == recordings and path.is_file(), stopped
    with av.open(str(path)) as container:
        file_s = container.duration / av.time_base
        frames = sum(1 for _ in container.decode(video=0))
    duration_s = stopped["duration_ms"] / 1000
    held_s = clicked_off_s - clicked_on_s
    print(
        f"\nserver recording {stopped['recording_id']}: {file_s:.2f} s, {frames} frames "
        f"(record.stopped {duration_s:.2f} s; button on for {held_s:.2f} s); screenshots in {shots}"
    )
    assert stopped["error"] is None and stopped.get("reason", "stopped") == "stopped", stopped
    assert abs(file_s - duration_s) <= 0.08 and abs(frames / 25 - duration_s) <= 0.08
    assert abs(duration_s - held_s) <= 1.5, (duration_s, held_s)
