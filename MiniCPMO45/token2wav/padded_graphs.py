"""A function of batched tensors run on batches padded to buckets, replayed as CUDA graphs per shape.

`PaddedGraphs(fn)` calls `fn(*inputs, flag)` (every input batched on dim 0, `flag` a bool that changes the
computation). Batches of n <= 64 rows are padded to a bucket (1, 2, 4, ..., 64) by repeating row 0. With
graphs on (CUDA only), a (bucket, shapes, flag) seen `capture_after` times is captured with its own static
inputs and replayed from then on; the returned rows are copies, so they survive later replays. Off, or on
CPU, the same padded computation runs eagerly. Batches over 64 rows run eagerly without padding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .flow_graphs import MAX_BUCKET, batch_bucket

Key = tuple[object, ...]


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
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None

    def __call__(self, inputs: tuple[torch.Tensor, ...], flag: bool) -> tuple[torch.Tensor, ...]:
        n = inputs[0].shape[0]
        if n > MAX_BUCKET:
            return self.fn(*inputs, flag)
        bucket = batch_bucket(n)
        pad = bucket - n
        if pad:
            inputs = tuple(torch.cat([x, x[:1].expand(pad, *x.shape[1:])], dim=0) for x in inputs)
        key: Key = (flag, *((tuple(x.shape), x.dtype, x.device) for x in inputs))
        self.seen[key] = self.seen.get(key, 0) + 1
        graph = self.captured.get(key)
        if (
            graph is None
            and self.graphs
            and inputs[0].is_cuda
            and self.seen[key] >= self.capture_after
            and len(self.captured) < self.max_graphs
        ):
            graph = self.captured[key] = _Captured(self.fn, inputs, flag, self._pool)
        if graph is None:
            outputs = self.fn(*inputs, flag)
            return tuple(y[:n] for y in outputs)
        return tuple(y[:n].clone() for y in graph.run(inputs))
