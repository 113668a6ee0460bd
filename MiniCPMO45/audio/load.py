"""Audio files of any container as mono float32 at a given rate (chat clips, tests, benches).

WAV files go through the project's own reader (`wav.parse_wav`, bit-exact for float data); any other
container through PyAV. Another sample rate is converted by `resample.resample`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .rates import MODEL_INPUT_RATE
from .resample import resample, to_mono_float
from .wav import parse_wav


class AudioFileError(ValueError):
    """An audio file that cannot be read."""


def _decode_with_av(path: Path, to_rate: int) -> np.ndarray:
    import av

    try:
        container = av.open(str(path))
    except av.error.FFmpegError as exc:
        raise AudioFileError(f"cannot open audio file {path}: {exc}") from exc
    with container:
        if not container.streams.audio:
            raise AudioFileError(f"{path} has no audio stream")
        return to_mono_float(container.decode(audio=0), to_rate)


def load_audio(path: str | Path, sample_rate: int = MODEL_INPUT_RATE) -> np.ndarray:
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
