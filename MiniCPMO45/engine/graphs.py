"""CUDA-graph capture of static-shape steps, with an eager fallback that runs the very same function.

A `StaticStep` owns fixed input buffers and one function that reads them and returns output tensors. On a
CUDA device the function is captured once into a `torch.cuda.CUDAGraph` and every `run()` replays it; on the
CPU (tests) or with graphs switched off, `run()` calls the function eagerly. The caller copies its inputs into
`step.inputs[...]` before `run()` and must consume (or clone) the outputs before the next `run()` of any step
that shares the same memory pool.

The function is run twice on a side stream before capture (allocator warm-up), so it must be free of side
effects when its inputs are "idle" (e.g. every row writes nothing and advances by 0): `idle()` sets them so.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence

import torch

Outputs = dict[str, torch.Tensor]
log = logging.getLogger(__name__)
_captures = itertools.count(1)


def graphs_available(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


class StaticStep:
    def __init__(
        self,
        fn: Callable[[dict[str, torch.Tensor]], Outputs],
        inputs: dict[str, torch.Tensor],
        idle: Callable[[dict[str, torch.Tensor]], None],
        use_graph: bool,
        pool: object | None = None,
    ) -> None:
        self.fn = fn
        self.inputs = inputs
        self.idle = idle
        self.use_graph = use_graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: Outputs = {}
        if use_graph:
            self._capture(pool)

    @torch.no_grad()
    def _capture(self, pool: object | None) -> None:
        started = time.perf_counter()
        self.idle(self.inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self.outputs = self.fn(self.inputs)
        self.graph = graph
        # every capture is logged with its time: one in a live tick stalls it (`bench/e2e.py` counts them)
        log.info(
            "static step graph %d captured in %.0f ms: %s",
            next(_captures),
            (time.perf_counter() - started) * 1000,
            {name: tuple(x.shape) for name, x in self.inputs.items()},
        )

    @torch.no_grad()
    def run(self) -> Outputs:
        if self.graph is not None:
            self.graph.replay()
            return self.outputs
        return self.fn(self.inputs)


def new_pool(device: torch.device) -> object | None:
    """One memory pool shared by every graph of a runner (their outputs are consumed before the next replay)."""
    return torch.cuda.graph_pool_handle() if graphs_available(device) else None


def pick_bucket(buckets: list[int], need: int) -> int:
    for b in buckets:
        if b >= need:
            return b
    raise ValueError(f"{need} exceeds the largest bucket {buckets[-1]}")


def row_window(buckets: list[int], num_slots: int, slots: Sequence[int]) -> tuple[int, int]:
    """`(first, rows)`: the slots `first .. first + rows - 1` a static step over `slots` runs as its rows. A
    bucket of rows from slot 0 up, or from the last slot down when that is smaller: the worker's second tick
    phase takes the highest free slots (`SlotKVCache.allocate(top=True)`), so each phase's tick runs about
    its own sessions' rows, not every slot below its highest."""
    low = pick_bucket(buckets, max(slots) + 1)
    high = pick_bucket(buckets, num_slots - min(slots))
    return (0, low) if low <= high else (num_slots - high, high)


def covering_window(windows: Iterable[tuple[int, int]], slots: Sequence[int]) -> tuple[int, int] | None:
    """The `(first, rows)` with the fewest rows among `windows` (those already captured) that holds every slot,
    or None. A step whose capture is expensive runs on such a window instead of capturing `row_window`'s
    smaller one in a live tick: its idle rows cost far less than a capture."""
    lo, hi = min(slots), max(slots)
    fits = [(rows, first) for first, rows in windows if first <= lo and hi < first + rows]
    if not fits:
        return None
    rows, first = min(fits)
    return first, rows
