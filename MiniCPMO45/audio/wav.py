"""The one RIFF/WAVE reader and writer (numpy only: the server, the media processes, the workers and the tests
all use it).

The reader parses PCM 8/16/24/32-bit integer and 32/64-bit float data, plain or WAVE_FORMAT_EXTENSIBLE, itself,
so float data round-trips bit-exactly; anything else is left to PyAV (`load.load_audio`). The writer writes
PCM16 (clipped to [-1, 1]).
"""

from __future__ import annotations

import struct
import wave
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .rates import MODEL_INPUT_RATE

_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE


def parse_wav(data: bytes) -> tuple[np.ndarray, int] | None:
    """(samples [frames, channels] float32 in [-1, 1], rate) for a WAV this reader understands, else None."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, fmt, payload = 12, None, None
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        body = data[pos + 8 : pos + 8 + size]
        if cid == b"fmt ":
            fmt = body
        elif cid == b"data":
            payload = body
        pos += 8 + size + (size & 1)
    if fmt is None or payload is None or len(fmt) < 16:
        return None
    tag, channels, rate, _, align, bits = struct.unpack("<HHIIHH", fmt[:16])
    if tag == _EXTENSIBLE and len(fmt) >= 26:
        tag = struct.unpack("<H", fmt[24:26])[0]
    if channels == 0 or align == 0:
        return None
    usable = len(payload) // align * align
    raw = payload[:usable]
    if tag == _FLOAT and bits in (32, 64):
        samples = np.frombuffer(raw, dtype="<f4" if bits == 32 else "<f8").astype(np.float32)
    elif tag == _PCM and bits == 8:
        samples = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif tag == _PCM and bits in (16, 32):
        ints = np.frombuffer(raw, dtype="<i2" if bits == 16 else "<i4")
        samples = (ints / float(2 ** (bits - 1))).astype(np.float32)
    elif tag == _PCM and bits == 24:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        ints = (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8
        samples = (ints / float(2**23)).astype(np.float32)
    else:
        return None
    return samples.reshape(-1, channels), rate


def read_wav(source: str | Path | bytes) -> tuple[np.ndarray, int]:
    """A RIFF/WAVE file (path or bytes) -> (float32 (channels, n) in [-1, 1], sample rate)."""
    data = Path(source).read_bytes() if isinstance(source, str | Path) else bytes(source)
    parsed = parse_wav(data)
    if parsed is None:
        raise ValueError("not a RIFF/WAVE file this reader understands (PCM 8/16/24/32-bit or float)")
    samples, rate = parsed
    return samples.T.copy(), int(rate)


def read_mono(source: str | Path | bytes) -> tuple[np.ndarray, int]:
    """A WAV file as (float32 mono (n,), rate): the channels averaged."""
    channels, rate = read_wav(source)
    mono = channels[0] if channels.shape[0] == 1 else channels.mean(axis=0, dtype=np.float32)
    return np.ascontiguousarray(mono, dtype=np.float32), rate


def pcm16_header(rate: int, frames: int, channels: int = 1) -> bytes:
    """The 44-byte header of a PCM16 RIFF/WAVE file of `frames` frames (a streaming writer rewrites it as the
    file grows)."""
    data = frames * channels * 2
    header = b"RIFF" + struct.pack("<I", 36 + data) + b"WAVE"
    header += b"fmt " + struct.pack(
        "<IHHIIHH", 16, _PCM, channels, rate, rate * channels * 2, channels * 2, 16
    )
    return header + b"data" + struct.pack("<I", data)


def pcm16_wav(samples: np.ndarray, rate: int = MODEL_INPUT_RATE) -> bytes:
    """float samples in [-1, 1], `(n,)` mono or `(n, channels)`, -> a PCM16 RIFF/WAVE file (clipped)."""
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    channels = 1 if pcm.ndim == 1 else pcm.shape[1]
    return pcm16_header(rate, pcm.shape[0], channels) + pcm.tobytes()


def wav_header(source: str | Path | BinaryIO) -> tuple[int, int, int]:
    """(rate, channels, frames) from a WAV file's header, without reading its samples. Raises `wave.Error`,
    `EOFError` or `OSError` for what is not a readable WAV."""
    with wave.open(str(source) if isinstance(source, str | Path) else source) as w:
        return w.getframerate(), w.getnchannels(), w.getnframes()


def write_wav(path: str | Path, samples: np.ndarray, rate: int = MODEL_INPUT_RATE) -> None:
    """`pcm16_wav` into a file (its folder created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pcm16_wav(samples, rate))
