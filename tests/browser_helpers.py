"""Debian's Chromium for the browser tests: its path, the required flags, and a fake microphone WAV."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from playwright.async_api import Browser, async_playwright

from MiniCPMO45.audio.wav import write_wav
from tests.rtc_client import RATE, speech_signal

CHROMIUM = "/usr/bin/chromium"


def require_chromium() -> None:
    """A missing browser is a failure (scripts/test.sh installs it), never a skip."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing (scripts/test.sh installs Debian's chromium)")


def chromium_args(fake_mic: Path) -> list[str]:
    """Headless, fake camera and microphone (the mic plays `fake_mic`), no background network traffic."""
    return [
        "--headless",
        "--no-sandbox",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={fake_mic}",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--autoplay-policy=no-user-gesture-required",
    ]


def make_fake_mic(folder: Path) -> Path:
    """A speech-like WAV in `folder` for Chromium's fake microphone."""
    wav = folder / "mic.wav"
    write_wav(wav, speech_signal(folder / "speech.wav"), RATE)
    return wav


def arrow(expression: str) -> str:
    """A JS expression as a predicate function for `wait_for_function`: Playwright evaluates a bare expression
    string with `eval`, which the pages' Content-Security-Policy forbids (as it should)."""
    return f"() => ({expression})"


@asynccontextmanager
async def chromium(fake_mic: Path) -> AsyncIterator[Browser]:
    """Headless Chromium with the fake devices (`chromium_args`), closed on the way out."""
    require_chromium()
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=chromium_args(fake_mic))
        try:
            yield browser
        finally:
            await browser.close()
