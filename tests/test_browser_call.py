"""Headless Chromium makes a loopback call from the minimal call page (public/call.html)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from playwright.async_api import async_playwright

from tests.browser_helpers import CHROMIUM, arrow, chromium_args, make_fake_mic, require_chromium
from tests.conftest import REPO_ROOT

ARTIFACTS = REPO_ROOT / "test-artifacts"

# Records what the page asks getUserMedia for, before any page script runs.
RECORD_GUM = """
window.__gumCalls = [];
const original = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
navigator.mediaDevices.getUserMedia = (constraints) => {
  window.__gumCalls.push(JSON.parse(JSON.stringify(constraints)));
  return original(constraints);
};
"""

INBOUND_AUDIO = """
async () => {
  const stats = await window.callState.pc.getStats();
  for (const report of stats.values()) {
    if (report.type === "inbound-rtp" && report.kind === "audio") {
      return { packets: report.packetsReceived, bytes: report.bytesReceived,
               samples: report.totalSamplesReceived || 0, energy: report.totalAudioEnergy || 0 };
    }
  }
  return null;
}
"""


@pytest.fixture(scope="module")
def fake_mic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_mic(tmp_path_factory.mktemp("mic"))


async def test_browser_loopback_call(start_test_server, fake_mic: Path) -> None:
    require_chromium()
    server = await start_test_server()
    url = server.url.replace("localhost", "127.0.0.1")
    args = chromium_args(fake_mic)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = await browser.new_page()
            await page.add_init_script(RECORD_GUM)
            console: list[str] = []
            page.on("console", lambda msg: console.append(msg.text))
            await page.goto(f"{url}/call.html?mode=loopback&autostart=1")
            await page.wait_for_function(
                arrow("window.callState.pc && window.callState.pc.connectionState === 'connected'"),
                timeout=20000,
            )
            # Loopback delay (1 s) plus the speech itself: then the echo must be arriving.
            await asyncio.sleep(server.config.loopback.delay_s + 2.0)
            inbound = await page.evaluate(INBOUND_AUDIO)
            events = await page.evaluate("window.callState.events")
            gum_calls = await page.evaluate("window.__gumCalls")
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "browser-call.png"), full_page=True)
            session = server.manager.get(await page.evaluate("window.callState.sessionId"))
            assert session is not None and session.inbound is not None and session.inbound.frames_in > 0
            await page.click("#stop")
            await page.wait_for_function(arrow("window.callState.sessionId === null"))
        finally:
            await browser.close()
    assert gum_calls and gum_calls[0]["audio"]["echoCancellation"] is True, gum_calls
    assert inbound is not None and inbound["packets"] > 50 and inbound["bytes"] > 0, inbound
    assert inbound["energy"] > 0, f"remote audio arrived but was silent: {inbound}"
    assert any(e["type"] == "session" for e in events) and any(e["type"] == "state" for e in events), events
    assert any(e["type"] == "metrics" for e in events), "no unit reached the worker"
    await asyncio.sleep(0.3)
    assert server.manager.sessions == {}, "hang-up did not end the session"


async def test_browser_says_why_when_the_media_process_of_its_call_dies(
    start_test_server, fake_mic: Path
) -> None:
    """The call's media shard is killed mid-call: its events channel dies with it, so the page asks the call's
    URL (410) and shows the reason instead of a bare "connection lost"."""
    import os
    import signal

    require_chromium()
    server = await start_test_server(workers={"media_procs": 1})
    url = server.url.replace("localhost", "127.0.0.1")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=chromium_args(fake_mic))
        try:
            page = await browser.new_page()
            await page.goto(f"{url}/call.html?mode=loopback&autostart=1")
            await page.wait_for_function(
                arrow("window.callState.pc && window.callState.pc.connectionState === 'connected'"),
                timeout=20000,
            )
            (shard,) = server.manager.shards.shards
            os.kill(shard.pid, signal.SIGKILL)
            await page.wait_for_function(
                arrow("document.getElementById('transcript').textContent.includes('media_process_lost')"),
                timeout=40000,
            )
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "browser-media-process-lost.png"), full_page=True)
            # a lost connection offers one way back, Reconnect (the page also retries by itself): never both
            await page.wait_for_function(arrow("window.callState.status !== 'connected'"))
            assert await page.is_hidden("#start")
        finally:
            await browser.close()
