"""Mel scales and mel filter banks: the one Slaney/HTK triangle bank every mel of the project uses (the
processor's Whisper log-mel, the S3 tokenizer's log-mel and the flow's prompt mel), and Kaldi's banks (the
CAM++ speaker network's fbank), which place their triangles on the mel axis instead of the Hz axis.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

MelScale = Literal["slaney", "htk"]

_SLANEY_HZ_PER_MEL = 200.0 / 3.0  # linear part: 3 mels per 200 Hz
_SLANEY_BREAK_HZ = 1000.0  # logarithmic above
_SLANEY_BREAK_MEL = 15.0  # 1 kHz in mels
_SLANEY_LOG_STEP = math.log(6.4) / 27.0  # ln of the frequency ratio per mel above the break


def hz_to_mel(hz: np.ndarray | float, scale: MelScale = "slaney") -> np.ndarray:
    """Frequencies in Hz to mels: Slaney's scale (linear below 1 kHz, logarithmic above) or HTK's
    (2595 log10(1 + f / 700)). float64."""
    hz = np.asarray(hz, dtype=np.float64)
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + hz / 700.0)
    linear = hz / _SLANEY_HZ_PER_MEL
    logarithmic = _SLANEY_BREAK_MEL + np.log(np.maximum(hz, 1e-10) / _SLANEY_BREAK_HZ) / _SLANEY_LOG_STEP
    return np.where(hz >= _SLANEY_BREAK_HZ, logarithmic, linear)


def mel_to_hz(mel: np.ndarray | float, scale: MelScale = "slaney") -> np.ndarray:
    """The inverse of `hz_to_mel`. float64."""
    mel = np.asarray(mel, dtype=np.float64)
    if scale == "htk":
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    linear = mel * _SLANEY_HZ_PER_MEL
    logarithmic = _SLANEY_BREAK_HZ * np.exp(_SLANEY_LOG_STEP * (mel - _SLANEY_BREAK_MEL))
    return np.where(mel >= _SLANEY_BREAK_MEL, logarithmic, linear)


@lru_cache(maxsize=16)
def mel_filter_bank(
    sample_rate: int,
    n_fft: int,
    n_mels: int,
    f_min: float = 0.0,
    f_max: float | None = None,
    scale: MelScale = "slaney",
    slaney_norm: bool = True,
) -> np.ndarray:
    """Triangular mel filters over the `n_fft // 2 + 1` STFT bins: [n_mels, n_fft // 2 + 1] float64 (read-only).

    The filter edges are `n_mels + 2` points evenly spaced on the mel `scale` between `f_min` and `f_max`
    (default: Nyquist); each triangle rises from its lower edge to its centre and falls to its upper edge, in
    Hz. With `slaney_norm` every filter is scaled to the same area (2 / bandwidth in Hz). The defaults are
    librosa's and Whisper's (`htk=False, norm="slaney"`); the callers cast to float32.
    """
    top = sample_rate / 2 if f_max is None else f_max
    bin_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min, scale), hz_to_mel(top, scale), n_mels + 2), scale)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bin_hz[None, :] - lo) / (mid - lo)
    falling = (hi - bin_hz[None, :]) / (hi - mid)
    bank = np.maximum(0.0, np.minimum(rising, falling))
    if slaney_norm:
        bank = bank * (2.0 / (hi - lo))
    bank.flags.writeable = False  # cached: shared by every caller
    return bank


def _kaldi_mel(hz: np.ndarray | float) -> np.ndarray:
    """Kaldi's mel scale, 1127 ln(1 + f / 700) (HTK's scale in natural log)."""
    return 1127.0 * np.log(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


@lru_cache(maxsize=8)
def kaldi_mel_banks(
    num_bins: int, padded_window: int, sample_rate: int, low_hz: float, high_hz: float
) -> torch.Tensor:
    """Kaldi's triangular mel banks, triangles on the 1127 ln(1 + f / 700) axis: (num_bins, padded_window//2 + 1).

    Evaluated in float32 like the torch port of Kaldi's fbank; the Nyquist column is zero. `high_hz <= 0`
    counts down from Nyquist.
    """
    nyquist = sample_rate / 2
    if high_hz <= 0:
        high_hz += nyquist
    n_bins = padded_window // 2
    bin_width = sample_rate / padded_window
    lo = 1127.0 * math.log(1.0 + low_hz / 700.0)
    hi = 1127.0 * math.log(1.0 + high_hz / 700.0)
    delta = (hi - lo) / (num_bins + 1)
    band = torch.arange(num_bins).unsqueeze(1)
    left, centre, right = lo + band * delta, lo + (band + 1) * delta, lo + (band + 2) * delta
    mel = (1127.0 * (1.0 + bin_width * torch.arange(n_bins) / 700.0).log()).unsqueeze(0)
    up = (mel - left) / (centre - left)
    down = (right - mel) / (right - centre)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    return F.pad(banks, (0, 1))
