"""The Realtime API's audio formats on the WebSocket: `audio/pcm` (PCM16 mono 24 kHz, the model's own output
rate) and G.711 `audio/pcmu` (mu-law) / `audio/pcma` (A-law) at 8 kHz (ITU-T G.711, in numpy)."""

from __future__ import annotations

import av
import numpy as np

from MiniCPMO45.audio.rates import G711_RATE, SPEECH_RATE
from MiniCPMO45.audio.resample import AudioResampler

RATES = {"audio/pcm": SPEECH_RATE, "audio/pcmu": G711_RATE, "audio/pcma": G711_RATE}
BYTES_PER_SAMPLE = {"audio/pcm": 2, "audio/pcmu": 1, "audio/pcma": 1}
ULAW_BIAS = 0x84
ULAW_CLIP = 32635


def ulaw_decode(codes: np.ndarray) -> np.ndarray:
    u = ~codes.astype(np.uint8)
    exponent = ((u >> 4) & 0x07).astype(np.int32)
    mantissa = (u & 0x0F).astype(np.int32)
    magnitude = (((mantissa << 3) + ULAW_BIAS) << exponent) - ULAW_BIAS
    return np.where(u & 0x80, -magnitude, magnitude).astype(np.int16)


def ulaw_encode(pcm16: np.ndarray) -> np.ndarray:
    s = (pcm16.astype(np.int32) >> 2) << 2  # G.711 codes 14 bits: the floor, as the reference encoder
    sign = (s < 0).astype(np.int32) << 7
    magnitude = np.minimum(np.abs(s), ULAW_CLIP) + ULAW_BIAS
    exponent = np.clip(np.floor(np.log2(magnitude)).astype(np.int32) - 7, 0, 7)
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8)


def alaw_decode(codes: np.ndarray) -> np.ndarray:
    a = codes.astype(np.uint8) ^ 0x55
    exponent = ((a >> 4) & 0x07).astype(np.int32)
    mantissa = (a & 0x0F).astype(np.int32)
    magnitude = np.where(
        exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0)
    )
    return np.where(a & 0x80, magnitude, -magnitude).astype(np.int16)


def alaw_encode(pcm16: np.ndarray) -> np.ndarray:
    s = pcm16.astype(np.int32)
    sign = np.where(s >= 0, 0x80, 0)
    magnitude = np.where(s >= 0, s, -s - 1)
    magnitude = np.minimum(magnitude, 32767)
    exponent = np.clip(np.floor(np.log2(np.maximum(magnitude, 1))).astype(np.int32) - 7, 0, 7)
    mantissa = np.where(exponent == 0, magnitude >> 4, magnitude >> (exponent + 3)) & 0x0F
    return ((sign | (exponent << 4) | mantissa) ^ 0x55).astype(np.uint8)


def decode(data: bytes, fmt: str) -> np.ndarray:
    """The PCM16 samples of `data` in format `fmt` (at `RATES[fmt]`)."""
    raw = np.frombuffer(data, dtype=np.uint8 if fmt != "audio/pcm" else "<i2")
    if fmt == "audio/pcmu":
        return ulaw_decode(raw)
    if fmt == "audio/pcma":
        return alaw_decode(raw)
    return raw.astype(np.int16)


class OutputEncoder:
    """The model's speech (float32 mono 24 kHz) as bytes of the session's output format."""

    def __init__(self, fmt: str) -> None:
        self.format = fmt
        self.resampler = (
            AudioResampler(format="s16", layout="mono", rate=G711_RATE) if fmt != "audio/pcm" else None
        )

    def __call__(self, pcm: np.ndarray) -> bytes:
        pcm16 = (np.clip(pcm, -1.0, 1.0) * 32767).astype(np.int16)
        if self.resampler is None:
            return pcm16.astype("<i2").tobytes()
        frame = av.AudioFrame.from_ndarray(pcm16.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = SPEECH_RATE
        parts = [f.to_ndarray().reshape(-1) for f in self.resampler.resample(frame)]
        narrow = np.concatenate(parts) if parts else np.zeros(0, np.int16)
        return (ulaw_encode(narrow) if self.format == "audio/pcmu" else alaw_encode(narrow)).tobytes()
