"""An audio resampler on a PyAV filter graph that runs in the calling thread.

`av.AudioResampler` builds its filter graph with FFmpeg's default thread count (one per core), and FFmpeg
starts that many idle threads per graph; they live as long as the resampler, which in a call's reference
cycles is until the next garbage collection. A server with many short calls piled up hundreds of them.
Audio filters gain nothing from FFmpeg's slice threads, so this graph has one thread: no extra threads at all.
"""

from __future__ import annotations

from errno import EAGAIN

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
