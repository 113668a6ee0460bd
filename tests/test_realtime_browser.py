"""OpenAI's own browser SDK (`@openai/agents-realtime`, installed with npm and bundled with esbuild at test time)
in Chromium with a fake microphone, against the test server over WebRTC (`POST /v1/realtime/calls`, the
`oai-events` data channel): the session connects, its `session.update` applies the agent's instructions, a
typed turn gets a response whose speech comes back on the audio track and whose transcript events arrive."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from MiniCPMO45.audio.wav import write_wav
from rtc_server.session import CallSession
from tests.browser_helpers import chromium
from tests.realtime_js_bundle import build_bundle
from tests.rtc_client import RATE

WORKERS = {"heartbeat_timeout_s": 30.0}
INSTRUCTIONS = "You are a test assistant. Answer in three words."
PAGE = '<!doctype html><html><head><script src="/realtime-test.js"></script></head><body></body></html>'


@pytest.fixture(scope="module")
def bundle() -> Path:
    return build_bundle()


async def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}")
        await asyncio.sleep(0.2)


async def test_agents_sdk_webrtc_call(start_test_server: Any, bundle: Path, tmp_path: Path) -> None:
    server = await start_test_server(workers=WORKERS)
    mic = tmp_path / "silence.wav"
    write_wav(mic, np.zeros(RATE * 2, np.float32), RATE)  # a quiet caller: the typed turn is the only turn
    async with chromium(mic) as browser:
        page = await browser.new_page()
        page.on("console", lambda msg: print("browser:", msg.text))
        await page.route(
            server.url + "/realtime-test.html",
            lambda route: route.fulfill(body=PAGE, content_type="text/html"),
        )
        await page.route(
            server.url + "/realtime-test.js",
            lambda route: route.fulfill(path=bundle, content_type="text/javascript"),
        )
        await page.goto(server.url + "/realtime-test.html")
        call_id = await page.evaluate(
            "([url, text]) => window.realtimeTest.connect(url, text)", [server.url, INSTRUCTIONS]
        )
        session = server.manager.get(call_id)
        assert isinstance(session, CallSession) and session.realtime is not None, call_id

        async def types() -> list[str]:
            return await page.evaluate("() => window.realtimeTest.types()")

        await wait_for(lambda: _has(types, "session.updated"), 30, "session.updated")
        seen = await types()
        assert seen[0] == "session.created", seen
        assert session.system_prompt == INSTRUCTIONS  # the agent's instructions reached the model
        assert session.mode == "chat"
        await wait_for(lambda: _truthy(session.mode_open), 180, "the mode opened on the worker")

        await page.evaluate("() => window.realtimeTest.send('Hello, who are you?')")
        await wait_for(lambda: _has(types, "response.done"), 180, "response.done")
        seen = await types()
        for kind in (
            "conversation.item.added",
            "response.created",
            "response.output_item.added",
            "response.output_audio_transcript.delta",
            "response.output_audio_transcript.done",
            "output_audio_buffer.started",
        ):
            assert kind in seen, (kind, seen)
        assert seen.index("response.created") < seen.index("response.output_audio_transcript.delta")
        audio = await wait_for(lambda: _energy(page), 30, "the model's speech on the call's audio track")
        assert audio["energy"] > 0 and audio["samples"] > 0
        await wait_for(lambda: _has(types, "output_audio_buffer.stopped"), 60, "output_audio_buffer.stopped")
        errors = await page.evaluate("() => window.realtimeTest.errors")
        assert errors == [], errors
        await page.evaluate("() => window.realtimeTest.close()")
        await wait_for(
            lambda: _truthy(server.manager.get(call_id) is None), 30, "the call ended with the page's hangup"
        )


async def _has(types: Any, kind: str) -> bool:
    return kind in await types()


async def _truthy(value: bool) -> bool:
    return value


async def _energy(page: Any) -> dict[str, float] | None:
    audio = await page.evaluate("() => window.realtimeTest.inboundAudio()")
    return audio if audio["energy"] > 0 else None
