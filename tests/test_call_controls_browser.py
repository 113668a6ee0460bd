"""The call page's in-call controls in headless Chromium: pause/resume, a live mode switch that the menu
follows, "I'm done" in chat, interrupt, the call's prompt and voice shown, in English and Chinese."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import Page

from tests.browser_helpers import arrow, chromium, make_fake_mic
from tests.conftest import REPO_ROOT

ARTIFACTS = REPO_ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def fake_mic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_mic(tmp_path_factory.mktemp("mic"))


def events(kind: str, where: str = "true") -> str:
    return f"(window.callState.events || []).filter((e) => e.type === {json.dumps(kind)} && ({where}))"


async def wait_event(page: Page, kind: str, where: str = "true", timeout: float = 30000) -> None:
    await page.wait_for_function(arrow(f"{events(kind, where)}.length > 0"), timeout=timeout)


async def test_in_call_controls(start_test_server, fake_mic: Path) -> None:
    server = await start_test_server(workers={"heartbeat_timeout_s": 30.0})
    url = server.url.replace("localhost", "127.0.0.1")
    async with chromium(fake_mic) as browser:
        page = await browser.new_page()
        console_errors: list[str] = []
        page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
        await page.goto(f"{url}/call.html?mode=loopback")
        # a prompt of chat's own in the settings: it goes with a switch to chat, not with loopback
        chat_prompt = {"chat": {"presetId": "custom", "text": "Answer briefly."}}
        await page.evaluate(
            "(p) => localStorage.setItem('minicpmo.settings.v1', JSON.stringify({prompts: p}))",
            chat_prompt,
        )
        await page.click("#start")
        await wait_event(page, "session", "e.phase === 'active' && e.mode === 'loopback'")
        assert await page.is_visible("#in-call") and await page.is_hidden("#end-turn")
        assert not await page.is_disabled("#mode"), "the mode menu must stay usable during a call"
        setup = await page.text_content("#call-setup")
        assert setup is not None and "Prompt" in setup and "Voice: default" in setup

        # pause and resume: the button follows the server's events
        await page.click("#pause")
        await wait_event(page, "paused")
        assert await page.get_attribute("#pause", "aria-pressed") == "true"
        assert await page.get_attribute("#pause", "aria-label") == "Resume the call"
        await page.click("#pause")
        await wait_event(page, "resumed")
        assert await page.get_attribute("#pause", "aria-pressed") == "false"

        # a live switch to chat: the server reopens the call, the menu and the controls follow
        session_id = await page.evaluate("window.callState.sessionId")
        await page.select_option("#mode", "chat")
        await wait_event(page, "session", "e.mode === 'chat' && e.phase === 'active'", timeout=60000)
        assert await page.evaluate("window.callState.sessionId") == session_id, "a switch is not a new call"
        assert await page.input_value("#mode") == "chat"
        assert await page.is_visible("#end-turn")
        camera_modes = await page.evaluate(
            "[...document.getElementById('mode').options].filter((o) => o.disabled).map((o) => o.value)"
        )
        assert "omni_duplex" in camera_modes, "a call without a camera cannot switch to a camera mode"
        call = server.manager.get(session_id)
        assert call is not None and call.mode == "chat" and call.system_prompt == "Answer briefly."
        assert "Answer briefly." in (await page.text_content("#call-setup") or "")

        # "I'm done": the audio so far is the user's turn, and the model answers it
        # (once some of the caller's audio reached the chat mode: its units come back as metrics)
        start = await page.evaluate(f"{events('metrics')}.length")
        await page.wait_for_function(arrow(f"{events('metrics')}.length >= {start} + 6"), timeout=30000)
        await page.click("#end-turn")
        await wait_event(page, "state", "e.state === 'thinking'", timeout=60000)
        # the turn the model took shows in the transcript as a spoken turn with its length
        await wait_event(page, "user_turn", "e.seconds > 1")
        spoken = await page.text_content("#transcript li.user.spoken")
        assert spoken is not None and "spoken" in spoken and " s" in spoken
        # interrupt while the reply runs: the call goes back to listening
        await page.wait_for_function(arrow("!document.getElementById('interrupt').disabled"), timeout=30000)
        listening = events("state", "e.state === 'listening'")
        count = await page.evaluate(f"{listening}.length")
        await page.click("#interrupt")
        await page.wait_for_function(arrow(f"{listening}.length > {count}"), timeout=30000)

        # the same controls in Chinese
        await page.select_option("#lang", "zh")
        assert await page.get_attribute("#pause", "aria-label") == "暂停通话"
        assert "提示词" in (await page.text_content("#call-setup") or "")
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "browser-call-controls.png"), full_page=True)
        await page.click("#stop")
        await page.wait_for_function(arrow("window.callState.sessionId === null"), timeout=10000)
        assert await page.is_hidden("#in-call")
        # the recording replays the spoken turn from its play button, where the turn began
        await page.goto(f"{url}/history#{session_id}")
        turn = page.locator("#player-transcript li.user")
        await turn.first.wait_for(timeout=10000)
        await page.wait_for_function(arrow("document.getElementById('player-audio').duration > 0"))
        start = float(await turn.first.get_attribute("data-t") or "nan")
        await turn.first.locator("button.play").click()
        await page.wait_for_function(arrow("!document.getElementById('player-audio').paused"))
        played_from = await page.evaluate("document.getElementById('player-audio').currentTime")
        assert start - 0.1 <= played_from <= start + 1.5, (start, played_from)
    assert not [e for e in console_errors if "favicon" not in e], console_errors


# The browser's devices, as a page sees them: no camera at all, or a user who denied the permission.
NO_CAMERA = """
const real = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
navigator.mediaDevices.getUserMedia = (c) =>
  c && c.video ? Promise.reject(new DOMException("Requested device not found", "NotFoundError")) : real(c);
"""
DENIED = """
navigator.mediaDevices.getUserMedia = () =>
  Promise.reject(new DOMException("Permission denied", "NotAllowedError"));
"""


async def test_device_problems_say_what_to_do(start_test_server, fake_mic: Path) -> None:
    server = await start_test_server()
    url = server.url.replace("localhost", "127.0.0.1")
    async with chromium(fake_mic) as browser:
        # a video call on a machine without a camera goes on as an audio call, and says so
        page = await browser.new_page()
        await page.add_init_script(NO_CAMERA)
        await page.goto(f"{url}/call.html?mode=omni_duplex&autostart=1")
        await wait_event(page, "session", "e.phase === 'active' && e.mode === 'audio_duplex'", timeout=60000)
        assert "No camera is available" in (await page.text_content("#transcript") or "")
        assert await page.input_value("#mode") == "audio_duplex"
        await page.click("#stop")
        await page.close()
        # a denied microphone: how to allow it, in the user's language
        for lang, title, how in (
            ("en", "The browser blocked the microphone", "address bar"),
            ("zh", "浏览器禁止了麦克风", "地址栏"),
        ):
            page = await browser.new_page()
            await page.add_init_script(DENIED)
            await page.add_init_script(f"localStorage.setItem('minicpmo.lang', {json.dumps(lang)})")
            await page.goto(f"{url}/call.html?mode=chat&autostart=1")
            await page.wait_for_selector("#call-error")
            text = await page.text_content("#call-error") or ""
            assert title in text and how in text, text
            assert await page.is_visible("#start") and await page.is_hidden("#stop")
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / f"browser-mic-denied-{lang}.png"))
            await page.close()
    assert not server.manager.sessions


async def test_where_calls_start_and_how_they_end(start_test_server, fake_mic: Path) -> None:
    """Home's Start starts the call (no second click); "Call" in the menu opens the last mode used (an audio
    call on a fresh browser, not the microphone test); a call the server ends offers "Start call" only."""
    server = await start_test_server(session={"pause_timeout_s": 1.0})
    url = server.url.replace("localhost", "127.0.0.1")
    async with chromium(fake_mic) as browser:
        page = await browser.new_page()
        await page.goto(f"{url}/call")
        assert await page.input_value("#mode") == "audio_duplex"
        await page.goto(f"{url}/")
        await page.click("article[data-mode='loopback'] a.button")
        await wait_event(page, "session", "e.phase === 'active' && e.mode === 'loopback'")
        # the server ends the call (a pause that is never resumed)
        await page.click("#pause")
        await wait_event(page, "error", "e.code === 'pause_timeout'")
        await page.wait_for_function(arrow("window.callState.status === 'ended'"), timeout=15000)
        assert await page.is_visible("#start") and await page.is_hidden("#reconnect")
        await page.goto(f"{url}/call")
        assert await page.input_value("#mode") == "loopback"


async def test_voice_library(
    start_test_server, fake_mic: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Upload a clip (named after its file), preview it, rename it, use it, delete it; a call with the
    deleted voice gets the default voice and says so in the page's language."""
    server = await start_test_server(voices={"dir": str(tmp_path / "voices")})
    url = server.url.replace("localhost", "127.0.0.1")
    clip = tmp_path / "Aunt May.wav"
    clip.write_bytes(fake_mic.read_bytes())
    async with chromium(fake_mic) as browser:
        page = await browser.new_page()
        await page.goto(f"{url}/settings")
        await page.set_input_files("#voice-file", str(clip))
        row = page.locator("#voice-list li", has_text="Aunt May")
        await row.wait_for(timeout=15000)
        voice_id = await row.get_attribute("data-voice")
        assert voice_id and await row.locator("button.use").get_attribute("aria-pressed") == "true"
        assert "Aunt May" in (await page.text_content("#voice-current") or "")
        # the preview plays the stored clip (16 kHz), as long as the upload
        await row.locator("button.play").click()
        await page.wait_for_function(arrow("window.voicePreview && window.voicePreview.duration > 0"))
        duration = await page.evaluate("window.voicePreview.duration")
        listed = {
            v["voice_id"]: v for v in (await (await page.request.get(f"{url}/api/voices")).json())["voices"]
        }
        assert abs(duration - listed[voice_id]["duration_s"]) < 0.05, (duration, listed)
        # a voice someone else uploaded can be used and played here, not renamed or deleted
        async with aiohttp.ClientSession() as http:
            other_wav = (await (await page.request.get(f"{url}/api/voices/{voice_id}")).body())[:-3200]
            async with http.post(
                f"{server.url}/api/voices?name=Other",
                data=other_wav,
                headers={"Content-Type": "audio/wav"},
            ) as resp:
                assert resp.status == 201, await resp.text()
        await page.reload()
        theirs = page.locator("#voice-list li", has_text="Other")
        await theirs.wait_for()
        assert await theirs.locator("button.play").count() == 1
        assert await theirs.locator("button.rename, button.delete").count() == 0
        row = page.locator("#voice-list li", has_text="Aunt May")
        # rename (the browser's prompt), then the default voice is chosen again
        page.once("dialog", lambda d: asyncio.ensure_future(d.accept("Aunt May (kitchen)")))
        await row.locator("button.rename").click()
        await page.locator("#voice-list li", has_text="kitchen").wait_for()
        await page.click("#voice-list li[data-voice='default'] button.use")
        assert (await page.text_content("#voice-current") or "").startswith("Default")
        # a preset may come with a voice of the library: choosing it picks that voice too
        from rtc_server import presets

        spoken = presets.Preset(
            id="chat_aunt",
            mode="chat",
            lang="en",
            name={"en": "Aunt's chat", "zh": "阿姨"},
            system_prompt="Hi.",
            voice=voice_id,
        )
        monkeypatch.setattr(presets, "PRESETS", (*presets.PRESETS, spoken))
        await page.reload()
        await page.wait_for_function(arrow("document.querySelector('#preset').options.length > 3"))
        await page.locator("#voice-list li[data-voice='default'] button.use[aria-pressed='true']").wait_for()
        await page.select_option("#preset", "chat_aunt")
        await page.locator(
            f"#voice-list li[data-voice='{voice_id}'] button.use[aria-pressed='true']"
        ).wait_for()
        # the voice goes from the server behind the page's back: the call still starts, with the default
        # voice, and says so (in Chinese here)
        async with (
            aiohttp.ClientSession() as http,
            http.delete(f"{server.url}/api/voices/{voice_id}") as resp,
        ):
            assert resp.status == 204
        await page.evaluate("localStorage.setItem('minicpmo.lang', 'zh')")
        await page.goto(f"{url}/call.html?mode=loopback&autostart=1")
        await wait_event(page, "error", "e.code === 'unknown_voice'")
        assert "默认音色" in (await page.text_content("#transcript") or "")
        await wait_event(page, "session", "e.phase === 'active'")
        await page.click("#stop")
        # back on the settings page the library no longer lists it, and the default voice is in use
        await page.goto(f"{url}/settings")
        await page.locator("#voice-list li[data-voice='default'] button.use[aria-pressed='true']").wait_for()
        assert await page.locator(f"#voice-list li[data-voice='{voice_id}']").count() == 0
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "browser-voice-library-zh.png"), full_page=True)


async def test_a_recorded_call_replays_from_history(start_test_server, fake_mic: Path) -> None:
    """A call says it is recorded; afterwards History lists it, replays it (the audio element's duration is
    the recording's), shows its transcript, and deletes it; in both languages."""
    server = await start_test_server()
    url = server.url.replace("localhost", "127.0.0.1")
    async with chromium(fake_mic) as browser:
        page = await browser.new_page()
        await page.goto(f"{url}/call.html?mode=loopback&autostart=1")
        await wait_event(page, "session", "e.phase === 'active' && e.recording === true")
        assert await page.is_visible("#rec-badge")
        session_id = await page.evaluate("window.callState.sessionId")
        await page.wait_for_timeout(4000)
        await page.click("#stop")
        await page.wait_for_function(arrow("window.callState.sessionId === null"))
        await page.goto(f"{url}/history")
        row = page.locator(f"#recordings li[data-recording='{session_id}']")
        await row.wait_for(timeout=10000)
        await row.locator("button.open").click()
        await page.wait_for_function(
            arrow("document.getElementById('player-audio').duration > 0"), timeout=10000
        )
        duration = await page.evaluate("document.getElementById('player-audio').duration")
        info = await (await page.request.get(f"{url}/api/recordings/{session_id}")).json()
        assert abs(duration - info["duration_s"]) < 0.1, (duration, info["duration_s"])
        title = await page.text_content("#player-title") or ""
        assert title.startswith("Microphone test"), title  # the mode's name, not its id
        assert await page.locator("#player-transcript li").count() >= 1  # "Connected: microphone test"
        await page.evaluate("document.getElementById('player-audio').play()")
        await page.wait_for_function(arrow("document.getElementById('player-audio').currentTime > 0.5"))
        assert page.url.endswith(f"#{session_id}")  # the page's own link to this recording
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "browser-history-en.png"), full_page=True)
        await page.select_option("#lang", "zh")
        assert await page.text_content("h1") == "最近的通话"
        await page.screenshot(path=str(ARTIFACTS / "browser-history-zh.png"), full_page=True)
        page.once("dialog", lambda d: asyncio.ensure_future(d.accept()))
        await page.click("#player-delete")
        gone = f"!document.querySelector('#recordings li[data-recording=\"{session_id}\"]')"
        await page.wait_for_function(arrow(gone))
        assert (await page.request.get(f"{url}/api/recordings/{session_id}")).status == 404


async def test_the_admin_ends_a_call_and_drops_a_queued_caller(start_test_server, fake_mic: Path) -> None:
    server = await start_test_server(workers={"cpu_capacity": 1}, auth={"admin_token": "adm"})
    url = server.url.replace("localhost", "127.0.0.1")
    async with chromium(fake_mic) as browser:
        first, second = await browser.new_page(), await browser.new_page()
        await first.goto(f"{url}/call.html?mode=loopback&autostart=1")
        await wait_event(first, "session", "e.phase === 'active'")
        await second.goto(f"{url}/call.html?mode=loopback&autostart=1")
        await wait_event(second, "queue")
        admin = await browser.new_page()
        await admin.goto(f"{url}/admin")
        await admin.fill("#admin-token", "adm")
        await admin.click("#token-form button[type=submit]")
        await admin.locator("#queue button.end").wait_for()
        await admin.click("#queue button.end")  # "Remove from queue"
        await second.wait_for_function(arrow("window.callState.status === 'ended'"), timeout=15000)
        await admin.locator("#sessions button.end", has_text="End call").click()
        await first.wait_for_function(arrow("window.callState.status === 'ended'"), timeout=15000)
        assert not server.manager.sessions
