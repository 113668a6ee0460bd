"""Duplex units' camera frames through the vision tower: sliced on the host, encoded on the device.

A tick's prefill encodes the frames of its omni units (`DuplexBatcher.prefill`), unless a frame was encoded
before its unit came (`DuplexBatcher.encode_frames`: the worker encodes a unit's frame as soon as the server
sends it, ahead of the unit's audio, while the device would otherwise idle between the tick phases). Either way
a session's frames become one `EncodedFrames`, and the same views give the same rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..processor.image import ImageInputs
from .core import Engine
from .static_vision import StaticVision

Sliced = Callable[[], list[list[ImageInputs]]]  # waits for the host's slicing of each session's frames


@dataclass
class EncodedFrames:
    """One unit's frames through the vision tower: per frame its number of views (the first is the overview,
    the rest its HD slices), and every view's resampled rows `[sum(views), query_num, D]` in that order."""

    views: list[int]
    rows: torch.Tensor


class UnitFrames:
    def __init__(self, engine: Engine, vision: StaticVision | None, pool: ThreadPoolExecutor) -> None:
        """`vision`: the tower as graphs (a GPU), else None: the model's eager path. `pool`: the host threads
        that slice the images."""
        self.engine = engine
        self.vision = vision
        self.pool = pool

    def slice(self, frames: Sequence[tuple[Sequence[Image.Image], int]]) -> Sliced:
        """Start slicing each session's frames (frames, max slices) on the host pool; the returned call waits for
        them. The caller computes something else meanwhile (the prefill: the streaming mel)."""
        images = self.engine.images
        jobs = self.pool.map(
            lambda job: [images.preprocess(f, job[1], normalized=False) for f in job[0]], frames
        )
        return lambda: list(jobs)

    def encode(self, sliced: Sequence[list[ImageInputs]]) -> list[EncodedFrames]:
        """Every session's sliced frames through the tower in one call (uint8 views, normalised on the device)."""
        views: list[torch.Tensor] = []
        sizes: list[np.ndarray] = []
        counts: list[list[int]] = []
        for images in sliced:
            counts.append([len(out.pixel_values) for out in images])
            for out in images:
                views += [torch.from_numpy(v) for v in out.pixel_values]
                sizes.append(out.tgt_sizes)
        if not views:
            empty = torch.empty(0, device=self.engine.model.device)
            return [EncodedFrames(c, empty) for c in counts]
        config = self.engine.images.config
        norm = (config.norm_mean, config.norm_std)
        grids = np.concatenate(sizes)
        if self.vision is not None:
            rows = self.vision.embeds(views, grids, norm)
        else:
            rows = self.engine.model.vision_embeds(views, torch.from_numpy(grids), norm)
        out, at = [], 0
        for c in counts:
            out.append(EncodedFrames(c, rows[at : at + sum(c)]))
            at += sum(c)
        return out
