"""`loopback`: the caller hears their own microphone after a fixed delay ("test my mic").

It goes through everything a model mode uses (unit cutter, worker IPC, outbound speech track), so a working
loopback call proves the media path end to end.

Timing: the caller should hear sample s exactly `delay_s` after speaking it. The server stamps each unit with
`completed_at`, the arrival time of its last sample; the unit's first sample arrived `unit duration` earlier.
Arrival lags the caller's capture by the inbound media latency, and what the server sends is heard after the
outbound latency (aiortc's fixed ~80 ms receive jitter buffer on each side dominates both). So the unit is
scheduled to start playing at

    play_at = completed_at - unit_duration + delay_s - pipeline_latency_s

where `pipeline_latency_s` (config `loopback.pipeline_latency_s`) is the measured inbound + outbound latency.
Scheduling against the capture timeline rather than "now" keeps the delay independent of unit size and of
worker hand-off time. A delay shorter than unit + pipeline latency cannot be honoured; audio then plays as
soon as it can.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from inference.modes.base import Output, SessionOptions, SessionSetup, Speech, State, Text, UnitInput

INPUT_RATE = 16000
OUTPUT_RATE = 24000


def upsample_16k_to_24k(pcm: np.ndarray) -> np.ndarray:
    """Linear-interpolation resampling by 3/2 (plenty for a microphone test; cheap, no state)."""
    positions = np.arange(pcm.size * 3 // 2, dtype=np.float64) * (2.0 / 3.0)
    return np.interp(positions, np.arange(pcm.size), pcm).astype(np.float32)


class LoopbackMode:
    name = "loopback"

    def __init__(self, delay_s: float = 1.0, unit_ms: int = 100, pipeline_latency_s: float = 0.2) -> None:
        if unit_ms * INPUT_RATE % 2000:
            raise ValueError("unit_ms must give an even number of 16 kHz samples")
        self.delay_s = delay_s
        self.unit_samples = unit_ms * INPUT_RATE // 1000
        self.pipeline_latency_s = pipeline_latency_s
        self._paused = False

    def open(self, options: SessionOptions) -> tuple[SessionSetup, list[Output]]:
        setup = SessionSetup(unit_samples=self.unit_samples, output_rate=OUTPUT_RATE)
        return setup, [State("listening")]

    def on_unit(self, unit: UnitInput, frame: np.ndarray | None) -> list[Output]:
        if self._paused:
            return []
        out = upsample_16k_to_24k(unit.pcm)
        unit_s = unit.pcm.size / INPUT_RATE
        play_at = unit.completed_at - unit_s + self.delay_s - self.pipeline_latency_s
        return [Speech(out, turn=0, play_at=play_at)]

    def on_control(self, message: dict[str, Any]) -> list[Output]:
        kind = message.get("type")
        if kind == "pause":
            self._paused = True
        elif kind == "resume":
            self._paused = False
        elif kind == "text":
            return [Text(str(message.get("text", "")), turn=0)]  # echo typed text, like the audio
        return []

    def close(self) -> None:
        pass
