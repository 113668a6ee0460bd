"""A function of batched tensors run on batches padded to buckets, replayed as CUDA graphs per shape.

`PaddedGraphs(fn)` calls `fn(*inputs, flag)` (every input batched on dim 0, `flag` a bool that changes the
computation). Batches of n <= 64 rows are padded to a bucket (1, 2, 4, ..., 64) by repeating row 0. With
graphs on (CUDA only), a (bucket, shapes, flag) seen `capture_after` times is captured with its own static
inputs and replayed from then on; the returned rows are copies, so they survive later replays. A batch whose
bucket has no graph yet pads further, to the smallest captured bucket of the same shapes, when there is one:
the full rounds captured at a worker's warm-up serve the smaller ones of calls still joining, and nothing is
captured inside their live ticks. A batch larger than every captured bucket of its shapes runs in parts of the
largest one. Off, or on CPU, the same padded computation runs eagerly, padded as CUDA would pad it. Other
batches over 64 rows run eagerly without padding.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from .flow_graphs import BATCH_BUCKETS, MAX_BUCKET, batch_bucket

Key = tuple[object, ...]
log = logging.getLogger(__name__)


class _Captured:
    def __init__(
        self,
        fn: Callable[..., tuple[torch.Tensor, ...]],
        inputs: tuple[torch.Tensor, ...],
        flag: bool,
        pool: object,
    ) -> None:
        self.inputs = tuple(x.clone() for x in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(*self.inputs, flag)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.outputs = fn(*self.inputs, flag)

    def run(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        for dest, src in zip(self.inputs, inputs, strict=True):
            dest.copy_(src)
        self.graph.replay()
        return self.outputs


class PaddedGraphs:
    def __init__(
        self,
        fn: Callable[..., tuple[torch.Tensor, ...]],
        graphs: bool,
        capture_after: int = 2,
        max_graphs: int = 64,
    ) -> None:
        if capture_after < 1:
            raise ValueError("capture_after must be >= 1")
        self.fn = fn
        self.graphs = graphs and torch.cuda.is_available()
        self.capture_after = capture_after
        self.max_graphs = max_graphs
        self.seen: dict[Key, int] = {}
        self.captured: dict[Key, _Captured] = {}
        self._eager_captured: set[Key] = set()  # graphs off: the keys CUDA would have captured
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None

    @staticmethod
    def _key(inputs: tuple[torch.Tensor, ...], flag: bool, rows: int) -> Key:
        return (flag, *(((rows, *x.shape[1:]), x.dtype, x.device) for x in inputs))

    def _bucket(self, inputs: tuple[torch.Tensor, ...], flag: bool, n: int) -> int:
        """The smallest bucket holding n rows, or the smallest larger one captured for the same shapes when that
        one is not."""
        bucket = batch_bucket(n)
        replayable = self.captured.keys() if self.graphs else self._eager_captured
        if self._key(inputs, flag, bucket) in replayable:
            return bucket
        larger = (b for b in BATCH_BUCKETS if b > bucket and self._key(inputs, flag, b) in replayable)
        return next(larger, bucket)

    def _split(self, inputs: tuple[torch.Tensor, ...], flag: bool, n: int) -> int | None:
        """The largest captured bucket of these shapes when no captured one holds n rows (a tick holding both
        phases' turns: more rows than the warm-up's rounds of one phase), else None."""
        replayable = self.captured.keys() if self.graphs else self._eager_captured
        have = [b for b in BATCH_BUCKETS if self._key(inputs, flag, b) in replayable]
        if not have or have[-1] >= n:
            return None
        return have[-1]

    def __call__(self, inputs: tuple[torch.Tensor, ...], flag: bool) -> tuple[torch.Tensor, ...]:
        n = inputs[0].shape[0]
        split = self._split(inputs, flag, n)
        if split is not None:  # rows are independent: replay the captured graph on each part, capture nothing
            parts = [self(tuple(x[i : i + split] for x in inputs), flag) for i in range(0, n, split)]
            return tuple(torch.cat(ys, dim=0) for ys in zip(*parts, strict=True))
        if n > MAX_BUCKET:
            return self.fn(*inputs, flag)
        bucket = self._bucket(inputs, flag, n)
        pad = bucket - n
        if pad:
            inputs = tuple(torch.cat([x, x[:1].expand(pad, *x.shape[1:])], dim=0) for x in inputs)
        key = self._key(inputs, flag, bucket)
        self.seen[key] = self.seen.get(key, 0) + 1
        graph = self.captured.get(key)
        if (
            graph is None
            and self.graphs
            and inputs[0].is_cuda
            and self.seen[key] >= self.capture_after
            and len(self.captured) < self.max_graphs
        ):
            started = time.perf_counter()
            graph = self.captured[key] = _Captured(self.fn, inputs, flag, self._pool)
            log.info(
                "%s graph %d captured in %.0f ms: %s",
                getattr(self.fn, "__qualname__", "padded"),
                len(self.captured),
                (time.perf_counter() - started) * 1e3,
                [tuple(x.shape) for x in inputs],
            )
        if graph is None:
            if not self.graphs and self.seen[key] >= self.capture_after:
                self._eager_captured.add(key)
            outputs = self.fn(*inputs, flag)
            return tuple(y[:n] for y in outputs)
        return tuple(y[:n].clone() for y in graph.run(inputs))
