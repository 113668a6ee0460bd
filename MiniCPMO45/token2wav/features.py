"""Audio features of the voice-prompt front end, computed with torch only (no librosa/torchaudio).

* `flow_prompt_mel`: the 24 kHz, 80-bin natural-log mel the flow uses as prompt condition
  (reflect pad 720, STFT 1920/480/1920 Hann, center False, |X| with +1e-9, Slaney mel 0-8 kHz, ln clamp 1e-5).
* `s3_log_mel`: the 16 kHz, 128-bin Whisper-style log10 mel fed to the S3 speech tokenizer.
* `kaldi_fbank`: Kaldi-compatible 80-bin log mel filterbank (Povey window, pre-emphasis 0.97, DC removal,
  snip_edges, no dither) fed to CAM++ after mean subtraction.

The filter banks are `MiniCPMO45.audio.filterbank`'s; resampling and WAV reading are `MiniCPMO45.audio`'s too.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..audio.filterbank import kaldi_mel_banks, mel_filter_bank
from ..audio.rates import MODEL_INPUT_RATE, SPEECH_RATE

# ---- features -----------------------------------------------------------------------------------


def flow_prompt_mel(
    wav_24k: torch.Tensor,
    n_fft: int = 1920,
    hop: int = 480,
    win: int = 1920,
    n_mels: int = 80,
    sample_rate: int = SPEECH_RATE,
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
    bank = torch.from_numpy(mel_filter_bank(sample_rate, n_fft, n_mels, fmin, fmax).astype(np.float32))
    bank = bank.to(y.device)
    mel = torch.log(torch.clamp(torch.matmul(bank, magnitude), min=1e-5))
    return mel.transpose(1, 2)


def s3_log_mel(wav_16k: torch.Tensor, n_mels: int = 128) -> torch.Tensor:
    """(n,) float audio at 16 kHz -> (n_mels, frames): Whisper log-mel (n_fft 400, hop 160)."""
    audio = wav_16k.reshape(-1).float()
    window = torch.hann_window(400, device=audio.device)
    stft = torch.stft(audio, 400, 160, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2
    bank = torch.from_numpy(mel_filter_bank(MODEL_INPUT_RATE, 400, n_mels).astype(np.float32)).to(
        audio.device
    )
    log_spec = torch.clamp(bank @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def kaldi_fbank(
    wav_16k: torch.Tensor,
    num_mel_bins: int = 80,
    sample_rate: int = MODEL_INPUT_RATE,
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
