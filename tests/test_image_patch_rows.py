"""The fused patch-row preprocessing equals the plain broadcast form bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from MiniCPMO45.processor.image import normalize, normalize_on_device, to_patch_rows, view_to_patch_rows

MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def _plain(view: Image.Image, mean: list[float], std: list[float], patch: int) -> np.ndarray:
    pixels = np.asarray(view.convert("RGB"), dtype=np.float32) / 255.0
    pixels = (pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    chw = pixels.transpose(2, 0, 1)
    c, h, w = chw.shape
    grid = chw.reshape(c, h // patch, patch, w // patch, patch).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(grid.reshape(c, patch, -1))


@pytest.mark.parametrize(("size", "mode"), [((448, 448), "RGB"), ((518, 392), "RGB"), ((70, 42), "RGBA")])
def test_view_to_patch_rows_is_bit_identical(size: tuple[int, int], mode: str) -> None:
    rng = np.random.default_rng(0)
    view = Image.fromarray(rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8), mode)
    want = _plain(view, MEAN, STD, 14)
    got = view_to_patch_rows(view, MEAN, STD, 14)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    assert got.shape == (3, 14, size[0] * size[1] // 14)
    assert np.array_equal(got, want)
    assert np.array_equal(to_patch_rows(normalize(view, MEAN, STD), 14), want)


def test_bad_sizes_are_rejected() -> None:
    view = Image.new("RGB", (30, 28))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        view_to_patch_rows(view, MEAN, STD, 14)


@pytest.mark.parametrize(("size", "mode"), [((448, 448), "RGB"), ((70, 42), "RGBA")])
def test_uint8_patch_rows_normalised_on_the_device_are_bit_identical(
    size: tuple[int, int], mode: str
) -> None:
    """The batcher's frames: uint8 patch rows from the host, normalised where the model runs."""
    rng = np.random.default_rng(1)
    view = Image.fromarray(rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8), mode)
    raw = view_to_patch_rows(view, MEAN, STD, 14, normalized=False)
    assert raw.dtype == np.uint8 and raw.flags.c_contiguous
    got = normalize_on_device(torch.from_numpy(raw)[None], MEAN, STD)[0]
    assert torch.equal(got, torch.from_numpy(view_to_patch_rows(view, MEAN, STD, 14)))
