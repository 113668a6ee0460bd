"""Image slicing and pixel preprocessing for the SigLIP/NaViT encoder (spec §1.3, §2.3).

An image becomes a "source" view (resized to about scale_resolution² pixels, sides multiples of the patch size)
plus, when it is large enough and slicing is allowed, a grid of HD slices cut from a resized copy. Every view
is normalised to [-1, 1] and laid out patch by patch as [3, patch, n_patches * patch], the layout the vision
encoder's patch embedding expects; `tgt_sizes` holds (patch rows, patch cols) per view.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from MiniCPMO45.config import PreprocessorConfig
from MiniCPMO45.image_sizes import fit_size
from MiniCPMO45.image_sizes import snap as _snap


def choose_grid(size: tuple[int, int], max_slices: int, scale_resolution: int) -> tuple[int, int] | None:
    """(cols, rows) of HD slices for an image of `size`, or None when it is not sliced.

    The slice count is about area / scale_resolution² (capped); among the factorisations of that count and its
    neighbours, the grid whose aspect is closest (in log ratio) to the image's wins; ties keep the first found.
    """
    width, height = size
    wanted = min(math.ceil(width * height / (scale_resolution * scale_resolution)), max_slices)
    if wanted <= 1:
        return None
    counts = [n for n in (wanted - 1, wanted, wanted + 1) if n != 1 and n <= max_slices]
    image_log_aspect = math.log(width / height)
    best: tuple[int, int] = (1, 1)
    best_error = math.inf
    for n in counts:
        for cols in range(1, n + 1):
            if n % cols:
                continue
            error = abs(image_log_aspect - math.log(cols / (n // cols)))
            if error < best_error:
                best, best_error = (cols, n // cols), error
    return best


def refine_size(
    size: tuple[int, int], grid: tuple[int, int], scale_resolution: int, patch_size: int
) -> tuple[int, int]:
    """Size of the image the HD slices are cut from: each grid cell about scale_resolution²."""
    cols, rows = grid
    cell = (_snap(size[0], cols) / cols, _snap(size[1], rows) / rows)
    cell_w, cell_h = fit_size(cell, scale_resolution, patch_size, allow_upscale=True)
    return cell_w * cols, cell_h * rows


@dataclass(frozen=True)
class SlicedImage:
    """The views of one image: the source view first, then HD slices row by row."""

    views: list[Image.Image]
    grid: tuple[int, int] | None  # (cols, rows) of HD slices, None when not sliced


def _rgb(image: Image.Image) -> Image.Image:
    """The image in RGB; itself when it already is (PIL's convert would copy it)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def _resized(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Bicubic resize; the image itself at its own size (PIL would return a copy: same pixels)."""
    return image if image.size == tuple(size) else image.resize(size, resample=Image.Resampling.BICUBIC)


def slice_image(
    image: Image.Image, max_slices: int, scale_resolution: int, patch_size: int, slice_mode: bool = True
) -> SlicedImage:
    if not slice_mode:
        return SlicedImage([image], None)
    grid = choose_grid(image.size, max_slices, scale_resolution)
    if grid is None:
        size = fit_size(image.size, scale_resolution, patch_size, allow_upscale=True)
        return SlicedImage([_resized(image, size)], None)
    source = _resized(image, fit_size(image.size, scale_resolution, patch_size))
    refined = _resized(image, refine_size(image.size, grid, scale_resolution, patch_size))
    cols, rows = grid
    cell_w, cell_h = refined.size[0] // cols, refined.size[1] // rows
    views = [source]
    for r in range(rows):
        for c in range(cols):
            views.append(refined.crop((c * cell_w, r * cell_h, (c + 1) * cell_w, (r + 1) * cell_h)))
    return SlicedImage(views, grid)


def normalize(view: Image.Image, mean: list[float], std: list[float]) -> np.ndarray:
    """RGB view -> float32 [3, H, W] in the model's range: (x / 255 - mean) / std."""
    return _normalize_channels(np.asarray(_rgb(view)).transpose(2, 0, 1), mean, std)


def _normalize_channels(chw: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """uint8 [3, ...] (any strides) -> contiguous float32 [3, ...]: (x / 255 - mean) / std per channel.

    One channel-major pass per operation in place; numpy broadcasting over a trailing axis of 3 is several
    times slower. The float32 operations are the same as the broadcast form, so results are bit-identical.
    """
    if chw.shape[0] != len(mean) or chw.shape[0] != len(std):
        raise ValueError(f"{chw.shape[0]} channels but {len(mean)} means and {len(std)} stds")
    out = chw.astype(np.float32, order="C")
    out /= np.float32(255.0)
    for c in range(out.shape[0]):
        out[c] -= np.float32(mean[c])
        out[c] /= np.float32(std[c])
    return out


def to_patch_rows(pixels: np.ndarray, patch_size: int) -> np.ndarray:
    """[3, H, W] -> [3, patch, n_patches * patch]: patches in row-major order, laid side by side."""
    return np.ascontiguousarray(_patch_row_view(pixels, patch_size))


def _patch_row_view(pixels: np.ndarray, patch_size: int) -> np.ndarray:
    channels, height, width = pixels.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"view {width}x{height} is not a multiple of the patch size {patch_size}")
    rows, cols = height // patch_size, width // patch_size
    grid = pixels.reshape(channels, rows, patch_size, cols, patch_size)
    # -> [C, y-in-patch, patch row, patch col, x-in-patch]
    return grid.transpose(0, 2, 1, 3, 4).reshape(channels, patch_size, rows * cols * patch_size)


def view_to_patch_rows(
    view: Image.Image, mean: list[float], std: list[float], patch_size: int, normalized: bool = True
) -> np.ndarray:
    """RGB view -> normalised float32 [3, patch, n_patches * patch], equal to
    `to_patch_rows(normalize(view, mean, std), patch_size)`: the patch layout is taken on the uint8 pixels
    (a cheap byte copy) and normalisation then runs once over the contiguous float32 result. With
    `normalized=False` the uint8 patch rows come back as they are (`normalize_on_device` finishes them).
    """
    chw = np.ascontiguousarray(np.asarray(_rgb(view)).transpose(2, 0, 1))
    if not normalized:
        return np.ascontiguousarray(_patch_row_view(chw, patch_size))
    return _normalize_channels(_patch_row_view(chw, patch_size), mean, std)


def normalize_on_device(pixels: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 [N, 3, ...] -> float32 (x / 255 - mean) / std per channel, where `pixels` lives: the same float32
    operations as `_normalize_channels`, so the values are the same."""
    if pixels.shape[1] != len(mean) or pixels.shape[1] != len(std):
        raise ValueError(f"{pixels.shape[1]} channels but {len(mean)} means and {len(std)} stds")
    m, sd = _channel_constants(tuple(mean), tuple(std), pixels.device)
    shape = (1, len(mean)) + (1,) * (pixels.dim() - 2)
    return (pixels.float() / 255.0 - m.view(shape)) / sd.view(shape)


@functools.cache
def _channel_constants(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel mean and std as float32 tensors on `device`, copied there once: a copy from pageable
    host memory on each frame would make the host wait for the work already queued on the GPU."""
    return (
        torch.tensor(mean, dtype=torch.float32, device=device),
        torch.tensor(std, dtype=torch.float32, device=device),
    )


@dataclass(frozen=True)
class ImageInputs:
    """Encoder inputs for one image: one [3, patch, L*patch] array and one (rows, cols) per view."""

    pixel_values: list[np.ndarray]
    tgt_sizes: np.ndarray  # [n_views, 2] int64
    grid: tuple[int, int] | None
    original_size: tuple[int, int]


class ImageProcessor:
    """Slices, resizes and normalises images the way the official MiniCPM-V image processor does."""

    def __init__(self, config: PreprocessorConfig) -> None:
        self.config = config

    def preprocess(
        self, image: Image.Image, max_slice_nums: int | None = None, normalized: bool = True
    ) -> ImageInputs:
        """Slices and their patch rows; with `normalized=False` as uint8, for `normalize_on_device` (an
        accelerator does that float work faster than the host, and the upload is four times smaller)."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(image).__name__}")
        cfg = self.config
        max_slices = cfg.max_slice_nums if max_slice_nums is None else int(max_slice_nums)
        if max_slices < 1:
            raise ValueError(f"max_slice_nums must be >= 1, got {max_slices}")
        rgb = _rgb(image)
        sliced = slice_image(rgb, max_slices, cfg.scale_resolution, cfg.patch_size, cfg.slice_mode)
        pixel_values, tgt_sizes = [], []
        for view in sliced.views:
            pixel_values.append(
                view_to_patch_rows(view, cfg.norm_mean, cfg.norm_std, cfg.patch_size, normalized)
            )
            tgt_sizes.append((view.size[1] // cfg.patch_size, view.size[0] // cfg.patch_size))
        return ImageInputs(pixel_values, np.array(tgt_sizes, dtype=np.int64), sliced.grid, rgb.size)

    def grid_for(self, size: tuple[int, int], max_slice_nums: int | None = None) -> tuple[int, int] | None:
        cfg = self.config
        if not cfg.slice_mode:
            return None
        max_slices = cfg.max_slice_nums if max_slice_nums is None else int(max_slice_nums)
        return choose_grid(size, max_slices, cfg.scale_resolution)
