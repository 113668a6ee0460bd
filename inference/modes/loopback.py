"""`loopback`: the caller hears their own microphone after a fixed delay ("test my mic").

It goes through everything a model mode uses (unit cutter, worker IPC, outbound speech track), so a working
loopback call proves the media path end to end.

Timing: the caller should hear sample s exactly `delay_s` after speaking it. Sample s arrives at the server
after the inbound media latency, and what the server sends is heard after the outbound latency (aiortc's
fixed ~80 ms receive jitter buffer on each side dominates both; `pipeline_latency_s` is their measured sum).
So sample s must start playing at `arrival(s) + delay_s - pipeline_latency_s`.

The arrival timeline comes from the units themselves: unit k ends at sample S_k (the count of samples so far,
which follows the RTP clock because the inbound side fills lost packets with silence) and was stamped
`completed_at` when its last sample arrived, so `completed_at - S_k / 16000` estimates when sample 0 arrived.
A busy event loop or a receive jitter buffer that grew after a lost packet can only make a stamp later,
never earlier, so the estimate used is the minimum over the last `ORIGIN_WINDOW_S` seconds (a window, not
the whole call, so that slow clock drift between caller and server is followed: 100 ppm is 3 ms per 30 s). Each unit
is then scheduled at

    play_at = origin + (S_k - unit_samples) / 16000 + delay_s - pipeline_latency_s

Scheduling against this capture timeline rather than "now" keeps the delay independent of unit size, worker
hand-off time and event-loop stalls. A delay shorter than unit + pipeline latency cannot be honoured; audio
then plays as soon as it can.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from inference import protocol as p
from inference.modes.base import ModeUnit, Output, SessionOptions, SessionSetup
from inference.settings import LoopbackSettings
from MiniCPMO45.audio.rates import MODEL_INPUT_RATE, SPEECH_RATE

ORIGIN_WINDOW_S = 30.0  # long enough to ride out receive-latency jumps, short against clock drift


def upsample_16k_to_24k(pcm: np.ndarray) -> np.ndarray:
    """Linear-interpolation resampling by 3/2 (plenty for a microphone test; cheap, no state)."""
    positions = np.arange(pcm.size * 3 // 2, dtype=np.float64) * (2.0 / 3.0)
    return np.interp(positions, np.arange(pcm.size), pcm).astype(np.float32)


class LoopbackMode:
    name = "loopback"

    def __init__(self, settings: LoopbackSettings) -> None:
        if settings.unit_ms * MODEL_INPUT_RATE % 2000:
            raise ValueError("unit_ms must give an even number of 16 kHz samples")
        self.delay_s = settings.delay_s
        self.unit_samples = settings.unit_ms * MODEL_INPUT_RATE // 1000
        self.pipeline_latency_s = settings.pipeline_latency_s
        self._paused = False
        self._samples = 0  # caller samples received so far (the capture timeline)
        self._origins: deque[tuple[float, float]] = deque()  # (completed_at, implied arrival of sample 0)

    def open(self, options: SessionOptions) -> tuple[SessionSetup, list[Output]]:
        setup = SessionSetup(unit_samples=self.unit_samples, output_rate=SPEECH_RATE)
        return setup, [p.StateOut(state="listening")]

    def on_unit(self, unit: ModeUnit, frame: np.ndarray | None) -> list[Output]:
        start_s = self._samples / MODEL_INPUT_RATE
        self._samples += unit.pcm.size
        origin = self._capture_origin(unit.completed_at, unit.completed_at - self._samples / MODEL_INPUT_RATE)
        if self._paused:
            return []
        play_at = origin + start_s + self.delay_s - self.pipeline_latency_s
        return [p.AudioOut(pcm=upsample_16k_to_24k(unit.pcm), turn=0, play_at=play_at)]

    def _capture_origin(self, now: float, estimate: float) -> float:
        """Server time when sample 0 arrived: the earliest recent estimate (stalls only make them later)."""
        while self._origins and self._origins[0][0] < now - ORIGIN_WINDOW_S:
            self._origins.popleft()
        while self._origins and self._origins[-1][1] >= estimate:
            self._origins.pop()  # a monotonic deque keeps the window minimum at the front
        self._origins.append((now, estimate))
        return self._origins[0][1]

    def on_control(self, message: dict[str, Any]) -> list[Output]:
        kind = message.get("type")
        if kind == "pause":
            self._paused = True
        elif kind == "resume":
            self._paused = False
        elif kind == "text":
            return [p.TextOut(text=str(message.get("text", "")), turn=0)]  # echo typed text, like the audio
        return []

    def close(self) -> None:
        pass
