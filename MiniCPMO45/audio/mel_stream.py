"""The streaming log-mel of one session: the "exact" streaming processor and the two front ends on top of it.

* `ExactStreamingMel`: keeps the audio in a buffer, gives the mel of the whole buffer at every chunk (cached,
  see the class), and emits a core of `chunk_frames` frames plus `redundancy` frames on each side (no left side
  on the first chunk) once their right context is complete. Under 5 s of buffer it uses the fixed floor, from
  5 s on the dynamic one; at 30 s the buffer drops its oldest 10 s.
* `StreamingMel`: one full-duplex session's audio front end on top of it: left-pads the first unit to 1035 ms,
  cuts 16480 samples for the first unit and 16000 after, and returns one `MelUnit` per model unit.
  `push_many` does that for all sessions of a duplex tick at once: the new frames of every session go through
  one batched transform (`mel_batch.run_mel_jobs`), with the same output as pushing each session alone;
  `push` is its batch of one. With a device the features stay there (`MelUnit.features` is then a tensor).
* `HalfDuplexStreamingMel`: the half-duplex `stream_input` path (each user segment fed whole).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .mel import (
    DYNAMIC_FLOOR,
    FIXED_FLOOR_BELOW_SECONDS,
    FIXED_FLOOR_MODE,
    HOP_LENGTH,
    N_FFT,
    N_MELS,
    LogFloor,
    ms_to_samples,
    raw_log_mel,
)
from .mel_batch import Frames, MelJob, Rope, concat, floored, peak_of, run_mel_jobs, to_store
from .rates import MODEL_INPUT_RATE


def _own(block: Frames) -> Frames:
    """A copy of rows that may be a view into a batch's output."""
    return block.clone() if isinstance(block, torch.Tensor) else block.copy()


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
        self.chunk_samples = ms_to_samples(chunk_ms)
        self.chunk_frames = self.chunk_samples // HOP_LENGTH
        first = ms_to_samples(chunk_ms if first_chunk_ms is None else first_chunk_ms)
        # The first chunk is aligned down to whole hops (1035 ms -> 16480 samples = 1030 ms).
        self.first_chunk_samples = max(HOP_LENGTH, first // HOP_LENGTH * HOP_LENGTH)
        self.redundancy_frames = max(0, ms_to_samples(redundancy_ms) // HOP_LENGTH)
        self.sliding_window = sliding_window
        self.slide_trigger_samples = int(slide_trigger_seconds * MODEL_INPUT_RATE)
        self.slide_stride_samples = int(slide_stride_seconds * MODEL_INPUT_RATE)
        self._audio = Rope()
        self._cache = Rope(track_max=True)  # raw frames [frames, 80] of interior windows
        self.reset()

    def reset(self) -> None:
        self._audio.clear()
        self.emitted_frames = 0  # global index of the next core frame
        self.base_frame = 0  # global index of buffer frame 0
        self.chunks_seen = 0
        self.last_floor: LogFloor | None = None
        self._cache.clear()
        self._cache_start = 0  # global index of the first cached frame
        self._edge: Frames = np.zeros((2, N_MELS), dtype=np.float32)  # raw frames 0 and 1 of the buffer
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
        if len(self._audio) < FIXED_FLOOR_BELOW_SECONDS * MODEL_INPUT_RATE:
            return FIXED_FLOOR_MODE
        return DYNAMIC_FLOOR

    def _slide(self) -> None:
        size = len(self._audio)
        if not self.sliding_window or size < self.slide_trigger_samples:
            return
        keep_at_least = min(MODEL_INPUT_RATE, size - self.slide_stride_samples)
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

    def _plan(self, chunk: np.ndarray, is_last: bool = False) -> MelJob:
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
        job = MelJob(self, stable, total, core_start, self.last_floor, emit)
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

    def _finish(self, job: MelJob, logs: Frames) -> tuple[Frames, int, int]:
        """Store the job's computed frames (rows of `logs`) and return its emission."""
        left, fresh, right_size = job.layout()
        at = job.row + left
        if left:
            self._edge = _own(logs[job.row : at])
            self._edge_base = self.base_frame
        if fresh:
            self._cache.append(_own(logs[at : at + fresh]))
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
            frames = parts[0] if len(parts) == 1 else concat(parts) if parts else self._edge[:0]
            if job.floor.is_dynamic:  # the maximum of the whole buffer: edge, cached and right frames
                maxima = [self._edge.max()]
                if len(self._cache):
                    maxima.append(self._cache.max())
                if len(right):
                    maxima.append(right.max())
                peak = peak_of(maxima)
        return floored(frames, job.floor, peak), self.base_frame + start, job.core_start

    def _store_on(self, device: torch.device | None) -> None:
        """Keep the stored frames (edge and cache) on the host (None) or on `device`, moving them if needed."""
        edge = self._edge
        if device is None and not isinstance(edge, torch.Tensor):
            return
        if device is not None and isinstance(edge, torch.Tensor) and edge.device.type == device.type:
            if device.index is None or edge.device.index in (None, device.index):
                return
        self._edge = to_store(self._edge, device)
        self._cache.move(lambda block: to_store(block, device))

    def process(self, chunk: np.ndarray, is_last: bool = False) -> tuple[Frames, int, int]:
        """Append `chunk`; return (features [80, T], first emitted global frame, core start global frame)."""
        return run_mel_jobs([self._plan(chunk, is_last)])[0]


@dataclass(frozen=True)
class MelUnit:
    """The mel features of one full-duplex unit and how many context frames surround its 100-frame core."""

    features: Frames  # [80, T] float32: numpy, or a tensor on the device `push_many` ran on
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
            pad_to = ms_to_samples(self.first_chunk_ms)
            if self.pending.size < pad_to:
                self.pending = np.concatenate(
                    [np.zeros(pad_to - self.pending.size, np.float32), self.pending]
                )
        need = self.mel.next_chunk_samples()
        if self.pending.size < need:
            return None
        chunk, self.pending = self.pending[:need], self.pending[need:]
        return chunk

    def _unit(self, emitted: tuple[Frames, int, int], was_first: bool, consumed: int) -> MelUnit:
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
    jobs: list[MelJob] = []
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
        self.first_chunk_samples = ms_to_samples(first_chunk_ms)
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
