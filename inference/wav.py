"""PCM16 WAV files from float samples. Plain numpy + `wave`: the server and the workers both use it."""

from __future__ import annotations

import io
import wave

import numpy as np


def pcm16_wav(samples: np.ndarray, rate: int = 16000) -> bytes:
    """float samples in [-1, 1], `(n,)` mono or `(n, channels)`, -> a PCM16 RIFF/WAVE file (clipped)."""
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1 if pcm.ndim == 1 else pcm.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()
