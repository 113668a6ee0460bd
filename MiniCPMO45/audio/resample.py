"""The one resampling path: PyAV (libswresample) on a filter graph with one thread.

`AudioResampler` is the streaming form (frames in, frames out; the media tracks, the Realtime API and the test
caller keep one per stream); `resample` converts one whole mono float32 signal (voices, audio files, the
vocoder's reference prompt, tests and benches).

`av.AudioResampler` builds its filter graph with FFmpeg's default thread count (one per core), and FFmpeg
starts that many idle threads per graph; they live as long as the resampler, which in a call's reference
cycles is until the next garbage collection. A server with many short calls piled up hundreds of them.
Audio filters gain nothing from FFmpeg's slice threads, so this graph has one thread: no extra threads at all.

PyAV is imported when a resampler is first used, so a GPU worker that only ever gets 16 kHz audio never
imports it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from errno import EAGAIN
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import av
    from av.filter import Graph


class AudioResampler:
    """Like `av.AudioResampler(format, layout, rate, options=...)`, without threads; `close()` frees it."""

    def __init__(self, format: str, layout: str, rate: int, options: dict[str, str] | None = None) -> None:
        self.format = format
        self.layout = layout
        self.rate = rate
        self.options = options or {}
        self._graph: Graph | None = None
        self._source: tuple[str, str, int] | None = None

    def _build(self, frame: av.AudioFrame) -> Graph:
        from av.filter import Graph

        graph = Graph()
        graph.threads = 1
        extra = {} if frame.time_base is None else {"time_base": str(frame.time_base)}
        source = graph.add(
            "abuffer",
            sample_rate=str(frame.sample_rate),
            sample_fmt=frame.format.name,
            channel_layout=frame.layout.name,
            **extra,
        )
        convert = graph.add(
            "aformat", sample_rates=str(self.rate), sample_fmts=self.format, channel_layouts=self.layout
        )
        sink = graph.add("abuffersink")
        if self.options:
            resample = graph.add("aresample", **self.options)
            source.link_to(resample)
            resample.link_to(convert)
        else:
            source.link_to(convert)
        convert.link_to(sink)
        graph.configure()
        return graph

    def resample(self, frame: av.AudioFrame | None) -> list[av.AudioFrame]:
        """Convert `frame`; None drains what the filter holds back (then the resampler is used up, as PyAV's)."""
        import av

        if self._graph is None:
            if frame is None:
                return []
            self._graph = self._build(frame)
            self._source = (frame.format.name, frame.layout.name, frame.sample_rate)
        elif frame is not None and (frame.format.name, frame.layout.name, frame.sample_rate) != self._source:
            raise ValueError("Frame does not match AudioResampler setup.")
        self._graph.push(frame)
        out: list[av.AudioFrame] = []
        while True:
            try:
                out.append(self._graph.pull())
            except EOFError:
                break
            except av.FFmpegError as exc:
                if exc.errno != EAGAIN:
                    raise
                break
        return out

    def close(self) -> None:
        """Free the filter graph now (it is rebuilt if the resampler is used again)."""
        self._graph = None
        self._source = None


class TooLong(ValueError):
    """More samples than the caller's limit came out of `to_mono_float`."""


def to_mono_float(frames: Iterable[av.AudioFrame], rate: int, limit: int | None = None) -> np.ndarray:
    """Decoded frames (any format, layout and rate) -> one mono float32 signal at `rate`, the resampler
    drained at the end. With `limit`, stops with `TooLong` once more than `limit` samples came out (before
    decoding the rest)."""
    resampler = AudioResampler(format="flt", layout="mono", rate=rate)
    parts: list[np.ndarray] = []
    samples = 0
    for frame in itertools.chain(frames, [None]):  # None drains the filter
        out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        parts += out
        samples += sum(p.size for p in out)
        if limit is not None and samples > limit:
            raise TooLong(f"more than {limit} samples")
    resampler.close()
    return np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros(0, np.float32)


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """One mono float32 signal from `from_rate` to `to_rate` (float32; the input's data, not a copy, when the
    rates are equal)."""
    samples = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
    if from_rate == to_rate or samples.size == 0:
        return samples
    import av

    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="flt", layout="mono")
    frame.sample_rate = from_rate
    return to_mono_float([frame], to_rate)
