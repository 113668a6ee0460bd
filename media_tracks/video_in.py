"""Inbound video: keep only the newest decoded frame of an aiortc video track.

The reader overwrites one reference per decoded frame, so stale frames are dropped as soon as a newer
one exists and the remote track's queue never grows. Conversion to RGB happens only when a snapshot is
taken (once per model unit in omni mode), with PyAV's scaler.
"""

from __future__ import annotations

import asyncio
import time

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from .reader import TrackReader


def fit_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """The size that keeps the aspect ratio with the longer side at most `max_side` (never upscales)."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


class LatestVideoFrame(TrackReader):
    """Holds the newest `av.VideoFrame` of a video track; converts to RGB lazily on `snapshot_rgb`."""

    task_name = "latest-video-frame"

    def __init__(self, track: MediaStreamTrack) -> None:
        super().__init__()
        if track.kind != "video":
            raise ValueError(f"LatestVideoFrame needs a video track, got kind {track.kind!r}")
        self.track = track
        self.frames_in = 0
        self.ended = False
        self.received_at: float | None = None  # time.monotonic() of the newest frame
        self._latest: av.VideoFrame | None = None
        # (frame, max_side, rgb) of the last conversion
        self._cache: tuple[av.VideoFrame, int | None, np.ndarray] | None = None

    @property
    def latest(self) -> av.VideoFrame | None:
        return self._latest

    async def _run(self) -> None:
        try:
            while True:
                frame = await self.track.recv()
                self.frames_in += 1
                self.received_at = time.monotonic()
                self._latest = frame
        except MediaStreamError:
            self.ended = True

    async def stop(self) -> None:
        """Stop reading and let go of the frames now (with their decoder and scaler buffers)."""
        await super().stop()
        self._latest = None
        self._cache = None

    def snapshot_rgb(self, max_side: int | None = None) -> np.ndarray | None:
        """The newest frame as HxWx3 uint8 RGB (longer side ≤ max_side), or None before the first frame.

        Repeated calls for the same frame and size return the same (read-only) array without converting
        again. A 720p conversion takes a few ms; use `snapshot_rgb_async` to keep it off the event loop.
        """
        if max_side is not None and (isinstance(max_side, bool) or int(max_side) != max_side or max_side < 1):
            raise ValueError(f"max_side must be a positive int or None, got {max_side!r}")
        frame = self._latest
        if frame is None:
            return None
        cached = self._cache
        if cached is not None and cached[0] is frame and cached[1] == max_side:
            return cached[2]
        rgb = frame_to_rgb(frame, max_side)
        rgb.setflags(write=False)
        self._cache = (frame, max_side, rgb)
        return rgb

    async def snapshot_rgb_async(self, max_side: int | None = None) -> np.ndarray | None:
        """`snapshot_rgb` run in the default executor."""
        return await asyncio.get_running_loop().run_in_executor(None, self.snapshot_rgb, max_side)


def frame_to_rgb(frame: av.VideoFrame, max_side: int | None = None) -> np.ndarray:
    """Convert (and downscale if needed) a PyAV video frame to an HxWx3 uint8 RGB array."""
    width, height = fit_size(frame.width, frame.height, max_side)
    resized = (width, height) != (frame.width, frame.height)
    # One scaler thread: by default every converted frame keeps a pool of one idle thread per core alive.
    rgb = frame.reformat(
        width=width, height=height, format="rgb24", interpolation="AREA" if resized else None, threads=1
    )
    return rgb.to_ndarray()
