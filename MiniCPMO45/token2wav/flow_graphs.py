"""Static-shape streaming flow windows, optionally replayed as CUDA graphs.

A window's work (conformer chunk + 5 Euler/CFG estimator steps) depends only on its shape: batch, window
tokens, last-chunk flag and the cache shapes. Batches are padded to a bucket (1, 2, 4, ..., 64) so one
shape serves several batch sizes; padding rows hold finite filler (stale rows in a graph's buffers, copies
of stream 0 when eager) and their outputs are dropped. On CUDA (when enabled) a shape seen `capture_after`
times is captured once (`StaticFlowChunk`: its own static input buffers) and then replayed; otherwise the
same padded computation runs eagerly, which is what the CPU tests compare against the unpadded path.
The estimator's KV cache is large (real size: ~0.3 GB per stream), so captures stop at a memory budget.

Outputs of a replay live in the graph's memory and are overwritten by the next replay of any graph in the
shared pool, so callers must copy out what they keep (`split_flow_cache` does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .flow import Flow, FlowCache, stack_flow_caches

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
MAX_BUCKET = BATCH_BUCKETS[-1]


def batch_bucket(n: int) -> int:
    """The smallest bucket holding n rows (1 <= n <= 64)."""
    for bucket in BATCH_BUCKETS:
        if n <= bucket:
            return bucket
    raise ValueError(f"a flow batch holds at most {MAX_BUCKET} windows, got {n}")


@dataclass(frozen=True)
class ChunkShape:
    bucket: int
    tokens: int
    last_chunk: bool
    n_steps: int
    cache: tuple[tuple[int, ...], ...]  # one stream's `FlowCache.shape_key()`


class StaticFlowChunk:
    """Input buffers, and on CUDA a captured graph, for one `ChunkShape`."""

    def __init__(self, flow: Flow, shape: ChunkShape) -> None:
        self.flow = flow
        self.shape = shape
        device = flow.input_embedding.weight.device
        dtype = flow.input_embedding.weight.dtype
        rows = shape.bucket
        cnn, att, conv, kv = shape.cache
        if cnn[0] != 1 or att[1] != 1 or conv[2] != 2 or kv[2] != 2:
            raise ValueError("cache shape key must be that of a single stream")
        self.tokens = torch.zeros(rows, shape.tokens, dtype=torch.long, device=device)
        self.spk = torch.zeros(rows, flow.p.spk_embed_dim, dtype=dtype, device=device)
        self.cache = FlowCache(
            torch.zeros(rows, *cnn[1:], dtype=dtype, device=device),
            torch.zeros(att[0], rows, *att[2:], dtype=dtype, device=device),
            torch.zeros(*conv[:2], 2 * rows, *conv[3:], dtype=dtype, device=device),
            torch.zeros(*kv[:2], 2 * rows, *kv[3:], dtype=dtype, device=device),
        )
        self.graph: torch.cuda.CUDAGraph | None = None
        self._graph_out: tuple[torch.Tensor, FlowCache] | None = None

    def load(self, tokens: torch.Tensor, spk: torch.Tensor, caches: list[FlowCache]) -> None:
        """Copy n <= bucket streams into rows 0..n-1 (estimator rows i and bucket + i)."""
        n, rows = len(caches), self.shape.bucket
        self.tokens[:n].copy_(tokens)
        self.spk[:n].copy_(spk)
        c = self.cache
        c.conformer_cnn[:n].copy_(torch.cat([x.conformer_cnn for x in caches], dim=0))
        c.conformer_att[:, :n].copy_(torch.cat([x.conformer_att for x in caches], dim=1))
        for name in ("estimator_conv", "estimator_kv"):
            dest = getattr(c, name)
            parts = [getattr(x, name) for x in caches]
            dest[:, :, :n].copy_(torch.cat([p[:, :, :1] for p in parts], dim=2))
            dest[:, :, rows : rows + n].copy_(torch.cat([p[:, :, 1:] for p in parts], dim=2))

    def _forward(self) -> tuple[torch.Tensor, FlowCache]:
        s = self.shape
        return self.flow.chunk_forward(self.tokens, self.spk, self.cache, s.last_chunk, s.n_steps)

    def capture(self, pool: object) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            out = self._forward()
        self.graph, self._graph_out = graph, out

    def run(self) -> tuple[torch.Tensor, FlowCache]:
        """(mel (bucket, 80, frames), batched cache of `bucket` streams) of the loaded inputs."""
        if self.graph is not None and self._graph_out is not None:
            self.graph.replay()
            return self._graph_out
        return self._forward()


class FlowGraphs:
    """Padded flow windows for one flow. With `graphs` (and the flow on CUDA) a shape seen `capture_after`
    times is captured, while the estimated memory of captured shapes (static inputs + graph outputs,
    both the size of a batched cache) stays under `max_bytes`; other shapes run the padded code eagerly."""

    def __init__(self, flow: Flow, graphs: bool, capture_after: int = 2, max_bytes: int = 16 * 2**30) -> None:
        if capture_after < 1:
            raise ValueError("capture_after must be >= 1")
        self.flow = flow
        self.graphs = graphs and flow.input_embedding.weight.is_cuda
        self.capture_after = capture_after
        self.max_bytes = max_bytes
        self.bytes_used = 0
        self.seen: dict[ChunkShape, int] = {}
        self.chunks: dict[ChunkShape, StaticFlowChunk] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None

    def _estimate_bytes(self, shape: ChunkShape) -> int:
        itemsize = self.flow.input_embedding.weight.element_size()
        per_stream = 0
        for dims in shape.cache:
            n = 1
            for d in dims:
                n *= d
            per_stream += n
        return 2 * per_stream * shape.bucket * itemsize

    def _captured(self, shape: ChunkShape) -> StaticFlowChunk | None:
        chunk = self.chunks.get(shape)
        if chunk is not None or not self.graphs:
            return chunk
        if self.seen[shape] < self.capture_after:
            return None
        need = self._estimate_bytes(shape)
        if self.bytes_used + need > self.max_bytes:
            return None
        chunk = StaticFlowChunk(self.flow, shape)
        chunk.capture(self._pool)
        self.chunks[shape] = chunk
        self.bytes_used += need
        return chunk

    def run(
        self, tokens: torch.Tensor, spk: torch.Tensor, caches: list[FlowCache], last_chunk: bool, n_steps: int
    ) -> tuple[torch.Tensor, FlowCache, int]:
        """One padded window for n <= 64 streams of equal shapes (tokens (n, t) valid ids, spk (n, 192)).

        Returns (mel, batched cache, bucket): rows 0..n-1 are the streams', the rest padding. The tensors
        may be graph-owned: copy out what must outlive the next call.
        """
        n = len(caches)
        shape = ChunkShape(batch_bucket(n), tokens.shape[1], last_chunk, n_steps, caches[0].shape_key())
        self.seen[shape] = self.seen.get(shape, 0) + 1
        chunk = self._captured(shape)
        if chunk is not None:
            chunk.load(tokens, spk, caches)
            mel, cache = chunk.run()
            return mel, cache, shape.bucket
        pad = shape.bucket - n
        if pad:  # padding rows repeat stream 0 (finite values; their outputs are dropped)
            caches = caches + [caches[0]] * pad
            tokens = torch.cat([tokens, tokens[:1].expand(pad, -1)], dim=0)
            spk = torch.cat([spk, spk[:1].expand(pad, -1)], dim=0)
        mel, cache = self.flow.chunk_forward(tokens, spk, stack_flow_caches(caches), last_chunk, n_steps)
        return mel, cache, shape.bucket
