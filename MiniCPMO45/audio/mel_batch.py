"""The streaming mels of many sessions in one batched transform (`run_mel_jobs`), and the stores they share.

A streaming-mel call is planned by its stream (`ExactStreamingMel._plan`, in `mel_stream`) into a `MelJob`: the
frames (buffer-local) to transform and the frames to emit. `run_mel_jobs` computes the frames of all the jobs
of a tick together and hands each job back to its stream to finish (`_finish`: cache, floor, emitted slice).

Two places for the work:
* the host (no device): the frames of each job keep their own runs in the product, so every frame is
  bit-identical to transforming the session alone; passes of about `_ROWS_PER_PASS` rows overlap on a thread;
* a device (a GPU's): the framing, the transform, the stream's frame cache, the floor and the emitted features
  all stay on the device. The host only joins each job's samples and the frames' start offsets (one upload
  each); the features come out as device tensors that the audio encoder reads in place. Run with
  `torch.device("cpu")` it is the same code on host tensors (the tests do that).

`Frames` are raw log10 mel rows, [frames, 80]: numpy arrays on the host path, torch tensors on the device path.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ..host_copy import upload
from .mel import (
    HOP_LENGTH,
    N_FFT,
    LogFloor,
    _device_constants,
    log_mel_of_windows,
    log_mel_on_device,
    reflected_stretch,
    windowed_frames,
)

Frames = np.ndarray | torch.Tensor
Peak = float | torch.Tensor


class MelStream(Protocol):
    """What a batch of jobs needs of the stream that planned each (`mel_stream.ExactStreamingMel`; a protocol so
    that this module does not import the one that imports it)."""

    _audio: Rope

    def _store_on(self, device: torch.device | None) -> None: ...

    def _finish(self, job: MelJob, logs: Frames) -> tuple[Frames, int, int]: ...


def concat(parts: Sequence[Frames]) -> Frames:
    """Rows of several blocks (all numpy or all torch) as one block."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(list(parts))
    return np.concatenate(parts)


def peak_of(values: Sequence[Peak]) -> Peak:
    """The largest of block maxima: a float, or a 0-d tensor on the device (no host sync)."""
    if any(isinstance(v, torch.Tensor) for v in values):
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        return torch.stack(tensors).max()
    return max(values)  # type: ignore[type-var]


def to_store(block: Frames, device: torch.device | None) -> Frames:
    """A stored block moved to the host (device None: numpy) or to `device` (a tensor there)."""
    if device is None:
        return block.cpu().numpy() if isinstance(block, torch.Tensor) else block
    if isinstance(block, torch.Tensor):
        return block.to(device)
    return torch.from_numpy(np.ascontiguousarray(block)).to(device)


class Rope:
    """Rows kept as the blocks they were appended in: appending and dropping from the front copy nothing, and
    reading a stretch joins only the blocks it overlaps. With `track_max`, each block's maximum is kept too.
    Blocks are numpy arrays or (the device path's) torch tensors, one kind at a time (`move`)."""

    def __init__(self, track_max: bool = False) -> None:
        self._blocks: deque[Frames] = deque()
        self._maxima: deque[Peak] = deque()
        self._track_max = track_max
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def clear(self) -> None:
        self._blocks.clear()
        self._maxima.clear()
        self._len = 0

    def move(self, convert: Callable[[Frames], Frames]) -> None:
        """Convert every block (and its maximum) in place, e.g. between the host and a device."""
        self._blocks = deque(convert(b) for b in self._blocks)
        if self._track_max:
            self._maxima = deque(b.max() for b in self._blocks)

    @property
    def on_device(self) -> bool:
        return bool(self._blocks) and isinstance(self._blocks[0], torch.Tensor)

    def append(self, block: Frames) -> None:
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

    def read(self, lo: int, hi: int) -> Frames:
        """Rows [lo, hi) as one block (a view when they lie in one block)."""
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
            if self._blocks:
                return self._blocks[0][:0]
            return np.zeros(0, dtype=np.float32)
        return concat(parts[::-1])

    def max(self) -> Peak:
        if not self._track_max or not self._maxima:
            raise ValueError("no maximum kept")
        return peak_of(list(self._maxima))


@dataclass
class MelJob:
    """One `ExactStreamingMel.process` call between planning and finishing: the frames (buffer-local indices)
    the batched transform computes for it, and the frames it emits."""

    stream: MelStream
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


def floored(frames: Frames, floor: LogFloor, peak: Peak | None) -> Frames:
    """`mel.apply_floor` on raw frames [T, 80] given the buffer's maximum: features [80, T], C-contiguous, with
    the same float32 steps on the host (numpy) and on a device (torch, where the frames are)."""
    if floor.is_dynamic:
        assert floor.dynamic_range is not None and peak is not None
        if isinstance(frames, torch.Tensor):
            bound = torch.as_tensor(peak, dtype=torch.float32, device=frames.device) - floor.dynamic_range
            return ((torch.maximum(frames, bound) + 4.0) / 4.0).T.contiguous()
        bound = np.float32(peak) - np.float32(floor.dynamic_range)
    else:
        if isinstance(frames, torch.Tensor):
            return ((frames.clamp(min=floor.fixed) + 4.0) / 4.0).T.contiguous()
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


def _gather(jobs: Sequence[MelJob]) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """The windowed frames of the jobs, jobs of one layout side by side; sets each job's `row`."""
    ordered = sorted(jobs, key=MelJob.layout)
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


def _gather_on(jobs: Sequence[MelJob], device: torch.device) -> torch.Tensor:
    """`_gather` with the framing and windowing on `device`: the host only joins each job's reflected stretch
    of samples and the frames' start offsets, one upload each."""
    _, window, offsets = _device_constants(device)
    stretches: list[np.ndarray] = []
    starts: list[np.ndarray] = []
    row = at = 0
    for job in sorted(jobs, key=MelJob.layout):
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


def run_mel_jobs(jobs: Sequence[MelJob], device: torch.device | None = None) -> list[tuple[Frames, int, int]]:
    """Compute the frames of planned streaming-mel calls in batched transforms and finish each call.

    The jobs go in passes of about `_ROWS_PER_PASS` frames; with several passes, each pass's transform runs on
    a worker thread (torch releases the GIL) while this thread gathers the next pass and finishes the previous.
    With a `device` (a GPU's), the framing and the transform of every job run there in one pass and one product
    instead: on the host of an H100 the CPU path took 1.5-10 ms for one session's unit, most of it torch's CPU
    thread pool waking for small tensors. Values agree within float32 rounding, not bit for bit. The computed
    frames stay on the device: each stream keeps its cache there, floors there and returns its features as a
    tensor there (nothing is copied back to the host). Each result is (features [80, T], first emitted global
    frame, core start global frame).
    """
    if len({id(job.stream) for job in jobs}) != len(jobs):
        raise ValueError("a streaming mel may appear once per batch")
    for job in jobs:  # a stream that moved between the host and a device brings its stored frames along
        job.stream._store_on(device)
    if device is not None and jobs:
        logs = log_mel_on_device(_gather_on(jobs, device))
        return [job.stream._finish(job, logs) for job in jobs]
    passes: list[list[int]] = []
    rows = _ROWS_PER_PASS
    for k, job in enumerate(jobs):
        if rows >= _ROWS_PER_PASS:
            passes.append([])
            rows = 0
        passes[-1].append(k)
        rows += sum(job.layout())
    results: list[tuple[Frames, int, int]] = [None] * len(jobs)  # type: ignore[list-item]

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
