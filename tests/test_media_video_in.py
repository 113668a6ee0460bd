"""LatestVideoFrame and RGB conversion on generated PyAV frames (no network)."""

from __future__ import annotations

import asyncio

import av
import numpy as np
import pytest
from PIL import Image

from media_tracks import LatestVideoFrame, fit_size, frame_to_rgb, model_input_size
from MiniCPMO45.config import PreprocessorConfig
from MiniCPMO45.processor.image import ImageProcessor
from MiniCPMO45.processor.image import fit_size as processor_fit_size
from tests.media_helpers import FramesTrack


def solid_frame(rgb: tuple[int, int, int], width: int, height: int, fmt: str = "yuv420p") -> av.VideoFrame:
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = rgb
    return av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format=fmt)


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [
        ((640, 480), None, (640, 480)),
        ((640, 480), 1000, (640, 480)),  # never upscales
        ((640, 480), 320, (320, 240)),
        ((480, 640), 320, (240, 320)),
        ((1920, 1080), 448, (448, 252)),
        ((3000, 2), 100, (100, 1)),  # a side never reaches zero
    ],
)
def test_fit_size(size: tuple[int, int], max_side: int | None, expected: tuple[int, int]) -> None:
    assert fit_size(*size, max_side) == expected


@pytest.mark.parametrize(
    "size", [(640, 480), (1280, 720), (480, 640), (320, 240), (1920, 1080), (517, 391), (7, 5)]
)
def test_frames_sized_for_the_model_are_taken_as_they_are(size: tuple[int, int]) -> None:
    """`model_input_size` is the size the model's image processor gives an unsliced view of an image of any size
    (448² area, 14-pixel patches), and a frame of that size goes through the processor unresized: the server
    resizes the camera's frame once (as the official demo's server does from the full frame), and the worker
    only cuts it into patches."""
    config = PreprocessorConfig()
    want = model_input_size(*size, config.scale_resolution, config.patch_size)
    assert want == processor_fit_size(size, config.scale_resolution, config.patch_size, allow_upscale=True)
    assert model_input_size(*want, config.scale_resolution, config.patch_size) == want
    frame = frame_to_rgb(solid_frame((10, 200, 60), *size), fit=(config.scale_resolution, config.patch_size))
    assert frame.shape == (want[1], want[0], 3)
    rgb = np.random.default_rng(0).integers(0, 255, frame.shape, dtype=np.uint8)
    out = ImageProcessor(config).preprocess(Image.fromarray(rgb), 1, normalized=False)
    rows, cols = out.tgt_sizes[0]
    assert (cols * config.patch_size, rows * config.patch_size) == want
    # the patch rows are the frame's own pixels: nothing was resampled
    patches = out.pixel_values[0].reshape(3, config.patch_size, rows * cols, config.patch_size)
    first = rgb[: config.patch_size, : config.patch_size].transpose(2, 0, 1)
    assert np.array_equal(patches[:, :, 0, :], first)


def test_frame_to_rgb_converts_and_downscales() -> None:
    frame = solid_frame((10, 200, 60), 1280, 720)
    full = frame_to_rgb(frame)
    assert full.shape == (720, 1280, 3) and full.dtype == np.uint8
    small = frame_to_rgb(frame, max_side=320)
    assert small.shape == (180, 320, 3)
    for image in (full, small):
        assert np.all(np.abs(image.reshape(-1, 3).mean(axis=0) - (10, 200, 60)) < 4)


async def test_only_the_newest_frame_is_kept() -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [solid_frame(c, 64, 48) for c in colours]
    latest = LatestVideoFrame(FramesTrack("video", frames))
    assert latest.snapshot_rgb() is None
    latest.start()
    await asyncio.wait_for(latest.wait_ended(), 5)
    assert latest.ended
    assert latest.frames_in == 3
    assert latest.latest is frames[-1]
    image = latest.snapshot_rgb()
    assert image is not None and image.shape == (48, 64, 3)
    assert np.all(np.abs(image.reshape(-1, 3).mean(axis=0) - (0, 0, 255)) < 4)
    assert latest.snapshot_rgb() is image  # converted once per frame and size
    assert not image.flags.writeable
    small = latest.snapshot_rgb(max_side=32)
    assert small is not None and small.shape == (24, 32, 3)
    await latest.stop()


async def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="video track"):
        LatestVideoFrame(FramesTrack("audio", []))
    latest = LatestVideoFrame(FramesTrack("video", [solid_frame((1, 2, 3), 8, 8)]))
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="max_side"):
            latest.snapshot_rgb(max_side=bad)  # type: ignore[arg-type]
    latest.start()
    with pytest.raises(RuntimeError, match="already started"):
        latest.start()
    await latest.stop()
    await latest.stop()
