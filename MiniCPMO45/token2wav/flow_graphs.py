"""All due streaming flow windows of one round as one padded batch, optionally replayed as CUDA graphs.

Turns sit at different points (turn opening, steady, duplex flush, last chunk), so their windows differ in
token count and their caches in length. `Flow.ragged_forward` runs them together: window tokens padded to
`token_slots` (4, 8, 16, 25 or 28 output tokens), caches padded to a common number of slots (a multiple of 16 that
holds prompt + history), padded keys masked out per row, positions and the ODE noise offset kept per row.
The batch is padded to a bucket (1, 2, 4, ..., 64); padding rows hold finite filler and are dropped.

On CUDA (when enabled) a `ChunkShape` seen `capture_after` times is captured once and replayed. All graphs
with the same cache slots read one set of static input buffers (`RaggedInputs`, sized for the largest
bucket used so far), so memory does not grow with the number of shapes. Otherwise the same padded code runs
eagerly, which is what the CPU tests compare with the per-turn plain path.

Graph outputs live in the shared pool and are overwritten by the next replay: `split_rows` copies out
what each turn keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch

from .flow import Flow, FlowCache
from .host import device_tensor

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
MAX_BUCKET = BATCH_BUCKETS[-1]
TOKEN_SLOTS = (4, 8, 16, 25, 28)  # output tokens of a padded window (a non-final one emits <= 25)
CACHE_GRANULE = 16  # cache slots are rounded up to a multiple of this (mel frames)


def batch_bucket(n: int) -> int:
    """The smallest bucket holding n rows (1 <= n <= 64)."""
    for bucket in BATCH_BUCKETS:
        if n <= bucket:
            return bucket
    raise ValueError(f"a flow batch holds at most {MAX_BUCKET} windows, got {n}")


def token_slots(outputs: int) -> int:
    """Padded output tokens for a batch whose longest window emits `outputs` tokens."""
    for slots in TOKEN_SLOTS:
        if outputs <= slots:
            return slots
    return outputs


def _round_up(n: int, granule: int) -> int:
    return -(-n // granule) * granule


@dataclass(frozen=True)
class ChunkShape:
    bucket: int
    token_slots: int  # U: padded output tokens (2U mel frames)
    cache_slots: int  # padded cache length in mel frames (conformer and estimator)
    n_steps: int


@dataclass
class WindowRow:
    """One turn's window: its tokens (with look-ahead unless last), its cache and speaker vector (1, 192).
    `capacity`: the most cache frames this turn can hold (prompt + history), which sizes the padding."""

    tokens: Sequence[int]
    last_chunk: bool
    cache: FlowCache | None  # None once the round has consumed it (see `split_rows`)
    spk: torch.Tensor
    capacity: int
    prompt_frames: int | None = None  # given: the estimator KV comes back already cut like `trim_flow_cache`


@dataclass(eq=False)
class RaggedInputs:
    """Padded inputs of `Flow.ragged_forward` for `rows` streams (estimator rows interleaved)."""

    tokens: torch.Tensor  # (rows, U + lookahead) long
    n_tokens: torch.Tensor  # (rows,) long: real tokens of each row
    valid: torch.Tensor  # (rows,) long: real output tokens
    spk: torch.Tensor  # (rows, 192)
    cnn: torch.Tensor  # (rows, d, 2 + 2*stride)
    low: torch.Tensor  # (low layers, rows, h, S/2, 2*d_k), left-padded
    up: torch.Tensor  # (up layers, rows, h, S, 2*d_k), left-padded
    conformer_frames: torch.Tensor  # (rows,) long
    conv: torch.Tensor  # (steps, depth, 2*rows, 2*hidden, 2)
    kv: torch.Tensor  # (steps, depth, 2*rows, heads, S, 2*head_dim), right-padded
    estimator_frames: torch.Tensor  # (rows,) long

    @staticmethod
    def row_bytes(flow: Flow, token_width: int, slots: int, n_steps: int) -> int:
        """Bytes of one row of `zeros(flow, rows, token_width, slots, n_steps)`."""
        enc, dit = flow.p.encoder, flow.p.estimator
        itemsize = flow.input_embedding.weight.element_size()
        floats = (
            flow.p.spk_embed_dim
            + enc.output_size * (2 + 2 * enc.up_stride)
            + (enc.num_blocks * slots // 2 + enc.num_up_blocks * slots) * 2 * enc.output_size
            + n_steps * dit.depth * 2 * (4 * dit.hidden_size + dit.num_heads * slots * 2 * dit.head_dim)
        )
        return floats * itemsize + (token_width + 4) * 8

    @classmethod
    def zeros(cls, flow: Flow, rows: int, token_width: int, slots: int, n_steps: int) -> RaggedInputs:
        device = flow.input_embedding.weight.device
        dtype = flow.input_embedding.weight.dtype
        enc, dit = flow.p.encoder, flow.p.estimator
        d_k = enc.output_size // enc.attention_heads
        stride = enc.up_stride

        def zeros(*shape: int, kind: torch.dtype = dtype) -> torch.Tensor:
            return torch.zeros(*shape, dtype=kind, device=device)

        return cls(
            zeros(rows, token_width, kind=torch.long),
            zeros(rows, kind=torch.long),
            zeros(rows, kind=torch.long),
            zeros(rows, flow.p.spk_embed_dim),
            zeros(rows, enc.output_size, 2 + 2 * stride),
            zeros(enc.num_blocks, rows, enc.attention_heads, slots // 2, 2 * d_k),
            zeros(enc.num_up_blocks, rows, enc.attention_heads, slots, 2 * d_k),
            zeros(rows, kind=torch.long),
            zeros(n_steps, dit.depth, 2 * rows, 2 * dit.hidden_size, 2),
            zeros(n_steps, dit.depth, 2 * rows, dit.num_heads, slots, 2 * dit.head_dim),
            zeros(rows, kind=torch.long),
        )

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self))

    def view(self, rows: int, token_width: int, n_steps: int) -> RaggedInputs:
        """The first `rows` streams (views: every batched dim is outermost or per step/layer)."""
        return RaggedInputs(
            self.tokens[:rows, :token_width],
            self.n_tokens[:rows],
            self.valid[:rows],
            self.spk[:rows],
            self.cnn[:rows],
            self.low[:, :rows],
            self.up[:, :rows],
            self.conformer_frames[:rows],
            self.conv[:n_steps, :, : 2 * rows],
            self.kv[:n_steps, :, : 2 * rows],
            self.estimator_frames[:rows],
        )

    def fill(self, windows: Sequence[WindowRow], lookahead: int, low_layers: int) -> None:
        """Copy the windows into rows 0..n-1; rows n.. become padding (1 real token, empty caches)."""
        rows, width = self.rows, self.tokens.shape[1]
        n = len(windows)
        token_rows = [list(w.tokens) + [0] * (width - len(w.tokens)) for w in windows]
        token_rows += [[0] * width] * (rows - n)
        lengths = [
            [len(w.tokens) for w in windows] + [width] * (rows - n),
            [len(w.tokens) - (0 if w.last_chunk else lookahead) for w in windows] + [1] * (rows - n),
            [w.cache.conformer_att.shape[3] for w in windows] + [0] * (rows - n),
            [w.cache.estimator_kv.shape[4] for w in windows] + [0] * (rows - n),
        ]
        device = self.tokens.device
        self.tokens.copy_(device_tensor(token_rows, torch.long, device))
        host = device_tensor(lengths, torch.long, device)
        for dest, src in zip(
            (self.n_tokens, self.valid, self.conformer_frames, self.estimator_frames), host, strict=True
        ):
            dest.copy_(src)
        self.spk[:n].copy_(torch.cat([w.spk for w in windows], dim=0))
        self.cnn[:n].copy_(torch.cat([w.cache.conformer_cnn for w in windows], dim=0))
        half_slots = self.low.shape[3]
        for b, w in enumerate(windows):
            att = w.cache.conformer_att
            frames = att.shape[3]
            self.low[:, b, :, half_slots - frames // 2 :].copy_(att[:low_layers, 0, :, : frames // 2])
            self.up[:, b, :, self.up.shape[3] - frames :].copy_(att[low_layers:, 0])
            self.conv[:, :, 2 * b : 2 * b + 2].copy_(w.cache.estimator_conv)
            kv = w.cache.estimator_kv
            self.kv[:, :, 2 * b : 2 * b + 2, :, : kv.shape[4]].copy_(kv)

    def forward(self, flow: Flow, n_steps: int) -> tuple[torch.Tensor, ...]:
        return flow.ragged_forward(
            self.tokens,
            self.n_tokens,
            self.valid,
            self.spk,
            self.cnn,
            self.low,
            self.up,
            self.conformer_frames,
            self.conv,
            self.kv,
            self.estimator_frames,
            n_steps,
        )


def join_and_trim(new: torch.Tensor, old: torch.Tensor, front: int, back: int) -> torch.Tensor:
    """`cat([new, old], dim=4)` cut to its first `front` and last `back` frames (when longer than both), built
    from slices so the whole joined tensor is never materialized (it is the largest per-turn tensor)."""
    n, total = new.shape[4], new.shape[4] + old.shape[4]
    if total <= front + back:
        return torch.cat([new, old], dim=4)

    def frames(t: torch.Tensor, a: int, b: int | None = None) -> torch.Tensor:
        return t[:, :, :, :, a:b]

    parts = [frames(new, 0, min(n, front))]
    if front > n:
        parts.append(frames(old, 0, front - n))
    start = total - back
    parts += [frames(new, start), old] if start < n else [frames(old, start - n)]
    return torch.cat(parts, dim=4)


RowDone = Callable[[int, torch.Tensor, FlowCache], None]


def split_rows(
    outputs: tuple[torch.Tensor, ...],
    windows: Sequence[WindowRow],
    lookahead: int,
    low_layers: int,
    up_rate: int,
    done: RowDone | None = None,
) -> list[tuple[torch.Tensor, FlowCache]]:
    """Each window's (mel (1, 80, frames), new untrimmed cache) as fresh tensors: the chunk's real keys
    joined to the turn's old cache exactly as `UpsampleConformerEncoder.forward_chunk` and the DiT do.

    Consumes each row's old cache (`cache` becomes None) and calls `done(row, mel, cache)` as soon as the
    row is built, so a caller that hands the new cache to its turn there frees the old one at once: the
    round then holds one stream's cache extra, not a second copy of every stream's (~140 MB each)."""
    mel, cnn, new_low, new_up, conv, new_kv = outputs
    out = []
    for b, w in enumerate(windows):
        tokens = len(w.tokens) - (0 if w.last_chunk else lookahead)
        frames = tokens * up_rate
        old, w.cache = w.cache, None
        if old is None:
            raise ValueError("this window's cache was already consumed")
        half = old.conformer_att.shape[3] // 2
        low = torch.cat(
            [old.conformer_att[:low_layers, :, :, :half], new_low[:, b : b + 1, :, :tokens]], dim=3
        )
        up = torch.cat([old.conformer_att[low_layers:], new_up[:, b : b + 1, :, :frames]], dim=3)
        cache = FlowCache(
            cnn[b : b + 1].clone(),
            torch.cat([low.repeat(1, 1, 1, up_rate, 1), up], dim=0),
            conv[:, :, 2 * b : 2 * b + 2].clone(),
            join_and_trim(
                new_kv[:, :, 2 * b : 2 * b + 2, :, :frames],
                old.estimator_kv,
                w.prompt_frames,
                w.capacity - w.prompt_frames,
            )
            if w.prompt_frames is not None
            else torch.cat([new_kv[:, :, 2 * b : 2 * b + 2, :, :frames], old.estimator_kv], dim=4),
        )
        row_mel = mel[b : b + 1, :, :frames].clone()
        del old
        if done is not None:
            done(b, row_mel, cache)
        out.append((row_mel, cache))
    return out


class _Captured:
    def __init__(self, flow: Flow, inputs: RaggedInputs, n_steps: int, pool: object) -> None:
        self.inputs = inputs
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                inputs.forward(flow, n_steps)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.outputs = inputs.forward(flow, n_steps)

    def run(self) -> tuple[torch.Tensor, ...]:
        self.graph.replay()
        return self.outputs


class FlowGraphs:
    """Padded flow rounds for one flow. With `graphs` (and the flow on CUDA) a shape seen `capture_after`
    times is captured, while the static buffers (one set per cache size, grown to the largest bucket)
    stay under `max_bytes`; other shapes run the padded code eagerly. `calls` counts flow batches run."""

    def __init__(self, flow: Flow, graphs: bool, capture_after: int = 2, max_bytes: int = 16 * 2**30) -> None:
        if capture_after < 1:
            raise ValueError("capture_after must be >= 1")
        self.flow = flow
        self.graphs = graphs and flow.input_embedding.weight.is_cuda
        self.capture_after = capture_after
        self.max_bytes = max_bytes
        self.seen: dict[ChunkShape, int] = {}
        self.chunks: dict[ChunkShape, _Captured] = {}
        self.buffers: dict[int, RaggedInputs] = {}  # per cache_slots
        self.calls = 0
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None

    @property
    def bytes_used(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())

    def shape_of(self, windows: Sequence[WindowRow], n_steps: int) -> ChunkShape:
        lookahead = self.flow.lookahead
        outputs = max(len(w.tokens) - (0 if w.last_chunk else lookahead) for w in windows)
        longest = max(
            max(w.capacity, w.cache.conformer_att.shape[3], w.cache.estimator_kv.shape[4]) for w in windows
        )
        return ChunkShape(
            batch_bucket(len(windows)), token_slots(outputs), _round_up(longest, CACHE_GRANULE), n_steps
        )

    def _static_inputs(self, shape: ChunkShape) -> RaggedInputs | None:
        """Views of the shared static buffers for `shape`, growing them if needed (None: over budget)."""
        width = shape.token_slots + self.flow.lookahead
        have = self.buffers.get(shape.cache_slots)
        if (
            have is None
            or have.rows < shape.bucket
            or have.tokens.shape[1] < width
            or have.conv.shape[0] < shape.n_steps
        ):
            rows = max(shape.bucket, 0 if have is None else have.rows)
            wide = max(width, 0 if have is None else have.tokens.shape[1])
            steps = max(shape.n_steps, 0 if have is None else have.conv.shape[0])
            need = RaggedInputs.row_bytes(self.flow, wide, shape.cache_slots, steps) * rows
            if self.bytes_used - (0 if have is None else have.nbytes) + need > self.max_bytes:
                return None
            dropped = [s for s in self.chunks if s.cache_slots == shape.cache_slots]
            for old in dropped:
                del self.chunks[old]  # captured on the old buffers
            if dropped and self.graphs:
                # Never capture again into a pool whose graphs were destroyed: once its use count falls to
                # zero the allocator may release it (empty_cache, an out-of-memory retry) and a later capture
                # into it fails an internal assertion (torch 2.11).
                self._pool = torch.cuda.graph_pool_handle()
            self.buffers.pop(shape.cache_slots, None)
            have = self.buffers[shape.cache_slots] = RaggedInputs.zeros(
                self.flow, rows, wide, shape.cache_slots, steps
            )
        return have.view(shape.bucket, width, shape.n_steps)

    def run(
        self, windows: Sequence[WindowRow], n_steps: int, done: RowDone | None = None
    ) -> list[tuple[torch.Tensor, FlowCache]]:
        """One padded batch for 1..64 windows (tokens valid ids; non-final windows longer than the
        look-ahead; caches of any lengths). Returns each window's (mel, new untrimmed cache), owned."""
        flow = self.flow
        shape = self.shape_of(windows, n_steps)
        self.seen[shape] = self.seen.get(shape, 0) + 1
        self.calls += 1
        lookahead, low_layers = flow.lookahead, len(flow.encoder.encoders)
        chunk = self.chunks.get(shape)
        if chunk is not None:
            chunk.inputs.fill(windows, lookahead, low_layers)
            outputs = chunk.run()
            return split_rows(outputs, windows, lookahead, low_layers, flow.up_rate, done)
        # Not captured yet: with graphs on, fill the shared static buffers (no transient batch-sized
        # copy) and capture once the shape has been seen often enough; fresh zeros otherwise.
        static = self._static_inputs(shape) if self.graphs else None
        inputs = static
        if inputs is None:
            inputs = RaggedInputs.zeros(
                flow, shape.bucket, shape.token_slots + lookahead, shape.cache_slots, n_steps
            )
        inputs.fill(windows, lookahead, low_layers)
        if static is not None and self.seen[shape] >= self.capture_after:
            chunk = self.chunks[shape] = _Captured(flow, static, n_steps, self._pool)
            outputs = chunk.run()
        else:
            outputs = inputs.forward(flow, n_steps)
        return split_rows(outputs, windows, lookahead, low_layers, flow.up_rate, done)
