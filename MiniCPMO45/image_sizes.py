"""The sizes the image processor gives an image's views (`MiniCPMO45.processor.image`), as plain arithmetic: no
torch or PIL, so that the media processes size a camera frame for the model (`media_tracks.video_in`) without
loading either."""

from __future__ import annotations

import math


def snap(length: float, unit: int) -> int:
    """Round to a multiple of `unit` (Python's round-half-to-even, as the official code), at least one unit."""
    return max(round(length / unit) * unit, unit)


def fit_size(
    size: tuple[float, float], scale_resolution: int, patch_size: int, allow_upscale: bool = False
) -> tuple[int, int]:
    """(width, height) with area about scale_resolution², aspect kept, sides snapped to the patch size.

    Images already smaller than scale_resolution² keep their size (only snapped) unless `allow_upscale`.
    """
    width, height = size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        aspect = width / height
        height = int(scale_resolution / math.sqrt(aspect))
        width = int(height * aspect)
    return snap(width, patch_size), snap(height, patch_size)
