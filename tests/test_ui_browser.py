"""The web UI in headless Chromium (fake camera and microphone): every page, a loopback call, admin, i18n.

One server and one browser for the whole module. Screenshots of every page at 1280x800 and 390x844 go to
test-artifacts/ (gitignored) for a human to look at.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright

from MiniCPMO45.audio.wav import write_wav
from rtc_server.app import start_server
from tests.browser_helpers import CHROMIUM, arrow, chromium_args, make_fake_mic, require_chromium
from tests.conftest import REPO_ROOT, server_test_config
from tests.rtc_client import RATE, speech_signal

pytestmark = pytest.mark.asyncio(loop_scope="module")

ARTIFACTS = REPO_ROOT / "test-artifacts"
ADMIN_TOKEN = "ui-admin-token"
VIEWPORTS = {"desktop": (1280, 800), "mobile": (390, 844)}
# Endpoints the UI probes knowing they may not exist yet; the browser logs their 404 as a console error.
OPTIONAL_ENDPOINTS = ("/api/presets", "/api/voices")
PAGES = {
    "home": ("/", "document.querySelectorAll('.mode-card .badge').length === 4"),
    "call": ("/call?mode=loopback", "document.querySelector('#mode').options.length >= 4"),
    "settings": ("/settings", "document.querySelector('#preset').options.length > 1"),
    "admin": ("/admin", "!document.querySelector('#token-form').hidden"),
    "docs": ("/docs", "document.querySelectorAll('.op').length > 20"),
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server():
    # One session slot, so that a second caller waits in the queue. ICE consent at aioice's defaults: the quick
    # timeout of the lifecycle tests can drop a live browser call on a loaded 2-core machine.
    config = server_test_config(
        auth={"admin_token": ADMIN_TOKEN},
        workers={"cpu_capacity": 1},
        rtc={"consent_interval_s": 5.0, "consent_failures": 6},
    )
    running = await start_server(config)
    running.url = running.url.replace("localhost", "127.0.0.1")
    yield running
    await running.stop()
    assert not running.manager.sessions, "sessions left after stop"
    for worker in running.supervisor.workers:
        assert worker.process is None or worker.process.returncode is not None, "worker process leaked"


@pytest.fixture(scope="module")
def fake_mic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_mic(tmp_path_factory.mktemp("ui-mic"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser(fake_mic: Path):
    require_chromium()
    args = chromium_args(fake_mic)
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=args)
        yield chromium
        await chromium.close()


class ConsoleErrors:
    """Console errors and uncaught exceptions of a page, minus 404s of endpoints probed on purpose."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("console", self._on_console)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))

    def _on_console(self, msg: ConsoleMessage) -> None:
        if msg.type not in ("error", "warning"):
            return
        url = (msg.location or {}).get("url", "")
        if (
            msg.type == "error"
            and ("404" in msg.text or "405" in msg.text)
            and url.endswith(OPTIONAL_ENDPOINTS)
        ):
            return
        self.errors.append(f"{msg.type}: {msg.text} ({url})")


async def new_page(
    browser: Browser, viewport: str = "desktop", locale: str = "en-US"
) -> tuple[Page, ConsoleErrors]:
    width, height = VIEWPORTS[viewport]
    context = await browser.new_context(viewport={"width": width, "height": height}, locale=locale)
    page = await context.new_page()
    return page, ConsoleErrors(page)


async def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"ui-{name}.png"))


@pytest.mark.parametrize("viewport", list(VIEWPORTS))
async def test_every_page_loads_cleanly(server, browser: Browser, viewport: str) -> None:
    page, console = await new_page(browser, viewport)
    try:
        for name, (path, ready) in PAGES.items():
            await page.goto(f"{server.url}{path}")
            await page.wait_for_function(arrow(ready), timeout=10000)
            await page.wait_for_load_state("networkidle")
            overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            await screenshot(page, f"{name}-{viewport}")
            assert overflow <= 0, f"{name} scrolls sideways by {overflow} px at {viewport}"
            assert not console.errors, f"{name}: {console.errors}"
        # The home page says clearly that this is the embedded demo model, and how to change that.
        await page.goto(f"{server.url}/")
        banner = await page.text_content("#embedded-banner")
        assert "demo model" in banner and "config.toml" in banner and "--model-path" in banner
        unavailable = await page.eval_on_selector_all(
            ".mode-card.unavailable", "cards => cards.map(c => c.dataset.mode)"
        )
        assert unavailable == []  # every mode card (chat, audio_duplex, omni_duplex, loopback) is served
    finally:
        await page.context.close()


async def test_loopback_call_from_the_call_page(server, browser: Browser) -> None:
    page, console = await new_page(browser)
    try:
        await page.goto(f"{server.url}/call?mode=loopback")
        await page.click("#start")
        await page.wait_for_function(
            arrow("window.callState.pc && window.callState.pc.connectionState === 'connected'"), timeout=20000
        )
        await page.wait_for_function(arrow("document.querySelector('#state').dataset.state === 'listening'"))
        assert await page.text_content("#state") == "Listening"
        # The echo of the fake microphone arrives on the WebRTC track and drives the level meter.
        await page.wait_for_function(arrow("window.callState.maxRemoteLevel > 0.01"), timeout=15000)
        # Typed text goes out on the data channel; loopback echoes it back as assistant text.
        await page.fill("#text-input", "hello from the transcript test")
        await page.press("#text-input", "Enter")
        await page.wait_for_function(
            arrow(
                "[...document.querySelectorAll('#transcript li.assistant')]"
                ".some(li => li.textContent.includes('hello from the transcript test'))"
            )
        )
        assert await page.locator("#transcript li.user").count() == 1
        await page.click("#stats-toggle")
        await page.wait_for_function(
            arrow("document.querySelector('#stats-body tr td').textContent.endsWith('ms')"), timeout=5000
        )
        status = await page.evaluate(
            """async (token) => (await fetch('/api/admin/status', {headers: {'X-Admin-Token': token}})).json()""",
            ADMIN_TOKEN,
        )
        events = await page.evaluate("window.callState.events")
        gum = await page.evaluate("window.callState.constraints")
        await screenshot(page, "call-active-desktop")
        await page.set_viewport_size({"width": 390, "height": 844})
        await asyncio.sleep(0.3)
        await screenshot(page, "call-active-mobile")
        session_id = await page.evaluate("window.callState.sessionId")
        await page.click("#stop")
        await page.wait_for_function(arrow("window.callState.sessionId === null"))
        assert not console.errors, console.errors
    finally:
        await page.context.close()
    assert gum["audio"] == {"echoCancellation": True, "noiseSuppression": True, "autoGainControl": True}
    assert any(e["type"] == "metrics" for e in events)
    [live] = [s for s in status["sessions"] if s["session_id"] == session_id]
    assert live["mode"] == "loopback" and live["phase"] == "active"
    assert live["units"] > 0 and live["unit_latency_p50_ms"] is not None
    deadline = time.monotonic() + 3
    while server.manager.sessions and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert server.manager.sessions == {}, "hang-up did not end the session"


async def test_unavailable_mode_shows_the_servers_error(server, browser: Browser) -> None:
    page, _ = await new_page(browser)
    released = asyncio.Event()

    async def hold_offer(route) -> None:  # noqa: ANN001 (playwright Route)
        await released.wait()  # keep the call "connecting" until the self-view has been checked
        # every card's mode is served now: ask for one the server does not have, to see its error shown
        body = json.loads(route.request.post_data or "{}")
        await route.continue_(post_data=json.dumps({**body, "mode": "no_such_mode"}))

    await page.route("**/api/sessions", hold_offer)
    try:
        await page.goto(f"{server.url}/call?mode=omni_duplex&autostart=1")
        # Video mode: the fake camera shows in the self-view tile, and the camera button is offered.
        await page.wait_for_function(
            arrow("document.querySelector('#self-video').videoWidth > 0"), timeout=10000
        )
        assert await page.is_visible("#self-video") and await page.is_visible("#cam")
        assert (await page.evaluate("window.callState.constraints"))["video"]
        # the camera turned off: the tile shows the avatar instead of a black frame, and back on
        await page.click("#cam")
        assert await page.is_hidden("#self-video") and await page.is_visible("#self-avatar")
        await page.click("#cam")
        assert await page.is_visible("#self-video") and await page.is_hidden("#self-avatar")
        await screenshot(page, "call-video-connecting-desktop")
        released.set()
        await page.wait_for_selector("#call-error", timeout=10000)
        text = await page.text_content("#call-error")
        assert "unknown mode 'no_such_mode'" in text and "loopback" in text, text
        assert await page.evaluate("window.callState.status") == "failed"
        assert await page.evaluate("window.callState.pc") is None
        assert await page.is_enabled("#start")
    finally:
        await page.context.close()
    assert server.manager.sessions == {}


async def test_admin_dashboard_asks_for_the_token(server, browser: Browser) -> None:
    page, console = await new_page(browser)
    try:
        await page.goto(f"{server.url}/admin")
        await page.fill("#admin-token", "not-the-token")
        await page.click("#token-form button[type=submit]")
        await page.wait_for_selector("#messages .banner.error")
        assert await page.is_visible("#token-form")
        await page.fill("#admin-token", ADMIN_TOKEN)
        await page.click("#token-form button[type=submit]")
        await page.wait_for_selector("#dashboard:not([hidden])")
        assert "cpu" in await page.text_content("#workers")
        assert await page.evaluate("sessionStorage.getItem('minicpmo.adminToken')") == ADMIN_TOKEN
        await screenshot(page, "admin-unlocked-desktop")
        await page.set_viewport_size({"width": 390, "height": 844})
        await screenshot(page, "admin-unlocked-mobile")
        # on a phone the workers table scrolls sideways; its one row stays one line high (no blank band)
        heights = await page.evaluate(
            "[...document.querySelectorAll('#workers tbody tr')].map((r) => r.getBoundingClientRect().height)"
        )
        assert heights and max(heights) < 60, heights
        # The wrong token was answered 401 by design: those console lines are the only expected errors.
        assert all("401" in e for e in console.errors), console.errors
    finally:
        await page.context.close()


async def test_language_switch_is_kept(server, browser: Browser) -> None:
    page, console = await new_page(browser, locale="en-US")
    try:
        await page.goto(f"{server.url}/")
        assert await page.text_content(".nav a[href='/']") == "Home"
        missing = await page.evaluate("import('/js/i18n.js').then(m => m.missingKeys())")
        assert missing == {"zh": [], "en": []}
        await page.select_option("#lang", "zh")
        assert await page.text_content(".nav a[href='/']") == "首页"
        assert "语音通话" in await page.text_content("#modes")
        await page.goto(f"{server.url}/docs")
        await page.wait_for_selector(".op")
        assert await page.evaluate("document.documentElement.lang") == "zh-CN"
        assert "数据通道事件" in await page.text_content("#doc")
        await screenshot(page, "docs-zh-desktop")
        await page.set_viewport_size({"width": 390, "height": 844})
        await page.goto(f"{server.url}/call?mode=loopback")
        await page.wait_for_function(arrow("document.querySelector('#mode').options.length >= 4"))
        assert await page.text_content("#start") == "开始通话"
        await screenshot(page, "call-zh-mobile")
        await page.goto(f"{server.url}/settings")
        await screenshot(page, "settings-zh-mobile")
        assert not console.errors, console.errors
    finally:
        await page.context.close()
    page, _ = await new_page(browser, locale="zh-CN")  # a fresh profile defaults to navigator.language
    try:
        await page.goto(f"{server.url}/")
        assert await page.text_content(".nav a[href='/']") == "首页"
    finally:
        await page.context.close()


async def test_settings_persist_and_feed_the_call(server, browser: Browser, tmp_path: Path) -> None:
    page, console = await new_page(browser)
    try:
        await page.goto(f"{server.url}/settings")
        await page.wait_for_function(arrow("document.querySelector('#preset').options.length > 1"))
        assert "from the server" in await page.text_content("#preset-source")
        # a fresh browser uses each mode's own prompt: nothing is sent
        assert await page.input_value("#prompt-mode") == "chat" and await page.input_value("#preset") == ""
        request_fields = (
            "(mode) => import('/js/settings-store.js').then(m => m.sessionRequestFields(undefined, mode))"
        )
        assert await page.evaluate(request_fields, "chat") == {"options": {}}
        await page.select_option("#preset", "chat_assistant_zh")
        prompt = await page.input_value("#system-prompt")
        assert "语音助手" in prompt
        # presets are per mode: the duplex list has the duplex presets, and its prompt stays the default
        await page.select_option("#prompt-mode", "audio_duplex")
        duplex_presets = await page.evaluate(
            "[...document.querySelector('#preset').options].map((o) => o.value)"
        )
        assert duplex_presets == ["", "audio_duplex_call_en", "audio_duplex_call_zh", "custom"], (
            duplex_presets
        )
        assert await page.input_value("#system-prompt") == ""
        await page.fill("#silence-ms", "1200")
        await page.reload()
        await page.wait_for_function(arrow("document.querySelector('#preset').options.length > 1"))
        assert await page.input_value("#system-prompt") == prompt
        assert await page.input_value("#silence-ms") == "1200"
        assert await page.input_value("#preset") == "chat_assistant_zh"
        fields = await page.evaluate(request_fields, "chat")
        # only what the user changed goes with the call: the mode keeps its other defaults
        assert fields == {"system_prompt": prompt, "options": {"min_silence_ms": 1200}}, fields
        assert "system_prompt" not in await page.evaluate(request_fields, "audio_duplex")
        clip = tmp_path / "voice.wav"
        write_wav(clip, speech_signal(tmp_path / "speech.wav"), RATE)
        await page.set_input_files("#voice-file", str(clip))
        await page.wait_for_function(
            arrow("(JSON.parse(localStorage.getItem('minicpmo.settings.v1')) || {}).voiceId")
        )
        fields = await page.evaluate(request_fields, "chat")
        assert re.fullmatch(r"[0-9a-f]{24}", fields["voice"]), (
            fields
        )  # the uploaded voice feeds the next call
        assert not console.errors, console.errors
    finally:
        await page.context.close()


async def test_docs_render_routes_and_events(server, browser: Browser) -> None:
    page, console = await new_page(browser)
    try:
        await page.goto(f"{server.url}/docs")
        await page.wait_for_selector("#event-TextEvent")
        doc = await page.evaluate("fetch('/api/openapi.json').then(r => r.json())")
        operations = sum(len(item) for item in doc["paths"].values())
        assert await page.locator("section[id^='op-']").count() == operations
        events = doc["x-data-channel-events"]
        for name in events["server_to_client"] + events["client_to_server"]:
            assert await page.locator(f"#event-{name} pre.example").count() == 1, name
        example = await page.text_content("#event-QueueEvent pre.example")
        assert '"type":"queue"' in example and '"position"' in example
        assert not console.errors, console.errors
    finally:
        await page.context.close()


def seconds(text: str) -> int:
    """The queue countdown in seconds; negative once past the estimate ("0:02 over the estimate")."""
    match = re.fullmatch(r"(\d+):(\d\d)( over the estimate)?", text.strip())
    assert match, f"not a m:ss countdown: {text!r}"
    value = int(match[1]) * 60 + int(match[2])
    return -value if match[3] else value


async def wait_connected(page: Page) -> None:
    await page.wait_for_function(
        arrow(
            "window.callState.pc && window.callState.pc.connectionState === 'connected'"
            " && window.callState.phase === 'active'"
        ),
        timeout=20000,
    )


async def test_queue_countdown_and_server_hangup(server, browser: Browser) -> None:
    first, first_console = await new_page(browser)
    second, second_console = await new_page(browser)
    try:
        await first.goto(f"{server.url}/call?mode=loopback&autostart=1")
        await wait_connected(first)
        # The only slot is taken: the second caller waits, with its position and a countdown.
        await second.goto(f"{server.url}/call?mode=loopback&autostart=1")
        await second.wait_for_selector("#queue:not([hidden])", timeout=15000)
        await second.wait_for_function(
            arrow("document.querySelector('#queue-position').textContent === '#1'")
        )
        assert await second.evaluate("window.callState.status") == "queued"
        before = seconds(await second.text_content("#queue-eta"))
        await asyncio.sleep(2.2)
        after = seconds(await second.text_content("#queue-eta"))
        # The ETA comes from recent session lengths (short ones in this module). It counts down; one that ran
        # out takes the server's next estimate instead of showing "over the estimate".
        assert after >= 0, (before, after)
        assert 1 <= before - after <= 4 or before <= 3, (before, after)
        # the admin dashboard shows the waiting caller as queued, not as "Listening"
        admin, _ = await new_page(browser)
        await admin.goto(f"{server.url}/admin")
        await admin.fill("#admin-token", ADMIN_TOKEN)
        await admin.click("#token-form button[type=submit]")
        await admin.wait_for_selector("#dashboard:not([hidden])")
        row = admin.locator("#sessions tr", has_text="Queued")
        await row.first.wait_for(timeout=5000)
        cells = await row.first.locator("td").all_text_contents()
        assert "Listening" not in cells and cells.count("Queued") == 2, cells
        await admin.context.close()
        await screenshot(second, "call-queued-desktop")
        await second.set_viewport_size({"width": 390, "height": 844})
        await screenshot(second, "call-queued-mobile")
        # The server ends the first call: that page says so and offers one way on, a new call (not also
        # Reconnect); the second caller gets the slot.
        first_id = await first.evaluate("window.callState.sessionId")
        first_session = server.manager.get(first_id)
        assert first_session is not None, "the first call ended before the test ended it"
        await first_session.close("ended by the test")
        await first.wait_for_function(arrow("window.callState.status === 'ended'"), timeout=15000)
        assert await first.is_visible("#start") and await first.is_hidden("#reconnect")
        assert "The server ended the call." in await first.text_content("#transcript")
        await wait_connected(second)
        assert await second.is_hidden("#queue")
        await second.click("#stop")
        await second.wait_for_function(arrow("window.callState.sessionId === null"))
        await first.click("#start")
        await wait_connected(first)
        await first.click("#stop")
        await first.wait_for_function(arrow("window.callState.sessionId === null"))
        assert not first_console.errors and not second_console.errors, (
            first_console.errors,
            second_console.errors,
        )
    finally:
        await first.context.close()
        await second.context.close()
    deadline = time.monotonic() + 3
    while server.manager.sessions and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert server.manager.sessions == {}


async def test_statistics_overlay_grades(server, browser: Browser) -> None:
    page, console = await new_page(browser)
    try:
        await page.goto(f"{server.url}/")
        result = await page.evaluate(
            """import('/js/call-stats.js').then(({ grade, median, CallStats }) => {
                 const stats = new CallStats();
                 [30, 10, 20].forEach((ms, unit) =>
                   stats.addUnit({ unit, handoff_ms: 1, compute_ms: 2, roundtrip_ms: ms }));
                 return {
                   grades: [grade('roundtrip', 499), grade('roundtrip', 500), grade('roundtrip', 1500),
                            grade('rtt', 100), grade('loss', 3), grade('jitter', 200), grade('rtt', null)],
                   medians: [median([]), median([3, 1, 2]), median([4, 1, 2, 3])],
                   rows: stats.rows().slice(0, 2).map((r) => r[1]),
                 };
               })"""
        )
        assert not console.errors, console.errors
    finally:
        await page.context.close()
    assert result["grades"] == ["good", "meh", "poor", "good", "meh", "poor", ""]
    assert result["medians"] == [None, 2, 2.5]
    assert result["rows"] == ["20 ms", "20 ms"]  # last unit, then the median of the recent ones


async def test_pages_with_an_api_token(browser: Browser) -> None:
    token = "ui-api-token"
    protected = await start_server(server_test_config(auth={"api_token": token}))
    url = protected.url.replace("localhost", "127.0.0.1")
    page, _ = await new_page(browser)
    try:
        await page.goto(f"{url}/")
        await page.wait_for_selector("#messages .banner.error")
        assert "needs an API token" in await page.text_content("#messages")
        await page.click("#messages a[href='/settings']")
        # the page's script saves the field as it is typed; under load the field can show before it runs
        await page.wait_for_function(arrow("document.getElementById('api-token').oninput !== null"))
        await page.fill("#api-token", token)
        await page.goto(f"{url}/")
        await page.wait_for_function(arrow("document.querySelectorAll('.mode-card .badge').length === 4"))
        await page.goto(f"{url}/call?mode=loopback&autostart=1")
        await wait_connected(page)
        await page.click("#stop")
        await page.wait_for_function(arrow("window.callState.sessionId === null"))
    finally:
        await page.context.close()
        await protected.stop()
    assert not protected.manager.sessions
