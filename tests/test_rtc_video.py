"""A mode that asks for camera frames gets the caller's newest frame with each unit; extra modes plug in
through $MINICPMO45_EXTRA_MODES without touching the server."""

from __future__ import annotations

import asyncio
import fractions
import re
import time

import av
import numpy as np
import pytest
from aiortc import MediaStreamTrack

from tests.rtc_client import RATE, Call


class SolidColourTrack(MediaStreamTrack):
    """320x240 frames of one colour at 15 fps."""

    kind = "video"

    def __init__(self, rgb: tuple[int, int, int]) -> None:
        super().__init__()
        self.image = np.zeros((240, 320, 3), dtype=np.uint8)
        self.image[:] = rgb
        self._start: float | None = None
        self._count = 0

    async def recv(self) -> av.VideoFrame:
        if self._start is None:
            self._start = time.monotonic()
        await asyncio.sleep(max(0.0, self._start + self._count / 15 - time.monotonic()))
        frame = av.VideoFrame.from_ndarray(self.image, format="rgb24")
        frame.pts = self._count * 6000
        frame.time_base = fractions.Fraction(1, 90000)
        self._count += 1
        return frame


async def test_frames_reach_a_mode_that_asks_for_them(
    start_test_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MINICPMO45_EXTRA_MODES", "tests.probe_modes")
    server = await start_test_server()
    t = np.arange(RATE * 5) / RATE
    call = Call(server.url, (0.2 * np.sin(2 * np.pi * 200 * t)).astype(np.float32))
    call.pc.addTrack(SolidColourTrack((200, 30, 40)))
    try:
        await call.start_json("frame_probe")
        await call.wait_connected()
        deadline = time.monotonic() + 10
        while True:
            texts = [e["text"] for e in call.events if e["type"] == "text" and "frame " in e["text"]]
            if len(texts) >= 3 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert len(texts) >= 3, [e for e in call.events if e["type"] == "text"]
        match = re.search(r"frame (\d+)x(\d+) rgb \[(\d+), (\d+), (\d+)\]", texts[-1])
        assert match, texts[-1]
        h, w, r, g, b = map(int, match.groups())
        assert (h, w) == (48, 64)  # 240x320 scaled to a longest side of 64
        assert r > 150 and g < 80 and b < 90, texts[-1]  # the caller's colour (after VP8 and YUV)
        assert "frame_probe" in server.manager.known_modes()
        await call.hang_up()
    finally:
        await call.close()
