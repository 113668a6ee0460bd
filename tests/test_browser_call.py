"""Headless Chromium makes a loopback call from the minimal call page (public/call.html)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from playwright.async_api import Browser, Page, async_playwright

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


async def open_loopback_call(page: Page, url: str) -> None:
    """The call page, started in loopback mode, once its peer connection is up."""
    await page.goto(f"{url}/call.html?mode=loopback&autostart=1")
    await page.wait_for_function(
        arrow("window.callState.pc && window.callState.pc.connectionState === 'connected'"), timeout=20000
    )


async def loopback_page(browser: Browser, url: str) -> Page:
    page = await browser.new_page()
    await open_loopback_call(page, url)
    return page


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
            await open_loopback_call(page, url)
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


PLAYOUT = """
async () => {
  const stats = await window.callState.pc.getStats();
  for (const report of stats.values()) {
    if (report.type === "inbound-rtp" && report.kind === "audio") {
      return { packets: report.packetsReceived, samples: report.totalSamplesReceived || 0,
               concealed: report.concealedSamples || 0, energy: report.totalAudioEnergy || 0,
               duration: report.totalSamplesDuration || 0, t: performance.now() / 1000,
               buffered: report.jitterBufferDelay || 0, emitted: report.jitterBufferEmittedCount || 0 };
    }
  }
  return null;
}
"""


def webrtc_energy(pcm: np.ndarray, rate: int = 48000) -> float:
    """`totalAudioEnergy` as WebRTC's receiver computes it over int16 `pcm`: per 10 ms of playout, (level / 32767)^2
    x 10 ms, where the level is the peak of the last 11 chunks of 10 ms (updated every 11th chunk, then the running
    peak is divided by 4)."""
    chunk = rate // 100
    peaks = np.abs(pcm[: pcm.size // chunk * chunk].reshape(-1, chunk).astype(np.int32)).max(axis=1)
    energy, running, level = 0.0, 0, 0
    for count, peak in enumerate(peaks):
        running = max(running, int(peak))
        if count % 11 == 0:
            level, running = running, running >> 2
        energy += (level / 32767) ** 2 * 0.01
    return energy


@pytest.mark.parametrize("packet_ms", [20, 40, 60])
async def test_browser_plays_the_outbound_speech_at_each_packet_size(
    start_test_server, fake_mic: Path, packet_ms: int
) -> None:
    """`rtc.outbound_packet_ms`: Chromium receives one RTP packet per `packet_ms`, decodes and plays all of it
    (samples played out keep up with the wall clock, next to nothing concealed) at the energy the server sent."""
    require_chromium()
    server = await start_test_server(rtc={"outbound_packet_ms": packet_ms})
    url = server.url.replace("localhost", "127.0.0.1")
    sent: list[np.ndarray] = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=chromium_args(fake_mic))
        try:
            page = await loopback_page(browser, url)
            session = server.manager.get(await page.evaluate("window.callState.sessionId"))
            assert session is not None and session.speech.packet_ms == packet_ms
            recorder_tap = session.speech.tap

            def tap(pcm: np.ndarray) -> None:  # the server's side: what each packet carried
                sent.append(pcm.copy())
                if recorder_tap is not None:
                    recorder_tap(pcm)

            session.speech.tap = tap
            # the echo (loopback delay 1 s) is playing from here; until now the track sent silence
            await asyncio.sleep(server.config.loopback.delay_s + 0.5)
            first = await page.evaluate(PLAYOUT)
            sent_first = len(sent)
            await asyncio.sleep(3.0)
            last = await page.evaluate(PLAYOUT)
            sent_last = len(sent)
            await page.click("#stop")
            await page.wait_for_function(arrow("window.callState.sessionId === null"))
        finally:
            await browser.close()
    assert first is not None and last is not None
    seconds = last["t"] - first["t"]
    packets_per_s = (last["packets"] - first["packets"]) / seconds
    assert abs(packets_per_s - 1000 / packet_ms) < 0.15 * 1000 / packet_ms, (packets_per_s, first, last)
    played_s = last["duration"] - first["duration"]
    assert abs(played_s - seconds) < 0.15, (played_s, seconds)
    samples = last["samples"] - first["samples"]
    assert samples > 0 and (last["concealed"] - first["concealed"]) / samples < 0.02, (first, last)
    heard, spoken = (
        last["energy"] - first["energy"],
        webrtc_energy(np.concatenate(sent[sent_first:sent_last])),
    )
    buffered_ms = 1000 * (last["buffered"] - first["buffered"]) / max(last["emitted"] - first["emitted"], 1)
    print(
        f"{packet_ms} ms packets: {packets_per_s:.1f}/s, jitter buffer {buffered_ms:.0f} ms, energy {heard / spoken:.2f}"
    )
    assert spoken > 0.01, f"the echo was (nearly) silent: {spoken}"
    assert 0.75 < heard / spoken < 1.33, (heard, spoken, first, last)


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
            page = await loopback_page(browser, url)
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
