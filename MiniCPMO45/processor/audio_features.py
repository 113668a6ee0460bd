"""Whisper-style log-mel features for the MiniCPM-o 4.5 audio encoder, batch and streaming.

The recipe (spec §1.4): 16 kHz audio, a centred STFT (n_fft 400, hop 160, periodic Hann, reflect padding),
power spectrum, an 80-band Slaney mel filter bank over 0-8 kHz, log10 of max(mel, 1e-10), the last frame
dropped, a floor, then (x + 4) / 4. The floor is either "dynamic" (max - 8, Whisper's rule) or "fixed" (-10).

Three forms:
* `batch_features`: what the chat processor does for whole clips: pieces of at most 30 s, each zero-padded to
  30 s before the STFT (so the last frames see zeros, not reflection), dynamic floor, cut to ceil(N / 160) frames.
* `ExactStreamingMel`: the "exact" streaming processor. It keeps the audio in a buffer, recomputes the mel over
  the whole buffer at every chunk, and emits a core of `chunk_frames` frames plus `redundancy` frames on each
  side (no left side on the first chunk) once their right context is complete. Under 5 s of buffer it uses the
  fixed floor, from 5 s on the dynamic one; at 30 s the buffer drops its oldest 10 s.
* `StreamingMel`: one full-duplex session's audio front end on top of it: left-pads the first unit to 1035 ms,
  cuts 16480 samples for the first unit and 16000 after, and returns one `MelUnit` per model unit.

The official code switches the floor on a feature extractor shared by every session and by the batch path, so
one session's streaming changes how the next clip is encoded (spec official-baseline.md, "Also observed"). Here
every streaming object owns its floor choice and the batch path takes the floor as an explicit argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

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


def log_mel(samples: np.ndarray | torch.Tensor, floor: LogFloor = DYNAMIC_FLOOR) -> np.ndarray:
    """Log-mel of one 16 kHz mono signal, shape [80, N // 160] float32 (last STFT frame dropped)."""
    wave = torch.as_tensor(np.asarray(samples, dtype=np.float32))
    if wave.ndim != 1:
        raise ValueError(f"log_mel wants a 1-D signal, got shape {tuple(wave.shape)}")
    if wave.numel() <= N_FFT // 2:
        raise ValueError(
            f"audio of {wave.numel()} samples is too short for a mel frame (need > {N_FFT // 2})"
        )
    filters, window = _torch_constants(N_MELS, N_FFT)
    spec = torch.stft(
        wave,
        n_fft=N_FFT,
        hop_length=HOP_LENGTH,
        window=window,
        center=True,
        pad_mode="reflect",
        return_complex=True,
    )
    power = spec[:, :-1].abs() ** 2  # [freq, frames]
    mel = filters.T @ power
    logs = torch.clamp(mel, min=1e-10).log10()
    if floor.is_dynamic:
        assert floor.dynamic_range is not None
        logs = torch.maximum(logs, logs.max() - floor.dynamic_range)
    else:
        logs = torch.maximum(logs, torch.tensor(floor.fixed, dtype=logs.dtype))
    return ((logs + 4.0) / 4.0).numpy()


def clip_features(samples: np.ndarray, floor: LogFloor = DYNAMIC_FLOOR) -> np.ndarray:
    """Features of one clip of at most 30 s, computed on the clip zero-padded to 30 s: [80, ceil(N / 160)]."""
    samples = np.asarray(samples, dtype=np.float32)
    limit = MAX_CLIP_SECONDS * SAMPLE_RATE
    if samples.ndim != 1 or samples.size == 0:
        raise ValueError(f"a clip must be a non-empty 1-D signal, got shape {samples.shape}")
    if samples.size > limit:
        raise ValueError(f"a clip may be at most {MAX_CLIP_SECONDS} s; split it first")
    padded = np.zeros(limit, dtype=np.float32)
    padded[: samples.size] = samples
    return log_mel(padded, floor)[:, : mel_frame_count(samples.size)]


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


class ExactStreamingMel:
    """The "exact" streaming mel: recompute over the buffer, emit only frames whose right context is complete.

    Frame indices are global (counted from the start of the stream), so the sliding buffer is invisible to the
    caller. Each `process` call emits the next `chunk_frames` core frames plus `redundancy_frames` on each side
    (none on the left of frame 0), or nothing if the buffer does not yet cover them.
    """

    def __init__(
        self,
        chunk_ms: int = 1000,
        first_chunk_ms: int | None = None,
        redundancy_ms: int = 20,
        sliding_window: bool = True,
        slide_trigger_seconds: float = 30.0,
        slide_stride_seconds: float = 10.0,
    ) -> None:
        self.chunk_samples = _ms_to_samples(chunk_ms)
        self.chunk_frames = self.chunk_samples // HOP_LENGTH
        first = _ms_to_samples(chunk_ms if first_chunk_ms is None else first_chunk_ms)
        # The first chunk is aligned down to whole hops (1035 ms -> 16480 samples = 1030 ms).
        self.first_chunk_samples = max(HOP_LENGTH, first // HOP_LENGTH * HOP_LENGTH)
        self.redundancy_frames = max(0, _ms_to_samples(redundancy_ms) // HOP_LENGTH)
        self.sliding_window = sliding_window
        self.slide_trigger_samples = int(slide_trigger_seconds * SAMPLE_RATE)
        self.slide_stride_samples = int(slide_stride_seconds * SAMPLE_RATE)
        self.reset()

    def reset(self) -> None:
        self.buffer = np.zeros(0, dtype=np.float32)
        self.emitted_frames = 0  # global index of the next core frame
        self.base_frame = 0  # global index of buffer frame 0
        self.chunks_seen = 0
        self.last_floor: LogFloor | None = None

    @property
    def is_first(self) -> bool:
        return self.chunks_seen == 0

    def next_chunk_samples(self) -> int:
        return self.first_chunk_samples if self.is_first else self.chunk_samples

    def floor_for_buffer(self) -> LogFloor:
        """Fixed floor while the buffer is under 5 s, dynamic from then on (decided per call, per stream)."""
        if self.buffer.size < FIXED_FLOOR_BELOW_SECONDS * SAMPLE_RATE:
            return FIXED_FLOOR_MODE
        return DYNAMIC_FLOOR

    def _slide(self) -> None:
        size = self.buffer.size
        if not self.sliding_window or size < self.slide_trigger_samples:
            return
        keep_at_least = min(SAMPLE_RATE, size - self.slide_stride_samples)
        drop = min(self.slide_stride_samples, max(0, size - keep_at_least))
        drop = drop // HOP_LENGTH * HOP_LENGTH
        if drop > 0:
            self.buffer = self.buffer[drop:]
            self.base_frame += drop // HOP_LENGTH

    def _stable_frames(self) -> int:
        """Buffer frames whose STFT window lies fully inside the buffer."""
        if self.buffer.size < N_FFT // 2:
            return 0
        return (self.buffer.size - N_FFT // 2) // HOP_LENGTH + 1

    def process(self, chunk: np.ndarray, is_last: bool = False) -> tuple[np.ndarray, int, int]:
        """Append `chunk`; return (features [80, T], first emitted global frame, core start global frame)."""
        chunk = np.asarray(chunk, dtype=np.float32).reshape(-1)
        self.buffer = np.concatenate([self.buffer, chunk]) if self.buffer.size else chunk.copy()
        self.chunks_seen += 1
        self._slide()
        if self.buffer.size < N_FFT:
            raise ValueError(f"streaming buffer of {self.buffer.size} samples is shorter than n_fft {N_FFT}")
        self.last_floor = self.floor_for_buffer()
        mel = log_mel(self.buffer, self.last_floor)
        total = mel.shape[1]
        stable_global = self.base_frame + min(total, self._stable_frames())
        core_start = self.emitted_frames
        core_end = core_start + self.chunk_frames
        if stable_global < core_end + self.redundancy_frames and not is_last:
            return mel[:, :0], core_start, core_start
        first_global = max(0, core_start - self.redundancy_frames)
        start = min(max(0, first_global - self.base_frame), total)
        end = max(start, min(core_end + self.redundancy_frames - self.base_frame, total))
        self.emitted_frames = core_end
        return mel[:, start:end], self.base_frame + start, core_start


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

    def push(self, samples: np.ndarray) -> MelUnit | None:
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        self.pending = np.concatenate([self.pending, samples])
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
        was_first = self.mel.is_first
        features, first_frame, core_start = self.mel.process(chunk)
        if features.shape[1] == 0:
            # Cannot happen with hop-aligned chunks of at least chunk + redundancy frames.
            raise RuntimeError("streaming mel emitted no frames for a full unit")
        prefix = core_start - first_frame
        unit = MelUnit(
            features=features,
            prefix_frames=0 if was_first else prefix,
            suffix_frames=features.shape[1] - prefix - self.mel.chunk_frames,
            index=self.units,
            samples_consumed=need,
        )
        self.units += 1
        return unit


class HalfDuplexStreamingMel:
    """The half-duplex `stream_input` path: each user audio segment is fed whole to the exact streaming mel.

    The first segment of a turn is left-padded with zeros to 1035 ms (16560 samples, not hop-aligned); the mel
    emits 100 frames per 1 s segment. `redundancy_ms` defaults to 0, which is what the official half-duplex
    prefill produced in the d_streaming fixture; the official demo server sets 20 ms on every mode once its
    duplex component exists, which adds 2 frames each side (the encoder keeps them: it does not trim here).
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
