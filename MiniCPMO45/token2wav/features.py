"""Audio features of the voice-prompt front end, computed with torch only (no librosa/torchaudio).

* `flow_prompt_mel`: the 24 kHz, 80-bin natural-log mel the flow uses as prompt condition
  (reflect pad 720, STFT 1920/480/1920 Hann, center False, |X| with +1e-9, Slaney mel 0-8 kHz, ln clamp 1e-5).
* `s3_log_mel`: the 16 kHz, 128-bin Whisper-style log10 mel fed to the S3 speech tokenizer.
* `kaldi_fbank`: Kaldi-compatible 80-bin log mel filterbank (Povey window, pre-emphasis 0.97, DC removal,
  snip_edges, no dither) fed to CAM++ after mean subtraction.
* `resample`: band-limited (Hann-windowed sinc) resampling, the same kernel as torchaudio's default.
* `read_wav`: PCM 16/24/32-bit and float32 RIFF/WAVE files into float32 [-1, 1], channels first.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..processor.audio_io import parse_wav

# ---- mel filter banks ---------------------------------------------------------------------------

_SLANEY_LINEAR_STEP = 200.0 / 3  # Hz per mel below 1 kHz
_SLANEY_BREAK_HZ = 1000.0
_SLANEY_LOG_STEP = math.log(6.4) / 27.0


def hz_to_slaney_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / _SLANEY_LINEAR_STEP
    break_mel = _SLANEY_BREAK_HZ / _SLANEY_LINEAR_STEP
    logarithmic = break_mel + np.log(np.maximum(hz, 1e-10) / _SLANEY_BREAK_HZ) / _SLANEY_LOG_STEP
    return np.where(hz >= _SLANEY_BREAK_HZ, logarithmic, linear)


def slaney_mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    break_mel = _SLANEY_BREAK_HZ / _SLANEY_LINEAR_STEP
    linear = mel * _SLANEY_LINEAR_STEP
    logarithmic = _SLANEY_BREAK_HZ * np.exp(_SLANEY_LOG_STEP * (mel - break_mel))
    return np.where(mel >= break_mel, logarithmic, linear)


@lru_cache(maxsize=8)
def slaney_mel_filters(
    sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None
) -> np.ndarray:
    """Triangular filters on the Slaney mel scale with area normalisation: (n_mels, n_fft//2 + 1) float32.

    This is the filter bank librosa.filters.mel builds with its defaults (htk=False, norm="slaney").
    """
    top = sample_rate / 2 if fmax is None else fmax
    bin_hz = np.arange(n_fft // 2 + 1) * (1.0 / (n_fft * (1.0 / sample_rate)))
    edges_mel = np.linspace(hz_to_slaney_mel(np.array(fmin)), hz_to_slaney_mel(np.array(top)), n_mels + 2)
    edges = slaney_mel_to_hz(edges_mel)
    widths = np.diff(edges)
    offsets = edges[:, None] - bin_hz[None, :]
    # float32 rows, then the float64 area factor (rounded twice, as librosa does)
    bank = np.zeros((n_mels, bin_hz.size), dtype=np.float32)
    for m in range(n_mels):
        rising = -offsets[m] / widths[m]
        falling = offsets[m + 2] / widths[m + 1]
        bank[m] = np.maximum(0.0, np.minimum(rising, falling))
    bank *= (2.0 / (edges[2 : n_mels + 2] - edges[:n_mels]))[:, None]
    return bank


def _kaldi_mel(hz: np.ndarray | float) -> np.ndarray:
    return 1127.0 * np.log(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


@lru_cache(maxsize=8)
def kaldi_mel_banks(
    num_bins: int, padded_window: int, sample_rate: int, low_hz: float, high_hz: float
) -> torch.Tensor:
    """Kaldi's triangular mel banks on the 1127*ln(1+f/700) scale: (num_bins, padded_window//2 + 1).

    Evaluated in float32 like the torch port of Kaldi's fbank; the Nyquist column is zero.
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


# ---- features -----------------------------------------------------------------------------------


def flow_prompt_mel(
    wav_24k: torch.Tensor,
    n_fft: int = 1920,
    hop: int = 480,
    win: int = 1920,
    n_mels: int = 80,
    sample_rate: int = 24000,
    fmin: float = 0.0,
    fmax: float = 8000.0,
) -> torch.Tensor:
    """(n,) or (1, n) float audio at 24 kHz -> (1, frames, 80) natural-log mel, frame-major."""
    y = wav_24k.reshape(1, -1).float()
    pad = (n_fft - hop) // 2
    y = F.pad(y.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    window = torch.hann_window(win, device=y.device)
    spec = torch.stft(y, n_fft, hop, win, window=window, center=False, return_complex=True)
    spec = torch.view_as_real(spec)
    magnitude = torch.sqrt(spec.pow(2).sum(-1) + 1e-9)
    bank = torch.from_numpy(slaney_mel_filters(sample_rate, n_fft, n_mels, fmin, fmax)).to(y.device)
    mel = torch.log(torch.clamp(torch.matmul(bank, magnitude), min=1e-5))
    return mel.transpose(1, 2)


def s3_log_mel(wav_16k: torch.Tensor, n_mels: int = 128) -> torch.Tensor:
    """(n,) float audio at 16 kHz -> (n_mels, frames): Whisper log-mel (n_fft 400, hop 160)."""
    audio = wav_16k.reshape(-1).float()
    window = torch.hann_window(400, device=audio.device)
    stft = torch.stft(audio, 400, 160, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2
    bank = torch.from_numpy(slaney_mel_filters(16000, 400, n_mels, 0.0, None)).to(audio.device)
    log_spec = torch.clamp(bank @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def kaldi_fbank(
    wav_16k: torch.Tensor,
    num_mel_bins: int = 80,
    sample_rate: int = 16000,
    frame_ms: float = 25.0,
    shift_ms: float = 10.0,
    preemphasis: float = 0.97,
    low_hz: float = 20.0,
    high_hz: float = 0.0,
) -> torch.Tensor:
    """(n,) float audio -> (frames, num_mel_bins) log mel power, Kaldi defaults with dither 0."""
    audio = wav_16k.reshape(-1).float()
    length = int(sample_rate * frame_ms / 1000)
    shift = int(sample_rate * shift_ms / 1000)
    if audio.numel() < length:
        raise ValueError(f"audio of {audio.numel()} samples is shorter than one {length}-sample frame")
    frames = audio.unfold(0, length, shift)  # snip_edges: only whole frames
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - preemphasis * previous
    povey = torch.hann_window(length, periodic=False).pow(0.85)
    frames = frames * povey
    padded = 1 << (length - 1).bit_length()
    frames = F.pad(frames, (0, padded - length))
    power = torch.fft.rfft(frames).abs().pow(2.0)
    banks = kaldi_mel_banks(num_mel_bins, padded, sample_rate, low_hz, high_hz).to(power.device)
    energies = power @ banks.T
    return torch.clamp(energies, min=torch.finfo(torch.float32).eps).log()


# ---- resampling and WAV reading -----------------------------------------------------------------


def resample(
    wav: torch.Tensor, orig_sr: int, new_sr: int, width: int = 6, rolloff: float = 0.99
) -> torch.Tensor:
    """(..., n) -> (..., ceil(n * new/orig)) with a Hann-windowed sinc low-pass (`width` zero crossings)."""
    if orig_sr == new_sr:
        return wav
    g = math.gcd(orig_sr, new_sr)
    up, down = new_sr // g, orig_sr // g
    cutoff = min(up, down) * rolloff
    half = math.ceil(width * down / cutoff)
    taps = torch.arange(-half, half + down, dtype=torch.float64) / down
    t = (-torch.arange(up, dtype=torch.float64) / up)[:, None] + taps[None, :]
    t = (t * cutoff).clamp(-width, width)
    window = torch.cos(t * math.pi / width / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t) * window * (cutoff / down)
    kernel = kernel.to(wav.dtype)[:, None, :]

    shape = wav.shape
    x = wav.reshape(-1, 1, shape[-1])
    x = F.pad(x, (half, half + down))
    y = F.conv1d(x, kernel, stride=down)  # (batch, up, steps)
    y = y.transpose(1, 2).reshape(x.shape[0], -1)
    target = math.ceil(up * shape[-1] / down)
    return y[:, :target].reshape(*shape[:-1], target)


def read_wav(source: str | Path | bytes) -> tuple[np.ndarray, int]:
    """A RIFF/WAVE file (path or bytes) -> (float32 (channels, n) in [-1, 1], sample rate)."""
    data = Path(source).read_bytes() if isinstance(source, str | Path) else bytes(source)
    parsed = parse_wav(data)
    if parsed is None:
        raise ValueError("not a RIFF/WAVE file this reader understands (PCM 8/16/24/32-bit or float)")
    samples, rate = parsed
    return samples.T.copy(), int(rate)
