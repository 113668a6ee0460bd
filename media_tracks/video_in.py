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

from MiniCPMO45.image_sizes import fit_size as model_fit_size

from .reader import TrackReader


def fit_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """The size that keeps the aspect ratio with the longer side at most `max_side` (never upscales)."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def model_input_size(width: int, height: int, resolution: int, multiple: int) -> tuple[int, int]:
    """The size the model's image processor gives an unsliced image (`MiniCPMO45.image_sizes.fit_size`): a frame
    sent at this size is resized once, from the camera's own size, and the processor takes it as it is."""
    return model_fit_size((width, height), resolution, multiple, allow_upscale=True)


def frame_size(width: int, height: int, max_side: int | None, fit: tuple[int, int] | None) -> tuple[int, int]:
    """The size a frame is sent at: the model's input size with `fit` (resolution, multiple), else capped."""
    return model_input_size(width, height, *fit) if fit is not None else fit_size(width, height, max_side)


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
        # (frame, (max_side, fit), rgb) of the last conversion
        self._cache: tuple[av.VideoFrame, tuple[int | None, tuple[int, int] | None], np.ndarray] | None = None

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

    def snapshot_rgb(
        self, max_side: int | None = None, fit: tuple[int, int] | None = None
    ) -> np.ndarray | None:
        """The newest frame as HxWx3 uint8 RGB (longer side ≤ max_side; with `fit`, at the model's input size,
        `model_input_size`), or None before the first frame.

        Repeated calls for the same frame and size return the same (read-only) array without converting
        again. A 720p conversion takes a few ms; use `snapshot_rgb_async` to keep it off the event loop.
        """
        if max_side is not None and (isinstance(max_side, bool) or int(max_side) != max_side or max_side < 1):
            raise ValueError(f"max_side must be a positive int or None, got {max_side!r}")
        frame = self._latest
        if frame is None:
            return None
        cached = self._cache
        if cached is not None and cached[0] is frame and cached[1] == (max_side, fit):
            return cached[2]
        rgb = frame_to_rgb(frame, max_side, fit)
        rgb.setflags(write=False)
        self._cache = (frame, (max_side, fit), rgb)
        return rgb

    async def snapshot_rgb_async(
        self, max_side: int | None = None, fit: tuple[int, int] | None = None
    ) -> np.ndarray | None:
        """`snapshot_rgb` run in the default executor."""
        return await asyncio.get_running_loop().run_in_executor(None, self.snapshot_rgb, max_side, fit)


def frame_to_rgb(
    frame: av.VideoFrame, max_side: int | None = None, fit: tuple[int, int] | None = None
) -> np.ndarray:
    """Convert a PyAV video frame to an HxWx3 uint8 RGB array, downscaled to `max_side`, or with `fit`
    (resolution, multiple) resized to the model's input size (bicubic, as the model's processor resizes)."""
    width, height = frame_size(frame.width, frame.height, max_side, fit)
    resized = (width, height) != (frame.width, frame.height)
    interpolation = ("BICUBIC" if fit is not None else "AREA") if resized else None
    # One scaler thread: by default every converted frame keeps a pool of one idle thread per core alive.
    rgb = frame.reformat(width=width, height=height, format="rgb24", interpolation=interpolation, threads=1)
    return rgb.to_ndarray()
