"""Still images that callers send with a typed turn (`chat`'s `text` control, the Realtime API's `input_image`):
checked and decoded without torch, so the front process can refuse a bad one before it reaches a worker."""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image

MAX_IMAGE_BYTES = 512 << 10  # a turn's image, encoded (it travels inside a control message)
MAX_IMAGE_SIDE = 4096


def decode_image(data: object) -> Image.Image:
    """A base64 PNG, JPEG or WebP (optionally a `data:` URL) as an RGB image; ValueError if it is not one or is
    too large."""
    if not isinstance(data, str):
        raise ValueError("image must be a base64 string")
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    if len(data) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise ValueError(f"image larger than {MAX_IMAGE_BYTES} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
        image = Image.open(io.BytesIO(raw))
        if image.format not in ("PNG", "JPEG", "WEBP"):
            raise ValueError(f"image format {image.format} (PNG, JPEG or WebP)")
        if max(image.size) > MAX_IMAGE_SIDE:
            raise ValueError(f"image larger than {MAX_IMAGE_SIDE} pixels a side")
        return image.convert("RGB")
    except (binascii.Error, OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not a readable image: {exc}") from exc
