"""An omni call's camera frames on their way to the worker: where the mode takes frames ahead
(`Opened.frames_ahead`), the frame of the next unit goes as a `frame_ahead` as soon as it is converted (~150 ms
before the unit ends) and the unit then carries none; a frame that could not go ahead (the link was behind) goes
with its unit. A paced camera track, real PyAV conversion, and the protocol's own encoding of what is sent."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from inference import protocol as p
from media_tracks import AudioUnit, LatestVideoFrame
from rtc_server.call_uplink import FRAME_LEAD_S, CallUplink
from tests.media_helpers import ColourVideoTrack

UNIT = 8000  # 0.5 s units: the test waits for two


@dataclass
class Link:
    """The worker link's `send`: what went, decoded as the worker reads it; `refuse` makes frames ahead fail."""

    refuse: bool = False
    sent: list[tuple[float, p.Message, bytes]] = field(default_factory=list)

    def send(self, worker_id: int, message: p.BaseModel, payload: bytes = b"") -> bool:
        if self.refuse and isinstance(message, p.FrameAhead):
            return False
        raw = p.encode(message, payload)
        header_len = int.from_bytes(raw[:4], "big")
        decoded = p.decode_header(raw[8 : 8 + header_len])
        self.sent.append((time.monotonic(), decoded, raw[8 + header_len :]))
        return True


@dataclass
class Manager:
    supervisor: Link
    stats: Any = field(default_factory=lambda: type("Stats", (), {"units_sent": 0})())


@dataclass
class OmniCall:
    manager: Manager
    unit_grid: p.UnitGrid | None = None
    id: str = "c"
    worker_id: int | None = 0
    recorder: None = None
    phase: str = "active"
    mode_open: bool = True
    paused: bool = False

    def send_event(self, event: Any) -> None:
        raise AssertionError(f"unexpected event {event}")


@pytest.mark.parametrize("refused", [False, True], ids=["ahead", "link-behind"])
async def test_the_next_units_frame_goes_ahead_of_it(refused: bool) -> None:
    link = Link(refuse=refused)
    call = OmniCall(Manager(link))
    uplink = CallUplink(call)  # type: ignore[arg-type]
    uplink.cutter.reset(unit_samples=UNIT)
    uplink.video_max_side, uplink.frames_ahead = 448, True
    uplink.video = LatestVideoFrame(ColourVideoTrack((200, 40, 40)))
    uplink.video.start()
    try:
        while uplink.video.latest is None:
            await asyncio.sleep(0.01)
        pcm = np.zeros(UNIT, dtype=np.float32)
        start = time.monotonic()
        uplink._on_unit(AudioUnit(0, pcm, start))
        await asyncio.sleep(0.5 - 0.05)  # unit 1 ends at start + 0.5 s: its frame was taken 150 ms before
        uplink._on_unit(AudioUnit(1, pcm, time.monotonic()))
        deadline = time.monotonic() + 5
        while len([m for _, m, _ in link.sent if isinstance(m, p.Unit)]) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    finally:
        await uplink.stop()
    units = {m.index: (at, m, payload) for at, m, payload in link.sent if isinstance(m, p.Unit)}
    ahead = [(at, m, payload) for at, m, payload in link.sent if isinstance(m, p.FrameAhead)]
    # unit 0: no unit before it to start its frame early, so it carries its own
    assert units[0][1].frame_shape is not None and not units[0][1].frame_ahead
    at1, unit1, payload1 = units[1]
    if refused:  # the frame went with its unit after all
        assert not ahead and not unit1.frame_ahead
        _, frame = p.split_unit_payload(unit1, payload1)
        assert frame is not None and frame.shape == unit1.frame_shape
        return
    [(at_frame, frame_msg, frame_payload)] = ahead
    assert frame_msg.index == 1 and frame_msg.session_id == "c"
    assert start + 0.5 - FRAME_LEAD_S - 0.01 <= at_frame < at1  # taken ahead of the unit's end, sent first
    rgb = p.frame_ahead_pixels(frame_msg, frame_payload)
    assert rgb.shape[2] == 3 and max(rgb.shape[:2]) <= 448
    assert abs(int(rgb[..., 0].mean()) - 200) < 8  # the camera's colour, converted
    # the unit names it and carries only its PCM
    assert unit1.frame_ahead and unit1.frame_shape is None
    pcm1, frame1 = p.split_unit_payload(unit1, payload1)
    assert frame1 is None and pcm1.size == UNIT
