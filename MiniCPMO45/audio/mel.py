"""Whisper-style log-mel features for the MiniCPM-o 4.5 audio encoder: whole clips, and the transforms the
streaming mel (`mel_stream`, `mel_batch`) shares.

The recipe (spec §1.4): 16 kHz audio, a centred STFT (n_fft 400, hop 160, periodic Hann, reflect padding),
power spectrum, an 80-band Slaney mel filter bank over 0-8 kHz (`filterbank`), log10 of max(mel, 1e-10), the
last frame dropped, a floor, then (x + 4) / 4. The floor is either "dynamic" (max - 8, Whisper's rule) or
"fixed" (-10).

`batch_features` is what the chat processor does for whole clips: pieces of at most 30 s, each as if
zero-padded to 30 s before the STFT (so the last frames see zeros, not reflection), dynamic floor, cut to
ceil(N / 160) frames.

The official code switches the floor on a feature extractor shared by every session and by the batch path, so
one session's streaming changes how the next clip is encoded (spec official-baseline.md, "Also observed"). Here
every streaming object owns its floor choice and the batch path takes the floor as an explicit argument.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .filterbank import mel_filter_bank
from .rates import MODEL_INPUT_RATE

N_FFT = 400
HOP_LENGTH = 160
N_MELS = 80
FRAMES_PER_SECOND = MODEL_INPUT_RATE // HOP_LENGTH
MAX_CLIP_SECONDS = 30
DYNAMIC_RANGE = 8.0
FIXED_FLOOR = -10.0
FIXED_FLOOR_BELOW_SECONDS = 5.0


def ms_to_samples(ms: float) -> int:
    """Samples of 16 kHz audio in `ms` milliseconds (rounded down)."""
    return int(ms * MODEL_INPUT_RATE / 1000)


@dataclass(frozen=True)
class LogFloor:
    """How low log10 mel values may go: `max - dynamic_range` when dynamic, else the constant `fixed`."""

    dynamic_range: float | None = DYNAMIC_RANGE
    fixed: float = FIXED_FLOOR

    @property
    def is_dynamic(self) -> bool:
        return self.dynamic_range is not None


DYNAMIC_FLOOR = LogFloor(dynamic_range=DYNAMIC_RANGE)
FIXED_FLOOR_MODE = LogFloor(dynamic_range=None, fixed=FIXED_FLOOR)


# ---------------------------------------------------------------------------------------------- token counts


def mel_frame_count(n_samples: int) -> int:
    """Mel frames the encoder sees for `n_samples` of 16 kHz audio: ceil(N / 160)."""
    return -(-n_samples // HOP_LENGTH)


def cnn_frame_count(mel_frames: int) -> int:
    """Frames after Whisper's stride-2 conv2."""
    return (mel_frames - 1) // 2 + 1


def pooled_count(cnn_frames: int, pool_step: int = 5) -> int:
    """LLM audio tokens after average pooling (kernel = stride = pool_step)."""
    return (cnn_frames - pool_step) // pool_step + 1


def audio_token_count(n_samples: int, pool_step: int = 5) -> int:
    """LLM audio embeddings for a clip: 10 per second (spec §1.4 table)."""
    return pooled_count(cnn_frame_count(mel_frame_count(n_samples)), pool_step)


def chunked_audio_token_counts(n_samples: int, pool_step: int = 5, chunk_seconds: float = 1.0) -> list[int]:
    """Per-chunk token counts when a clip is laid out as one placeholder block per `chunk_seconds`."""
    total = audio_token_count(n_samples, pool_step)
    per_chunk = pooled_count(cnn_frame_count(int(chunk_seconds * FRAMES_PER_SECOND)), pool_step)
    counts = []
    while sum(counts) < total:
        counts.append(min(per_chunk, total - sum(counts)))
    return counts


@lru_cache(maxsize=4)
def _torch_constants(n_mels: int, n_fft: int) -> tuple[torch.Tensor, torch.Tensor]:
    bank = mel_filter_bank(MODEL_INPUT_RATE, n_fft, n_mels)
    filters = torch.from_numpy(np.ascontiguousarray(bank.T, dtype=np.float32))  # [freq, mels], row-major
    return filters, torch.hann_window(n_fft, periodic=True, dtype=torch.float32)


@lru_cache(maxsize=8)
def _device_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The filter bank [freq, mels], the Hann window and the offsets 0..n_fft-1 on `device`, copied there once."""
    filters, window = _torch_constants(N_MELS, N_FFT)
    return filters.to(device), window.to(device), torch.arange(N_FFT, device=device)


def _log10_mel(power: torch.Tensor) -> torch.Tensor:
    """[freq, frames] power spectrum -> [80, frames] log10 mel, before any floor."""
    filters, _ = _torch_constants(N_MELS, N_FFT)
    return torch.clamp(filters.T @ power, min=1e-10).log10()


def apply_floor(logs: torch.Tensor, floor: LogFloor, maximum: torch.Tensor | None = None) -> np.ndarray:
    """Floor raw log10 mel values and scale them as Whisper does: (max(x, floor) + 4) / 4.

    The dynamic floor is `maximum - 8`, where `maximum` defaults to the maximum of `logs`; pass the maximum of
    the whole spectrogram to floor just a slice of it.
    """
    if floor.is_dynamic:
        assert floor.dynamic_range is not None
        peak = logs.max() if maximum is None else maximum
        logs = torch.maximum(logs, peak - floor.dynamic_range)
    else:
        logs = torch.maximum(logs, torch.tensor(floor.fixed, dtype=logs.dtype))
    return ((logs + 4.0) / 4.0).numpy()


def raw_log_mel(samples: np.ndarray | torch.Tensor) -> torch.Tensor:
    """log10 mel of a 16 kHz mono signal before the floor: [80, N // 160] (last STFT frame dropped)."""
    wave = torch.as_tensor(np.asarray(samples, dtype=np.float32))
    if wave.ndim != 1:
        raise ValueError(f"log_mel wants a 1-D signal, got shape {tuple(wave.shape)}")
    if wave.numel() <= N_FFT // 2:
        raise ValueError(
            f"audio of {wave.numel()} samples is too short for a mel frame (need > {N_FFT // 2})"
        )
    _, window = _torch_constants(N_MELS, N_FFT)
    spec = torch.stft(
        wave,
        n_fft=N_FFT,
        hop_length=HOP_LENGTH,
        window=window,
        center=True,
        pad_mode="reflect",
        return_complex=True,
    )
    return _log10_mel(spec[:, :-1].abs() ** 2)


def reflected_stretch(read: Callable[[int, int], np.ndarray], n: int, first: int, stop: int) -> np.ndarray:
    """The samples frames [first, stop) of `raw_log_mel` read: [first * 160 - 200, (stop - 1) * 160 + 200) of a
    signal of `n` samples (`read(a, b)` gives samples [a, b)), extended past either end by the centred STFT's
    reflection (-k -> k at the start, n - 1 + k -> n - 1 - k at the end)."""
    half = N_FFT // 2
    lo, hi = first * HOP_LENGTH - half, (stop - 1) * HOP_LENGTH + half
    if stop <= first or n <= half:
        raise ValueError(f"no frames [{first}, {stop}) in a signal of {n} samples (need > {half})")
    if -lo >= n or hi - n >= n:
        raise ValueError(f"frames [{first}, {stop}) reach further than one reflection of {n} samples")
    if lo >= 0 and hi <= n:
        return read(lo, hi)
    parts = []
    if lo < 0:
        parts.append(read(1 - min(hi, 0), 1 - lo)[::-1])
    if lo < n and hi > 0:
        parts.append(read(max(lo, 0), min(hi, n)))
    if hi > n:
        parts.append(read(2 * n - 1 - hi, 2 * n - 1 - max(lo, n))[::-1])
    return np.concatenate(parts)


def windowed_frames(stretch: np.ndarray, out: torch.Tensor) -> None:
    """Hann-windowed frames (hop 160) of a `reflected_stretch` into `out` [frames, 400]."""
    _, window = _torch_constants(N_MELS, N_FFT)
    if stretch.size != (out.shape[0] - 1) * HOP_LENGTH + N_FFT:
        raise ValueError(f"{stretch.size} samples are not {out.shape[0]} frames")
    wave = torch.from_numpy(np.ascontiguousarray(stretch, dtype=np.float32))
    torch.mul(wave.as_strided((out.shape[0], N_FFT), (HOP_LENGTH, 1)), window, out=out)


def frame_windows(signal: np.ndarray, first: int, stop: int, out: torch.Tensor) -> None:
    """Hann-windowed samples of frames [first, stop) of `raw_log_mel(signal)` into `out` [stop - first, 400]."""
    windowed_frames(reflected_stretch(lambda a, b: signal[a:b], signal.size, first, stop), out)


def log_mel_of_windows(windows: torch.Tensor, segments: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """Raw log10 mel of windowed frames: [rows, 400] -> [rows, 80] float32, one rfft for all rows.

    `segments` splits the rows into consecutive segments, each a sequence of run sizes (default: one segment
    of one run). Every run is multiplied by the filter bank as its own matrix, one product per run. On BLAS
    kernels whose rounding depends on the size of the product, this keeps every frame bit-identical to
    transforming its run alone (as `raw_log_mel` and the per-session streaming path do). A batched product of
    several equal runs is not enough: MKL's AVX-512 kernels round a batch of them differently from one.
    """
    rows = windows.shape[0]
    if windows.device.type != "cpu":
        return log_mel_on_device(windows).cpu().numpy()
    layout = [(rows,)] if segments is None else [tuple(segment) for segment in segments]
    if windows.ndim != 2 or windows.shape[1] != N_FFT or sum(sum(seg) for seg in layout) != rows:
        raise ValueError(
            f"windows must be [rows, {N_FFT}] split into segments summing to rows, got {tuple(windows.shape)}"
        )
    out = torch.empty((rows, N_MELS), dtype=torch.float32)
    if rows == 0:
        return out.numpy()
    filters, _ = _torch_constants(N_MELS, N_FFT)
    power = torch.fft.rfft(windows).abs().pow_(2)  # [rows, freq]
    bank = filters.T[None]  # [1, mels, freq]
    start = 0
    for size in (size for segment in layout for size in segment):
        if size:  # [mels, freq] @ [freq, size], the orientation of the per-run product
            mel = torch.bmm(bank, power[start : start + size].T[None])
            out[start : start + size].copy_(mel[0].T)
        start += size
    return out.clamp_(min=1e-10).log10_().numpy()


def log_mel_on_device(windows: torch.Tensor) -> torch.Tensor:
    """Raw log10 mel of windowed frames where they are: [rows, 400] -> [rows, 80] float32 on their device, one
    rfft and one product for all rows (no per-run bit-identity as in `log_mel_of_windows`; within float32
    rounding of it)."""
    filters, _, _ = _device_constants(windows.device)
    power = torch.fft.rfft(windows).abs().pow_(2)
    return (power @ filters).clamp_(min=1e-10).log10_()


def log_mel(samples: np.ndarray | torch.Tensor, floor: LogFloor = DYNAMIC_FLOOR) -> np.ndarray:
    """Log-mel features of one 16 kHz mono signal, shape [80, N // 160] float32."""
    return apply_floor(raw_log_mel(samples), floor)


def clip_features(samples: np.ndarray, floor: LogFloor = DYNAMIC_FLOOR, full_pad: bool = False) -> np.ndarray:
    """Features of one clip of at most 30 s as if zero-padded to 30 s: [80, ceil(N / 160)].

    Only the frames that see the clip are computed: every other frame of the 30 s spectrogram is pure
    padding, whose value (log10 of the 1e-10 clamp, -10) is the lowest possible and so never moves the
    dynamic floor. `full_pad=True` computes the whole padded spectrogram (the reference for tests).
    """
    samples = np.asarray(samples, dtype=np.float32)
    limit = MAX_CLIP_SECONDS * MODEL_INPUT_RATE
    if samples.ndim != 1 or samples.size == 0:
        raise ValueError(f"a clip must be a non-empty 1-D signal, got shape {samples.shape}")
    if samples.size > limit:
        raise ValueError(f"a clip may be at most {MAX_CLIP_SECONDS} s; split it first")
    # 2 * n_fft zeros keep every frame that overlaps the clip, and the reflection at the end on zeros
    padded = np.zeros(limit if full_pad else min(limit, samples.size + 2 * N_FFT), dtype=np.float32)
    padded[: samples.size] = samples
    raw = raw_log_mel(padded)
    return apply_floor(raw[:, : mel_frame_count(samples.size)], floor, raw.max())


def split_clip(samples: np.ndarray, seconds: int = MAX_CLIP_SECONDS) -> list[np.ndarray]:
    """Cut audio into pieces of at most `seconds` (the official 30 s encoder limit)."""
    step = seconds * MODEL_INPUT_RATE
    return [samples[i : i + step] for i in range(0, max(len(samples), 1), step)]


def batch_features(clips: list[np.ndarray], floor: LogFloor = DYNAMIC_FLOOR) -> tuple[np.ndarray, np.ndarray]:
    """Features for a list of clips, each split into <= 30 s pieces: ([n_pieces, 80, max_frames], lens).

    Shorter pieces are right-padded with zeros; `lens` holds each piece's valid frame count.
    """
    pieces = [feat for clip in clips for feat in (clip_features(p, floor) for p in split_clip(clip))]
    if not pieces:
        return np.zeros((0, N_MELS, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
    lens = np.array([p.shape[1] for p in pieces], dtype=np.int64)
    out = np.zeros((len(pieces), N_MELS, int(lens.max())), dtype=np.float32)
    for i, p in enumerate(pieces):
        out[i, :, : p.shape[1]] = p
    return out, lens
