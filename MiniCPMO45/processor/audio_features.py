"""Whisper-style log-mel features for the MiniCPM-o 4.5 audio encoder, batch and streaming.

The recipe (spec §1.4): 16 kHz audio, a centred STFT (n_fft 400, hop 160, periodic Hann, reflect padding),
power spectrum, an 80-band Slaney mel filter bank over 0-8 kHz, log10 of max(mel, 1e-10), the last frame
dropped, a floor, then (x + 4) / 4. The floor is either "dynamic" (max - 8, Whisper's rule) or "fixed" (-10).

Three forms:
* `batch_features`: what the chat processor does for whole clips: pieces of at most 30 s, each as if zero-padded
  to 30 s before the STFT (so the last frames see zeros, not reflection), dynamic floor, cut to ceil(N / 160)
  frames.
* `ExactStreamingMel`: the "exact" streaming processor. It keeps the audio in a buffer, gives the mel of the
  whole buffer at every chunk (cached, see the class), and emits a core of `chunk_frames` frames plus
  `redundancy` frames on each side (no left side on the first chunk) once their right context is complete.
  Under 5 s of buffer it uses the fixed floor, from 5 s on the dynamic one; at 30 s the buffer drops its
  oldest 10 s.
* `StreamingMel`: one full-duplex session's audio front end on top of it: left-pads the first unit to 1035 ms,
  cuts 16480 samples for the first unit and 16000 after, and returns one `MelUnit` per model unit.
  `push_many` does that for all sessions of a duplex tick at once: the new frames of every session go through
  one batched transform (rfft, power, mel filters, log10), with the same output as pushing each session alone;
  `push` is its batch of one.

The official code switches the floor on a feature extractor shared by every session and by the batch path, so
one session's streaming changes how the next clip is encoded (spec official-baseline.md, "Also observed"). Here
every streaming object owns its floor choice and the batch path takes the floor as an explicit argument.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ..host_copy import upload

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
N_MELS = 80
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH
MAX_CLIP_SECONDS = 30
DYNAMIC_RANGE = 8.0
FIXED_FLOOR = -10.0
FIXED_FLOOR_BELOW_SECONDS = 5.0


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


# ------------------------------------------------------------------------------------------- mel spectrogram


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / (200.0 / 3.0)
    log_step = math.log(6.4) / 27.0
    above = 15.0 + np.log(np.maximum(hz, 1e-12) / 1000.0) / log_step
    return np.where(hz >= 1000.0, above, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * (200.0 / 3.0)
    log_step = math.log(6.4) / 27.0
    above = 1000.0 * np.exp(log_step * (mel - 15.0))
    return np.where(mel >= 15.0, above, linear)


@lru_cache(maxsize=4)
def mel_filter_bank(
    n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE, f_max: float | None = None
) -> np.ndarray:
    """Triangular Slaney-normalised mel filters, shape [n_fft // 2 + 1, n_mels], float64."""
    f_max = sample_rate / 2 if f_max is None else f_max
    bin_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(f_max), n_mels + 2))
    lo, mid, hi = edges_hz[:-2], edges_hz[1:-1], edges_hz[2:]
    rising = (bin_hz[:, None] - lo[None, :]) / (mid - lo)[None, :]
    falling = (hi[None, :] - bin_hz[:, None]) / (hi - mid)[None, :]
    triangles = np.maximum(0.0, np.minimum(rising, falling))
    # Slaney normalisation: every filter has the same area (2 / bandwidth).
    return triangles * (2.0 / (hi - lo))[None, :]


@lru_cache(maxsize=4)
def _torch_constants(n_mels: int, n_fft: int) -> tuple[torch.Tensor, torch.Tensor]:
    filters = torch.from_numpy(mel_filter_bank(n_mels, n_fft)).to(torch.float32)  # [freq, mels]
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
    of one run). Every run is multiplied by the filter bank as its own matrix; consecutive segments with the
    same runs share one batched product per run. On BLAS kernels whose rounding depends on the size of the
    product, this keeps every frame bit-identical to transforming its run alone (as `raw_log_mel` and the
    per-session streaming path do).
    """
    rows = windows.shape[0]
    if windows.device.type != "cpu":
        # on a GPU one product for all rows (no per-run bit-identity there; within float32 rounding of it)
        filters, _, _ = _device_constants(windows.device)
        power = torch.fft.rfft(windows).abs().pow_(2)
        return (power @ filters).clamp_(min=1e-10).log10_().cpu().numpy()
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
    at = start = 0
    while at < len(layout):
        runs, count = layout[at], 1
        while at + count < len(layout) and layout[at + count] == runs:
            count += 1
        width = sum(runs)
        stop = start + width * count
        grid, target = power[start:stop].view(count, width, -1), out[start:stop].view(count, width, N_MELS)
        offset = 0
        for size in runs:
            if size:  # [mels, freq] @ [freq, size] per run, the orientation of the per-run product
                runs_power = grid[:, offset : offset + size].transpose(1, 2)
                mel = torch.bmm(filters.T.expand(count, -1, -1), runs_power)
                target[:, offset : offset + size].copy_(mel.transpose(1, 2))
            offset += size
        at, start = at + count, stop
    return out.clamp_(min=1e-10).log10_().numpy()


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
    limit = MAX_CLIP_SECONDS * SAMPLE_RATE
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
    step = seconds * SAMPLE_RATE
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


# ------------------------------------------------------------------------------------------------- streaming


def _ms_to_samples(ms: float) -> int:
    return int(ms * SAMPLE_RATE / 1000)


class _Rope:
    """Rows kept as the blocks they were appended in: appending and dropping from the front copy nothing, and
    reading a stretch joins only the blocks it overlaps. With `track_max`, each block's maximum is kept too."""

    def __init__(self, track_max: bool = False) -> None:
        self._blocks: deque[np.ndarray] = deque()
        self._maxima: deque[float] = deque()
        self._track_max = track_max
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def clear(self) -> None:
        self._blocks.clear()
        self._maxima.clear()
        self._len = 0

    def append(self, block: np.ndarray) -> None:
        if len(block):
            self._blocks.append(block)
            if self._track_max:
                self._maxima.append(block.max())
            self._len += len(block)

    def drop(self, count: int) -> None:
        """Forget the first `count` rows."""
        if not 0 <= count <= self._len:
            raise ValueError(f"cannot drop {count} of {self._len} rows")
        self._len -= count
        while count:
            first = self._blocks[0]
            if count >= len(first):
                self._blocks.popleft()
                if self._track_max:
                    self._maxima.popleft()
                count -= len(first)
            else:
                self._blocks[0] = first[count:]
                if self._track_max:
                    self._maxima[0] = self._blocks[0].max()
                count = 0

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) as one array (a view when they lie in one block)."""
        if not 0 <= lo <= hi <= self._len:
            raise ValueError(f"rows [{lo}, {hi}) are not within {self._len}")
        parts, end = [], self._len
        for block in reversed(self._blocks):  # reads are mostly near the end
            if end <= lo:
                break
            start = end - len(block)
            if start < hi:
                parts.append(block[max(lo - start, 0) : min(hi, end) - start])
            end = start
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return np.zeros((0, *self._blocks[0].shape[1:]) if self._blocks else 0, dtype=np.float32)
        return np.concatenate(parts[::-1])

    def max(self) -> float:
        if not self._track_max or not self._maxima:
            raise ValueError("no maximum kept")
        return max(self._maxima)


@dataclass
class _MelJob:
    """One `ExactStreamingMel.process` call between planning and finishing: the frames (buffer-local indices)
    the batched transform computes for it, and the frames it emits."""

    stream: ExactStreamingMel
    stable: int  # buffer frames whose window lies inside the buffer
    total: int  # buffer frames
    core_start: int  # global index of the core's first frame
    floor: LogFloor
    emit: tuple[int, int] | None  # frames to return; None while the buffer does not cover them
    fresh: tuple[int, int] = (0, 0)  # newly stable frames, appended to the cache
    left: bool = False  # frames 0 and 1 (reflected at the buffer start), computed once per buffer start
    right: bool = False  # frames [stable, total) reaching past the buffer end (they change with every chunk)
    row: int = 0  # first batch row of the job's frames: left, fresh, right (the runs of `layout`)

    def layout(self) -> tuple[int, int, int]:
        """Frames computed for the left edge, the cache and the right edge; each was one transform in the
        per-session code, so each stays one run of the batched product."""
        return (
            2 if self.left else 0,
            self.fresh[1] - self.fresh[0],
            self.total - self.stable if self.right else 0,
        )

    def ranges(self) -> list[tuple[int, int]]:
        """The frames to compute (buffer-local, in row order), adjacent ranges joined."""
        out: list[tuple[int, int]] = []
        for lo, hi in (
            (0, 2) if self.left else (0, 0),
            self.fresh,
            (self.stable, self.total) if self.right else (0, 0),
        ):
            if hi <= lo:
                continue
            if out and out[-1][1] == lo:
                out[-1] = (out[-1][0], hi)
            else:
                out.append((lo, hi))
        return out


class ExactStreamingMel:
    """The "exact" streaming mel: the output of a recompute over the buffer, emitting only frames whose right
    context is complete.

    Frame indices are global (counted from the start of the stream), so the sliding buffer is invisible to the
    caller. Each `process` call emits the next `chunk_frames` core frames plus `redundancy_frames` on each side
    (none on the left of frame 0), or nothing if the buffer does not yet cover them.

    Only new frames are transformed: a frame whose window lies inside the buffer never changes, so those are
    cached by global index (with each block's maximum, for the dynamic floor). Frames 0 and 1 of the buffer
    (reflect-padded at its start) are computed again when the start moves, and the frames reaching past its end
    at every emission that needs them, since they take part in the dynamic floor's maximum. `recompute=True`
    runs the plain full recompute with `raw_log_mel` instead (the reference the cache is tested against).

    A call is planned (`_plan`: buffer, slide, which frames to compute, which to emit), the frames of any number
    of streams are computed in one batch (`run_mel_jobs`), and each call is finished (`_finish`: cache, floor,
    emitted slice); `process` is that for one stream.
    """

    def __init__(
        self,
        chunk_ms: int = 1000,
        first_chunk_ms: int | None = None,
        redundancy_ms: int = 20,
        sliding_window: bool = True,
        slide_trigger_seconds: float = 30.0,
        slide_stride_seconds: float = 10.0,
        recompute: bool = False,
    ) -> None:
        self.recompute = recompute
        self.chunk_samples = _ms_to_samples(chunk_ms)
        self.chunk_frames = self.chunk_samples // HOP_LENGTH
        first = _ms_to_samples(chunk_ms if first_chunk_ms is None else first_chunk_ms)
        # The first chunk is aligned down to whole hops (1035 ms -> 16480 samples = 1030 ms).
        self.first_chunk_samples = max(HOP_LENGTH, first // HOP_LENGTH * HOP_LENGTH)
        self.redundancy_frames = max(0, _ms_to_samples(redundancy_ms) // HOP_LENGTH)
        self.sliding_window = sliding_window
        self.slide_trigger_samples = int(slide_trigger_seconds * SAMPLE_RATE)
        self.slide_stride_samples = int(slide_stride_seconds * SAMPLE_RATE)
        self._audio = _Rope()
        self._cache = _Rope(track_max=True)  # raw frames [frames, 80] of interior windows
        self.reset()

    def reset(self) -> None:
        self._audio.clear()
        self.emitted_frames = 0  # global index of the next core frame
        self.base_frame = 0  # global index of buffer frame 0
        self.chunks_seen = 0
        self.last_floor: LogFloor | None = None
        self._cache.clear()
        self._cache_start = 0  # global index of the first cached frame
        self._edge = np.zeros((2, N_MELS), dtype=np.float32)  # raw frames 0 and 1 of the buffer
        self._edge_base: int | None = None  # the base_frame they were computed for

    @property
    def buffer(self) -> np.ndarray:
        """The buffered audio, joined into one array."""
        return self._audio.read(0, len(self._audio))

    @property
    def buffered_samples(self) -> int:
        return len(self._audio)

    @property
    def is_first(self) -> bool:
        return self.chunks_seen == 0

    def next_chunk_samples(self) -> int:
        return self.first_chunk_samples if self.is_first else self.chunk_samples

    def floor_for_buffer(self) -> LogFloor:
        """Fixed floor while the buffer is under 5 s, dynamic from then on (decided per call, per stream)."""
        if len(self._audio) < FIXED_FLOOR_BELOW_SECONDS * SAMPLE_RATE:
            return FIXED_FLOOR_MODE
        return DYNAMIC_FLOOR

    def _slide(self) -> None:
        size = len(self._audio)
        if not self.sliding_window or size < self.slide_trigger_samples:
            return
        keep_at_least = min(SAMPLE_RATE, size - self.slide_stride_samples)
        drop = min(self.slide_stride_samples, max(0, size - keep_at_least))
        drop = drop // HOP_LENGTH * HOP_LENGTH
        if drop > 0:
            self._audio.drop(drop)
            self.base_frame += drop // HOP_LENGTH

    def _stable_frames(self) -> int:
        """Buffer frames whose STFT window lies fully inside the buffer."""
        if len(self._audio) < N_FFT // 2:
            return 0
        return (len(self._audio) - N_FFT // 2) // HOP_LENGTH + 1

    def _plan(self, chunk: np.ndarray, is_last: bool = False) -> _MelJob:
        """Append `chunk`, slide, and decide what this call computes and emits (the emission is booked here)."""
        self._audio.append(np.array(chunk, dtype=np.float32).reshape(-1))  # a copy: the caller keeps theirs
        self.chunks_seen += 1
        self._slide()
        size = len(self._audio)
        if size < N_FFT:
            raise ValueError(f"streaming buffer of {size} samples is shorter than n_fft {N_FFT}")
        self.last_floor = self.floor_for_buffer()
        total = size // HOP_LENGTH
        stable = min(total, self._stable_frames())
        core_start = self.emitted_frames
        core_end = core_start + self.chunk_frames
        emit = None
        if self.base_frame + stable >= core_end + self.redundancy_frames or is_last:
            first_global = max(0, core_start - self.redundancy_frames)
            start = min(max(0, first_global - self.base_frame), total)
            end = max(start, min(core_end + self.redundancy_frames - self.base_frame, total))
            emit = (start, end)
            self.emitted_frames = core_end
        job = _MelJob(self, stable, total, core_start, self.last_floor, emit)
        if self.recompute:
            return job
        # Once finished, the cache holds frames [base + 2, base + stable): drop what slid out or now sits at the
        # buffer start, then compute what became stable.
        first_interior = self.base_frame + 2
        if self._cache_start < first_interior:
            self._cache.drop(min(len(self._cache), first_interior - self._cache_start))
            self._cache_start = first_interior
        if not len(self._cache):
            self._cache_start = first_interior
        cached_end = self._cache_start + len(self._cache)
        if self.base_frame + stable > cached_end:
            job.fresh = (cached_end - self.base_frame, stable)
        if emit is not None:
            dynamic = self.last_floor.is_dynamic
            job.left = (dynamic or emit[0] < 2) and self._edge_base != self.base_frame
            job.right = (dynamic or emit[1] > stable) and total > stable
        return job

    def _finish(self, job: _MelJob, logs: np.ndarray) -> tuple[np.ndarray, int, int]:
        """Store the job's computed frames (rows of `logs`) and return its emission."""
        left, fresh, right_size = job.layout()
        at = job.row + left
        if left:
            self._edge = logs[job.row : at].copy()
            self._edge_base = self.base_frame
        if fresh:
            self._cache.append(logs[at : at + fresh].copy())
        right = logs[at + fresh : at + fresh + right_size]
        if job.emit is None:
            return np.zeros((N_MELS, 0), dtype=np.float32), job.core_start, job.core_start
        start, end = job.emit
        peak = None
        if self.recompute:
            raw = raw_log_mel(self.buffer).numpy().T  # [total, 80]
            frames = raw[start:end]
            peak = raw.max()
        else:
            stable, parts = job.stable, []
            if start < 2:
                parts.append(self._edge[start : min(end, 2)])
            if max(start, 2) < min(end, stable):
                offset = self.base_frame - self._cache_start
                parts.append(self._cache.read(max(start, 2) + offset, min(end, stable) + offset))
            if end > stable:
                parts.append(right[max(start, stable) - stable : end - stable])
            frames = parts[0] if len(parts) == 1 else np.concatenate(parts or [self._edge[:0]])
            if job.floor.is_dynamic:  # the maximum of the whole buffer: edge, cached and right frames
                peak = max(self._edge.max(), self._cache.max() if len(self._cache) else -np.inf)
                if len(right):
                    peak = max(peak, right.max())
        return _floored(frames, job.floor, peak), self.base_frame + start, job.core_start

    def process(self, chunk: np.ndarray, is_last: bool = False) -> tuple[np.ndarray, int, int]:
        """Append `chunk`; return (features [80, T], first emitted global frame, core start global frame)."""
        return run_mel_jobs([self._plan(chunk, is_last)])[0]


def _floored(frames: np.ndarray, floor: LogFloor, peak: float | None) -> np.ndarray:
    """`apply_floor` on raw frames [T, 80] given the buffer's maximum: features [80, T] (same float32 steps)."""
    if floor.is_dynamic:
        assert floor.dynamic_range is not None and peak is not None
        bound = np.float32(peak) - np.float32(floor.dynamic_range)
    else:
        bound = np.float32(floor.fixed)
    out = np.maximum(frames, bound)
    out += np.float32(4.0)
    out /= np.float32(4.0)
    return np.ascontiguousarray(out.T)


# Rows per batched transform: a few sessions' units at a time keep its intermediates in the CPU caches.
_ROWS_PER_PASS = 768
_transform_thread: ThreadPoolExecutor | None = None


def _transform_pool() -> ThreadPoolExecutor:
    global _transform_thread
    if _transform_thread is None:
        _transform_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mel-transform")
    return _transform_thread


def _forget_transform_pool() -> None:
    global _transform_thread
    _transform_thread = None  # a forked child has no copy of the worker thread


os.register_at_fork(after_in_child=_forget_transform_pool)


def _gather(jobs: Sequence[_MelJob]) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """The windowed frames of the jobs, jobs of one layout side by side; sets each job's `row`."""
    ordered = sorted(jobs, key=_MelJob.layout)
    layouts = [job.layout() for job in ordered]
    windows = torch.empty((sum(sum(layout) for layout in layouts), N_FFT), dtype=torch.float32)
    row = 0
    for job in ordered:
        job.row = row
        audio = job.stream._audio
        for lo, hi in job.ranges():
            windowed_frames(reflected_stretch(audio.read, len(audio), lo, hi), windows[row : row + hi - lo])
            row += hi - lo
    return windows, layouts


def _gather_on(jobs: Sequence[_MelJob], device: torch.device) -> torch.Tensor:
    """`_gather` with the framing and windowing on `device`: the host only joins each job's reflected stretch
    of samples and the frames' start offsets, one upload each."""
    _, window, offsets = _device_constants(device)
    stretches: list[np.ndarray] = []
    starts: list[np.ndarray] = []
    row = at = 0
    for job in sorted(jobs, key=_MelJob.layout):
        job.row = row
        audio = job.stream._audio
        for lo, hi in job.ranges():
            stretch = reflected_stretch(audio.read, len(audio), lo, hi)
            stretches.append(stretch)
            starts.append(at + HOP_LENGTH * np.arange(hi - lo))
            at += stretch.size
            row += hi - lo
    wave = upload(np.concatenate(stretches).astype(np.float32, copy=False), device, torch.float32)
    first = upload(np.concatenate(starts), device)
    return wave[first[:, None] + offsets] * window


def run_mel_jobs(
    jobs: Sequence[_MelJob], device: torch.device | None = None
) -> list[tuple[np.ndarray, int, int]]:
    """Compute the frames of planned streaming-mel calls in batched transforms and finish each call.

    The jobs go in passes of about `_ROWS_PER_PASS` frames; with several passes, each pass's transform runs on
    a worker thread (torch releases the GIL) while this thread gathers the next pass and finishes the previous.
    With a `device` (a GPU's), the framing and the transform of every job run there in one pass and one product
    instead: on the host of an H100 the CPU path took 1.5-10 ms for one session's unit, most of it torch's CPU
    thread pool waking for small tensors. Values agree within float32 rounding, not bit for bit.
    """
    if len({id(job.stream) for job in jobs}) != len(jobs):
        raise ValueError("a streaming mel may appear once per batch")
    if device is not None and jobs:
        logs = log_mel_of_windows(_gather_on(jobs, device))
        return [job.stream._finish(job, logs) for job in jobs]
    passes: list[list[int]] = []
    rows = _ROWS_PER_PASS
    for k, job in enumerate(jobs):
        if rows >= _ROWS_PER_PASS:
            passes.append([])
            rows = 0
        passes[-1].append(k)
        rows += sum(job.layout())
    results: list[tuple[np.ndarray, int, int]] = [None] * len(jobs)  # type: ignore[list-item]

    def finish(members: list[int], logs: np.ndarray) -> None:
        for k in members:
            results[k] = jobs[k].stream._finish(jobs[k], logs)

    if len(passes) == 1:
        windows, layouts = _gather(jobs)
        finish(list(range(len(jobs))), log_mel_of_windows(windows, layouts))
        return results
    previous: tuple[Future[np.ndarray], list[int]] | None = None
    for members in [*passes, None]:
        current = None
        if members is not None:
            windows, layouts = _gather([jobs[k] for k in members])
            current = (_transform_pool().submit(log_mel_of_windows, windows, layouts), members)
        if previous is not None:
            finish(previous[1], previous[0].result())
        previous = current
    return results


@dataclass(frozen=True)
class MelUnit:
    """The mel features of one full-duplex unit and how many context frames surround its 100-frame core."""

    features: np.ndarray  # [80, T] float32
    prefix_frames: int  # redundancy frames before the core (0 on the first unit)
    suffix_frames: int  # redundancy frames after the core
    index: int  # unit number within the session, from 0
    samples_consumed: int  # audio samples this unit took from the session buffer

    @property
    def core_frames(self) -> int:
        return self.features.shape[1] - self.prefix_frames - self.suffix_frames


class StreamingMel:
    """One full-duplex session's audio front end (session-owned; nothing is shared between sessions).

    `push(samples)` adds the unit's audio (16 kHz mono float32) and returns the `MelUnit` for the next model unit,
    or None when there is not enough audio yet (the samples stay buffered). Rules (spec §1.4, §3.3.2):
    the first unit is left-padded with zeros to `first_chunk_ms` (1035 ms = 16560 samples) and takes 16480
    samples (1035 ms aligned down to the hop); later units take 16000. The samples beyond what a unit took stay
    for the next one, so with 1 s pushes an 80-sample remainder lags permanently, as in the official demo.
    One call returns at most one unit; `push(np.zeros(0))` takes the next one if enough audio is buffered.
    `push_many` does the same for many sessions at once (one batched transform); `push` is its batch of one.
    """

    def __init__(
        self,
        chunk_ms: int = 1000,
        first_chunk_ms: int = 1035,
        redundancy_ms: int = 20,
        sliding_window: bool = True,
    ) -> None:
        self.first_chunk_ms = first_chunk_ms
        self.mel = ExactStreamingMel(
            chunk_ms=chunk_ms,
            first_chunk_ms=first_chunk_ms,
            redundancy_ms=redundancy_ms,
            sliding_window=sliding_window,
        )
        self.reset()

    def reset(self) -> None:
        self.mel.reset()
        self.pending = np.zeros(0, dtype=np.float32)
        self.units = 0

    @property
    def next_unit_samples(self) -> int:
        return self.mel.next_chunk_samples()

    def _take(self, samples: np.ndarray) -> np.ndarray | None:
        """Buffer `samples`; cut and return the next unit's audio if enough is buffered (the first unit padded)."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        self.pending = np.concatenate([self.pending, samples])
        if self.pending.size == 0:
            return None
        if self.units == 0:
            pad_to = _ms_to_samples(self.first_chunk_ms)
            if self.pending.size < pad_to:
                self.pending = np.concatenate(
                    [np.zeros(pad_to - self.pending.size, np.float32), self.pending]
                )
        need = self.mel.next_chunk_samples()
        if self.pending.size < need:
            return None
        chunk, self.pending = self.pending[:need], self.pending[need:]
        return chunk

    def _unit(self, emitted: tuple[np.ndarray, int, int], was_first: bool, consumed: int) -> MelUnit:
        features, first_frame, core_start = emitted
        if features.shape[1] == 0:
            # Cannot happen with hop-aligned chunks of at least chunk + redundancy frames.
            raise RuntimeError("streaming mel emitted no frames for a full unit")
        prefix = core_start - first_frame
        unit = MelUnit(
            features=features,
            prefix_frames=0 if was_first else prefix,
            suffix_frames=features.shape[1] - prefix - self.mel.chunk_frames,
            index=self.units,
            samples_consumed=consumed,
        )
        self.units += 1
        return unit

    def push(self, samples: np.ndarray) -> MelUnit | None:
        return push_many([self], [samples])[0]


def push_many(
    mels: Sequence[StreamingMel],
    chunks: Sequence[np.ndarray | None],
    device: torch.device | None = None,
) -> list[MelUnit | None]:
    """`mels[i].push(chunks[i])` for every session, with the frames of all of them computed in one batched
    transform; the results are those of the per-session pushes. A None chunk leaves its session untouched (no
    push at all, result None); an empty one is a push of nothing (it takes a unit if enough audio is buffered).
    With a `device` the transform runs there (`run_mel_jobs`): the same values within float32 rounding.
    """
    if len(mels) != len(chunks):
        raise ValueError(f"{len(mels)} streaming mels but {len(chunks)} chunks")
    if len({id(m) for m in mels}) != len(mels):
        raise ValueError("a session's streaming mel may appear once per push_many call")
    jobs: list[_MelJob] = []
    taken: list[tuple[int, bool, int]] = []  # (session, was its first unit, samples consumed) per job
    for i, (mel, samples) in enumerate(zip(mels, chunks, strict=True)):
        chunk = None if samples is None else mel._take(samples)
        if chunk is not None:
            taken.append((i, mel.mel.is_first, chunk.size))
            jobs.append(mel.mel._plan(chunk))
    units: list[MelUnit | None] = [None] * len(mels)
    for (i, was_first, consumed), emitted in zip(taken, run_mel_jobs(jobs, device), strict=True):
        units[i] = mels[i]._unit(emitted, was_first, consumed)
    return units


class HalfDuplexStreamingMel:
    """The half-duplex `stream_input` path: each user audio segment is fed whole to the exact streaming mel.

    The first segment of a turn is left-padded with zeros to 1035 ms (16560 samples, not hop-aligned); the mel
    emits 100 frames per 1 s segment. `redundancy_ms` defaults to 0, which is what the official half-duplex
    prefill produced in the d_streaming fixture; the official demo server sets 20 ms on every mode once its
    duplex component exists, which adds 2 frames each side (the encoder keeps them: it does not trim here).
    Call `reset()` when a turn's generation starts: the official code re-creates its streaming processor at every
    `streaming_generate`, so each user turn starts with a padded first segment and a fresh buffer.
    """

    def __init__(self, chunk_ms: int = 1000, first_chunk_ms: int = 1035, redundancy_ms: int = 0) -> None:
        self.first_chunk_samples = _ms_to_samples(first_chunk_ms)
        self.mel = ExactStreamingMel(
            chunk_ms=chunk_ms, first_chunk_ms=first_chunk_ms, redundancy_ms=redundancy_ms, sliding_window=True
        )
        self.segments = 0

    def reset(self) -> None:
        self.mel.reset()
        self.segments = 0

    def pad_first(self, samples: np.ndarray) -> np.ndarray:
        """Left-pad the turn's first segment to 1035 ms; later segments pass unchanged."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self.segments == 0 and samples.size < self.first_chunk_samples:
            pad = np.zeros(self.first_chunk_samples - samples.size, dtype=np.float32)
            samples = np.concatenate([pad, samples])
        return samples

    def push(self, samples: np.ndarray, is_last: bool = False) -> tuple[np.ndarray, int]:
        """Return (features [80, T], the padded segment's sample count, for its placeholder count)."""
        segment = self.pad_first(samples)
        features, _, _ = self.mel.process(segment, is_last=is_last)
        self.segments += 1
        return features, segment.size
