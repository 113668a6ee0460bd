"""Test-only worker modes, loaded into worker processes through $MINICPMO45_EXTRA_MODES."""

from __future__ import annotations

from typing import Any

import numpy as np

from inference import protocol as p
from inference.modes import register_mode
from inference.modes.base import ModeUnit, Output, SessionOptions, SessionSetup


class FrameProbeMode:
    """Asks for camera frames with 200 ms units and reports what it got as text events."""

    name = "frame_probe"

    def open(self, options: SessionOptions) -> tuple[SessionSetup, list[Output]]:
        return SessionSetup(unit_samples=3200, video_max_side=64), []

    def on_unit(self, unit: ModeUnit, frame: np.ndarray | None) -> list[Output]:
        if frame is None:
            return [p.TextOut(text=f"unit {unit.index}: no frame", turn=0)]
        mean = frame.reshape(-1, 3).mean(axis=0).round().astype(int).tolist()
        return [
            p.TextOut(text=f"unit {unit.index}: frame {frame.shape[0]}x{frame.shape[1]} rgb {mean}", turn=0)
        ]

    def on_control(self, message: dict[str, Any]) -> list[Output]:
        return []

    def close(self) -> None:
        pass


class FrameFitProbeMode(FrameProbeMode):
    """The same, with its frames at an image model's input size (`video_fit`: area about 100², 14-pixel sides)."""

    name = "frame_fit_probe"

    def open(self, options: SessionOptions) -> tuple[SessionSetup, list[Output]]:
        return SessionSetup(unit_samples=3200, video_max_side=64, video_fit=(100, 14)), []


register_mode("frame_probe", lambda settings: FrameProbeMode())
register_mode("frame_fit_probe", lambda settings: FrameFitProbeMode())
