"""The browser page resumes its session after the WebSocket drops (headless Chromium, real WebRTC).

The page closes its WebSocket with code 4000 (``window.avatar.dropConnection()``): to the server
that is an abnormal close like a network drop, so it parks the session; the page reconnects and
sends ``session.resume``. The peer connection is kept, so the video never stops, and the new
control channel carries a whole utterance afterwards.
"""

from __future__ import annotations

from pathlib import Path

from tests.browser_support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    STATS_JS,
    PageWaiter,
    require_browser,
    server_process,
)

EVENTS_OF_TYPE_JS = "(type) => window.avatarEvents.filter((m) => m.type === type)"
SENT_OF_TYPE_JS = "(type) => window.avatarSent.filter((m) => m.type === type)"


def test_page_resumes_its_session_after_a_websocket_drop(media_dir: Path, tmp_path: Path) -> None:
    require_browser()
    from playwright.sync_api import expect, sync_playwright

    with server_process(tmp_path) as (server_url, server_log), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            waiter = PageWaiter(page, server_log)
            page.goto(server_url)
            page.set_input_files("#image", str(media_dir / "portrait.png"))
            page.click("#start")
            waiter.wait("() => window.avatar.pc && window.avatar.pc.connectionState === 'connected'",
                        "WebRTC connection", 30)
            waiter.wait("() => window.avatar.figures.framesDecoded > 25", "decoded video frames", 15)
            ready = page.evaluate(EVENTS_OF_TYPE_JS, "session.ready")[0]
            assert ready["resume_token"] and ready["resume_grace_s"] == 30, ready
            page.evaluate("window.__pcBeforeDrop = window.avatar.pc")
            before = page.evaluate(STATS_JS)["video"]["framesDecoded"]

            page.evaluate("window.avatar.dropConnection()")
            waiter.wait("() => window.avatarEvents.some((m) => m.type === 'session.resumed')", "session.resumed", 20)
            resumed = page.evaluate(EVENTS_OF_TYPE_JS, "session.resumed")[0]
            assert resumed["session_id"] == ready["session_id"], (ready, resumed)
            assert resumed["resume_token"] != ready["resume_token"]
            assert resumed["peer_connection"] == "connected", resumed
            assert page.evaluate(SENT_OF_TYPE_JS, "session.resume") == [
                {"type": "session.resume", "resume_token": ready["resume_token"]}
            ]
            # the same peer connection carries on: no second offer, frames keep coming
            assert page.evaluate("window.avatar.pc === window.__pcBeforeDrop")
            assert len(page.evaluate(SENT_OF_TYPE_JS, "webrtc.offer")) == 1
            expect(page.locator("#state")).not_to_have_text("reconnecting…")
            waiter.wait(f"async () => (await ({STATS_JS})()).video.framesDecoded > {before + 50}",
                        "video frames after the resume", 15)

            # the resumed control channel works: a whole utterance is spoken
            page.fill("#text", "Back again after a short network drop.")
            page.click("#speak")
            waiter.wait("() => window.avatarEvents.some((m) => m.type === 'speak.ended')", "speak.ended", 30)
            assert not page.evaluate(EVENTS_OF_TYPE_JS, "error"), page.evaluate(EVENTS_OF_TYPE_JS, "error")
            assert not page.evaluate(EVENTS_OF_TYPE_JS, "session.ended")
        finally:
            browser.close()
    log = server_log.read_text()
    assert "resum" in log.lower(), log[-2000:]
