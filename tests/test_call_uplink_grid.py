"""A call's units reach the worker on their tick phase's grid: a unit that ends well before its grid line (audio
that ran ahead of the reckoning made when the mode opened) is held until that line, and its audio is unchanged."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inference import protocol as p
from media_tracks import AudioUnit
from rtc_server.call_uplink import HOLD_EARLY_MS, CallUplink

FRAME = 320  # 20 ms at 16 kHz


@dataclass
class Supervisor:
    sent: list[tuple[float, p.Unit, bytes]] = field(default_factory=list)

    def send(self, worker_id: int, message: p.Unit, payload: bytes = b"") -> bool:
        self.sent.append((time.monotonic(), message, payload))
        return True


@dataclass
class Manager:
    supervisor: Supervisor = field(default_factory=Supervisor)
    stats: Any = field(default_factory=lambda: type("Stats", (), {"units_sent": 0})())


@dataclass
class GridCall:
    """The parts of a call that `CallUplink` reads when it routes a unit."""

    unit_grid: p.UnitGrid | None
    id: str = "c"
    manager: Manager = field(default_factory=Manager)
    worker_id: int | None = 0
    recorder: None = None
    phase: str = "active"
    mode_open: bool = True
    paused: bool = False


async def test_an_early_unit_is_held_until_its_grid_line() -> None:
    unit_s = 0.2
    now = time.monotonic()
    grid = p.UnitGrid(unit_s=unit_s, offset_s=0.0)
    call = GridCall(unit_grid=grid)
    uplink = CallUplink(call)  # type: ignore[arg-type]
    line = (int(now / unit_s) + 2) * unit_s  # a grid line ~0.2-0.4 s ahead
    pcm = np.arange(3200, dtype=np.float32)
    early = AudioUnit(0, pcm, line - 0.08)  # ended 80 ms before its line
    await asyncio.sleep(max(0.0, early.completed_at - time.monotonic()))
    uplink._on_unit(early)
    assert call.manager.supervisor.sent == []  # held
    await asyncio.sleep(line + 0.05 - time.monotonic())
    [(sent_at, message, payload)] = call.manager.supervisor.sent
    assert abs(sent_at - line) < 0.03, sent_at - line
    assert message.completed_at == early.completed_at  # it still says when its audio was complete
    assert np.array_equal(p.split_unit_payload(message, payload)[0], pcm)
    assert uplink.units_held == 1
    # late, or only a little early: sent at once
    for offset in (0.03, -(HOLD_EARLY_MS - 5) / 1000):
        await asyncio.sleep(max(0.0, line + unit_s + offset - time.monotonic()))
        uplink._on_unit(AudioUnit(1, pcm, line + unit_s + offset))
        assert time.monotonic() - call.manager.supervisor.sent[-1][0] < 0.01
        line += unit_s
    assert uplink.units_held == 1


async def test_a_unit_held_past_its_calls_end_is_not_sent() -> None:
    now = time.monotonic()
    grid = p.UnitGrid(unit_s=1.0, offset_s=0.0)
    call = GridCall(unit_grid=grid)
    uplink = CallUplink(call)  # type: ignore[arg-type]
    line = float(int(now) + 1)
    uplink._on_unit(AudioUnit(0, np.zeros(16000, np.float32), line - 0.3))  # held until the line
    call.phase = "closing"
    await asyncio.sleep(max(0.0, line - time.monotonic()) + 0.05)
    assert call.manager.supervisor.sent == [] and uplink.units_held == 1
