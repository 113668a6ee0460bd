"""Load audio files as 16 kHz mono float32.

WAV files (PCM 8/16/24/32-bit integer or 32/64-bit float, plain or WAVE_FORMAT_EXTENSIBLE) are parsed directly so
float data round-trips bit-exactly; any other container, or another sample rate, goes through PyAV.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

TARGET_RATE = 16000
_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE


class AudioFileError(ValueError):
    """An audio file that cannot be read."""


def parse_wav(data: bytes) -> tuple[np.ndarray, int] | None:
    """(samples [frames, channels] float32, rate) for a WAV we understand, else None."""
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


def resample(samples: np.ndarray, from_rate: int, to_rate: int = TARGET_RATE) -> np.ndarray:
    """Resample mono float32 audio with PyAV (libswresample)."""
    samples = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
    if from_rate == to_rate:
        return samples
    import av  # PyAV only when a resample is needed: GPU workers that get 16 kHz audio never import it

    resampler = av.AudioResampler(format="flt", layout="mono", rate=to_rate)
    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="flt", layout="mono")
    frame.sample_rate = from_rate
    out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def _decode_with_av(path: Path, to_rate: int) -> np.ndarray:
    import av

    try:
        container = av.open(str(path))
    except av.error.FFmpegError as exc:
        raise AudioFileError(f"cannot open audio file {path}: {exc}") from exc
    with container:
        if not container.streams.audio:
            raise AudioFileError(f"{path} has no audio stream")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=to_rate)
        parts: list[np.ndarray] = []
        for frame in container.decode(audio=0):
            parts += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        parts += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


def load_audio(path: str | Path, sample_rate: int = TARGET_RATE) -> np.ndarray:
    """Read an audio file as mono float32 at `sample_rate` (channels are averaged)."""
    path = Path(path)
    if not path.is_file():
        raise AudioFileError(f"audio file {path} does not exist")
    parsed = parse_wav(path.read_bytes())
    if parsed is None:
        return _decode_with_av(path, sample_rate)
    frames, rate = parsed
    mono = frames.mean(axis=1, dtype=np.float32) if frames.shape[1] > 1 else frames[:, 0].copy()
    return resample(mono, rate, sample_rate)
