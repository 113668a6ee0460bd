"""Headless Chromium (fake microphone and camera) calls each model mode from the real call page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from playwright.async_api import async_playwright

from tests.browser_helpers import CHROMIUM, arrow, chromium_args, make_fake_mic, require_chromium
from tests.conftest import REPO_ROOT

ARTIFACTS = REPO_ROOT / "test-artifacts"
EMBEDDED_CONFIG = REPO_ROOT / ".cache" / "embedded" / "minicpmo45-tiny-random" / "config.json"


@pytest.fixture(scope="module")
def fake_mic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_mic(tmp_path_factory.mktemp("mic"))


def events_js(kind: str) -> str:
    return f"(window.callState.events || []).filter((e) => e.type === {json.dumps(kind)})"


async def test_browser_calls_each_model_mode(start_test_server, fake_mic: Path) -> None:
    require_chromium()
    server = await start_test_server(workers={"heartbeat_timeout_s": 30.0})
    url = server.url.replace("localhost", "127.0.0.1")
    args = chromium_args(fake_mic)
    seen: dict[str, list[dict]] = {}
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = await browser.new_page()
            for mode in ("chat", "audio_duplex", "omni_duplex"):
                await page.goto(f"{url}/call.html?mode={mode}&autostart=1")
                await page.wait_for_function(
                    arrow("window.callState.pc && window.callState.pc.connectionState === 'connected'"),
                    timeout=30000,
                )
                await page.wait_for_function(
                    arrow(
                        f"{events_js('session')}.some((e) => e.mode === {json.dumps(mode)} && e.phase === 'active')"
                    ),
                    timeout=60000,
                )
                # units reach the mode (omni: with camera frames) and come back as metrics
                await page.wait_for_function(arrow(f"{events_js('metrics')}.length >= 3"), timeout=60000)
                if mode == "chat":
                    await page.wait_for_function(
                        arrow("!document.getElementById('text-input').disabled"), timeout=10000
                    )
                    await page.fill("#text-input", "Hello, who are you?")
                    await page.press("#text-input", "Enter")
                    await page.wait_for_function(
                        arrow(f"{events_js('state')}.some((e) => e.state === 'thinking')"), timeout=30000
                    )
                seen[mode] = await page.evaluate("window.callState.events")
                session = server.manager.get(await page.evaluate("window.callState.sessionId"))
                assert session is not None and session.mode == mode
                if mode == "omni_duplex":
                    assert session.video is not None and session.video_max_side is not None
                ARTIFACTS.mkdir(exist_ok=True)
                await page.screenshot(path=str(ARTIFACTS / f"browser-{mode}.png"), full_page=True)
                await page.click("#stop")
                await page.wait_for_function(arrow("window.callState.sessionId === null"), timeout=10000)
        finally:
            await browser.close()
    for mode, events in seen.items():
        assert not [e for e in events if e["type"] == "error"], (mode, events)
        assert any(e["type"] == "state" and e["state"] == "listening" for e in events), mode
        metrics = [e for e in events if e["type"] == "metrics"]
        assert all(m["kv_tokens"] and m["kv_tokens"] > 0 for m in metrics), (mode, metrics)
    # omni units carry the camera frame: a listen unit grows the context by the image block too
    query_num = json.loads(EMBEDDED_CONFIG.read_text())["query_num"]
    omni = {m["unit"]: m["kv_tokens"] for m in seen["omni_duplex"] if m["type"] == "metrics"}
    audio = {m["unit"]: m["kv_tokens"] for m in seen["audio_duplex"] if m["type"] == "metrics"}
    assert omni[2] - omni[1] == audio[2] - audio[1] + query_num + 2, (omni, audio)
