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


@pytest.mark.parametrize(
    ("mode", "size"),
    [
        ("frame_probe", (48, 64)),
        ("frame_fit_probe", (84, 112)),
    ],  # a longest side of 64; the model's 100² size
)
async def test_frames_reach_a_mode_that_asks_for_them(
    start_test_server, monkeypatch: pytest.MonkeyPatch, mode: str, size: tuple[int, int]
) -> None:
    monkeypatch.setenv("MINICPMO45_EXTRA_MODES", "tests.probe_modes")
    server = await start_test_server()
    t = np.arange(RATE * 5) / RATE
    call = Call(server.url, (0.2 * np.sin(2 * np.pi * 200 * t)).astype(np.float32))
    call.pc.addTrack(SolidColourTrack((200, 30, 40)))
    try:
        await call.start_json(mode)
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
        assert (h, w) == size  # 240x320 scaled as the mode asked
        assert r > 150 and g < 80 and b < 90, texts[-1]  # the caller's colour (after VP8 and YUV)
        assert mode in server.manager.known_modes()
        await call.hang_up()
    finally:
        await call.close()


async def test_a_units_frame_is_converted_before_the_unit_ends(
    start_test_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The units of a tick phase end together, and each one's camera frame must be converted (a few ms of a
    core each): done after the unit's end, the conversions hold the units up and make the phase's tick wait.
    Each unit's frame is converted ahead of the unit's end instead, so even a slow conversion (80 ms here) adds
    nothing to the hand-off of the units after the first, and the frame is still the caller's."""
    from media_tracks import LatestVideoFrame

    monkeypatch.setenv("MINICPMO45_EXTRA_MODES", "tests.probe_modes")
    server = await start_test_server()
    snapshot = LatestVideoFrame.snapshot_rgb

    def slow(self: LatestVideoFrame, max_side: int | None = None, fit: object = None) -> np.ndarray | None:
        time.sleep(0.08)  # in the executor
        return snapshot(self, max_side, fit)  # type: ignore[arg-type]

    monkeypatch.setattr(LatestVideoFrame, "snapshot_rgb", slow)
    t = np.arange(RATE * 6) / RATE
    call = Call(server.url, (0.2 * np.sin(2 * np.pi * 200 * t)).astype(np.float32))
    call.pc.addTrack(SolidColourTrack((30, 200, 40)))
    try:
        await call.start_json("frame_probe")
        await call.wait_connected()
        deadline = time.monotonic() + 15
        while len([e for e in call.events if e["type"] == "metrics"]) < 10 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        handoffs = [e["handoff_ms"] for e in call.events if e["type"] == "metrics"][2:]
        assert len(handoffs) >= 6, call.events
        assert float(np.median(handoffs)) < 40, handoffs
        texts = [e["text"] for e in call.events if e["type"] == "text" and "frame " in e["text"]]
        match = re.search(r"rgb \[(\d+), (\d+), (\d+)\]", texts[-1])
        assert match, texts[-1]
        r, g, b = map(int, match.groups())
        assert g > 150 and r < 80 and b < 90, texts[-1]
    finally:
        await call.close()
