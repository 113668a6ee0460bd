"""All due streaming flow windows of one round as one padded batch, optionally replayed as CUDA graphs.

Turns sit at different points (turn opening, steady, duplex flush, last chunk), so their windows differ in
token count and their caches in length. `Flow.ragged_forward` runs them together: window tokens padded to
`token_slots` (4, 8, 16, 25 or 28 output tokens), conformer caches padded to a common number of slots (a
multiple of 16 that holds prompt + history), padded keys masked out per row, positions and the ODE noise offset
kept per row. The estimator's keys never move: each turn's live in its rows of the `EstimatorStore`
(`kv_store.py`), and the batch's row r is store slot `base + r`, so the batch covers the slots up to the
highest one in the round (padded to a bucket 1, 2, 4, ..., 64); rows without a window this round are idle
(they write only the scratch position and their outputs are dropped).

On CUDA (when enabled) a `ChunkShape` seen `capture_after` times is captured once and replayed; a shape not
captured yet replays a captured one of a larger bucket when one covers its rows (`covering_shape`), so the
warm-up's full rounds serve the smaller rounds of calls joining, with no capture inside a live tick. All graphs
with the same conformer cache slots read one set of static input buffers (`RaggedInputs`, sized for the
largest bucket used so far), so memory does not grow with the number of shapes; a store that grows drops
them all. Otherwise the same padded code runs eagerly, which is what the CPU tests compare with the per-turn
plain path.

Graph outputs live in the shared pool and are overwritten by the next replay: `split_rows` copies out
what each turn keeps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from ..host_copy import upload
from .flow import Flow, FlowCache, keep_ends
from .kv_store import EstimatorStore, KVSlot

log = logging.getLogger(__name__)

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
    cache_slots: int  # padded conformer cache length in mel frames
    n_steps: int
    base: int = 0  # first store slot of the batch (row r is slot base + r)


@dataclass
class WindowRow:
    """One turn's window: its tokens (with look-ahead unless last), its conformer and conv caches, speaker
    vector (1, 192) and estimator KV slot. `capacity`: the most cache frames this turn can hold (prompt +
    history), which sizes the conformer padding and, with `prompt_frames`, the cut."""

    tokens: Sequence[int]
    last_chunk: bool
    cache: FlowCache | None  # None once the round has consumed it (see `split_rows`)
    spk: torch.Tensor
    capacity: int
    slot: KVSlot
    prompt_frames: int  # the turn's prompt: `split_rows` cuts the conformer caches to prompt + history

    def frames(self, lookahead: int, up_rate: int) -> int:
        """Mel frames (and estimator keys) this window adds."""
        return (len(self.tokens) - (0 if self.last_chunk else lookahead)) * up_rate


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    host = torch.from_numpy(array)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)


@dataclass(eq=False)
class RaggedInputs:
    """Padded inputs of `Flow.ragged_forward` for `rows` streams (estimator rows interleaved), the store apart."""

    tokens: torch.Tensor  # (rows, U + lookahead) long
    n_tokens: torch.Tensor  # (rows,) long: real tokens of each row
    valid: torch.Tensor  # (rows,) long: real output tokens
    spk: torch.Tensor  # (rows, 192)
    cnn: torch.Tensor  # (rows, d, 2 + 2*stride)
    low: torch.Tensor  # (low layers, rows, h, S/2, 2*d_k), left-padded
    up: torch.Tensor  # (up layers, rows, h, S, 2*d_k), left-padded
    conformer_frames: torch.Tensor  # (rows,) long
    conv: torch.Tensor  # (steps, depth, 2*rows, 2*hidden, 2)
    key_valid: torch.Tensor  # (rows, C) bool: store positions holding each row's cached keys
    estimator_frames: torch.Tensor  # (rows,) long: keys cached per row (its noise offset)
    write_pos: torch.Tensor  # (rows, 2U) long: store positions for this window's keys (padding: scratch)

    @staticmethod
    def row_bytes(flow: Flow, token_width: int, slots: int, n_steps: int, store_frames: int) -> int:
        """Bytes of one row of `zeros(flow, rows, token_width, slots, n_steps, store_frames)`."""
        enc, dit = flow.p.encoder, flow.p.estimator
        itemsize = flow.input_embedding.weight.element_size()
        floats = (
            flow.p.spk_embed_dim
            + enc.output_size * (2 + 2 * enc.up_stride)
            + (enc.num_blocks * slots // 2 + enc.num_up_blocks * slots) * 2 * enc.output_size
            + n_steps * dit.depth * 2 * 4 * dit.hidden_size
        )
        return floats * itemsize + store_frames + (token_width * (1 + flow.up_rate) + 4) * 8

    @classmethod
    def zeros(
        cls, flow: Flow, rows: int, token_width: int, slots: int, n_steps: int, store_frames: int
    ) -> RaggedInputs:
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
            zeros(rows, store_frames, kind=torch.bool),
            zeros(rows, kind=torch.long),
            zeros(rows, (token_width - flow.lookahead) * flow.up_rate, kind=torch.long),
        )

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self))

    def view(self, rows: int, token_width: int, frames: int, n_steps: int) -> RaggedInputs:
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
            self.key_valid[:rows],
            self.estimator_frames[:rows],
            self.write_pos[:rows, :frames],
        )

    def fill(
        self,
        windows: Sequence[WindowRow],
        rows_of: Sequence[int],
        lookahead: int,
        low_layers: int,
        up_rate: int,
    ) -> list[list[int]]:
        """Copy window i into row rows_of[i] and claim store positions for its new keys; the other rows are
        idle (1 padding token, empty caches, keys only at scratch). Returns each window's positions."""
        rows, width = self.rows, self.tokens.shape[1]
        frames_width = self.write_pos.shape[1]
        scratch = self.key_valid.shape[1] - 1
        device = self.tokens.device
        tokens = np.zeros((rows, width), np.int64)
        lengths = np.zeros((4, rows), np.int64)  # n_tokens, valid, conformer frames, estimator frames
        lengths[0], lengths[1] = width, 1
        write = np.full((rows, frames_width), scratch, np.int64)
        key_valid = np.zeros((rows, scratch + 1), np.bool_)
        key_valid[:, scratch] = True
        claimed = []
        for w, r in zip(windows, rows_of, strict=True):
            assert w.cache is not None
            tokens[r, : len(w.tokens)] = w.tokens
            lengths[:, r] = (
                len(w.tokens),
                len(w.tokens) - (0 if w.last_chunk else lookahead),
                w.cache.conformer_att.shape[3],
                w.slot.length,
            )
            key_valid[r, scratch] = False
            key_valid[r, w.slot.order] = True
            positions = w.slot.claim(w.frames(lookahead, up_rate))
            write[r, : len(positions)] = positions
            claimed.append(positions)
        self.tokens.copy_(_to_device(tokens, device))
        host = _to_device(lengths, device)
        for dest, src in zip(
            (self.n_tokens, self.valid, self.conformer_frames, self.estimator_frames), host, strict=True
        ):
            dest.copy_(src)
        self.write_pos.copy_(_to_device(write, device))
        self.key_valid.copy_(_to_device(key_valid, device))
        index = upload(list(rows_of), device, torch.long)
        self.spk.index_copy_(0, index, torch.cat([w.spk for w in windows], dim=0).to(self.spk.dtype))
        cnn = torch.cat([w.cache.conformer_cnn for w in windows if w.cache is not None], dim=0)
        self.cnn.index_copy_(0, index, cnn.to(self.cnn.dtype))
        half_slots = self.low.shape[3]
        for w, b in zip(windows, rows_of, strict=True):
            assert w.cache is not None
            att = w.cache.conformer_att
            frames = att.shape[3]
            self.low[:, b, :, half_slots - frames // 2 :].copy_(att[:low_layers, 0, :, : frames // 2])
            self.up[:, b, :, self.up.shape[3] - frames :].copy_(att[low_layers:, 0])
            self.conv[:, :, 2 * b : 2 * b + 2].copy_(w.cache.estimator_conv)
        return claimed

    def forward(self, flow: Flow, n_steps: int, kv_store: torch.Tensor) -> tuple[torch.Tensor, ...]:
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
            kv_store,
            self.key_valid,
            self.estimator_frames,
            self.write_pos,
            n_steps,
        )


RowDone = Callable[[int, torch.Tensor, FlowCache], None]


def split_rows(
    outputs: tuple[torch.Tensor, ...],
    windows: Sequence[WindowRow],
    rows_of: Sequence[int],
    lookahead: int,
    low_layers: int,
    up_rate: int,
    done: RowDone | None = None,
) -> list[tuple[torch.Tensor, FlowCache]]:
    """Each window's (mel (1, 80, frames), new cache): the chunk's real conformer keys joined to the turn's
    old ones as `UpsampleConformerEncoder.forward_chunk` does, then cut like `trim_flow_cache` (first prompt,
    last history frames). The estimator keys are in the store already; the cache keeps its empty placeholder.

    The round's outputs leave the graph pool in one copy each, and windows whose old caches have the same
    length (and output tokens, prompt, capacity) are joined as one batch: a turn's tensors are views of
    them. Consumes each window's old cache (`cache` becomes None) and calls `done(i, mel, cache)` per window."""
    mel, cnn, new_low, new_up, conv = (t.clone() for t in outputs)
    out_tokens = [len(w.tokens) - (0 if w.last_chunk else lookahead) for w in windows]
    groups: dict[tuple[int, int, int, int], list[int]] = {}
    for i, w in enumerate(windows):
        if w.cache is None:
            raise ValueError("this window's cache was already consumed")
        key = (w.cache.conformer_att.shape[3], out_tokens[i], w.prompt_frames, w.capacity)
        groups.setdefault(key, []).append(i)
    atts: list[torch.Tensor | None] = [None] * len(windows)
    for (length, tokens, prompt, capacity), members in groups.items():
        frames = tokens * up_rate
        history = capacity - prompt
        rows = upload([rows_of[m] for m in members], mel.device, torch.long)
        old = torch.cat([windows[m].cache.conformer_att for m in members], dim=1)  # type: ignore[union-attr]
        low = torch.cat(
            [old[:low_layers, :, :, : length // 2], new_low.index_select(1, rows)[:, :, :, :tokens]], dim=3
        )
        up = torch.cat([old[low_layers:], new_up.index_select(1, rows)[:, :, :, :frames]], dim=3)
        low, up = keep_ends(low, prompt // 2, history // 2, 3), keep_ends(up, prompt, history, 3)
        att = torch.cat([low.repeat(1, 1, 1, up_rate, 1), up], dim=0)
        for k, m in enumerate(members):
            atts[m] = att[:, k : k + 1]
    out = []
    for i, (w, b) in enumerate(zip(windows, rows_of, strict=True)):
        old_cache, w.cache = w.cache, None
        assert old_cache is not None and atts[i] is not None
        cache = FlowCache(cnn[b : b + 1], atts[i], conv[:, :, 2 * b : 2 * b + 2], old_cache.estimator_kv)
        row_mel = mel[b : b + 1, :, : out_tokens[i] * up_rate]
        del old_cache
        if done is not None:
            done(i, row_mel, cache)
        out.append((row_mel, cache))
    return out


class _Captured:
    def __init__(
        self, flow: Flow, inputs: RaggedInputs, n_steps: int, kv_store: torch.Tensor, pool: object
    ) -> None:
        self.inputs = inputs
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        # warm-up runs write this round's keys; the captured replay below writes them again, same values
        with torch.cuda.stream(side):
            for _ in range(2):
                inputs.forward(flow, n_steps, kv_store)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.outputs = inputs.forward(flow, n_steps, kv_store)

    def run(self) -> tuple[torch.Tensor, ...]:
        self.graph.replay()
        return self.outputs


class FlowGraphs:
    """Padded flow rounds for one flow, and the `EstimatorStore` of its turns. With `graphs` (and the flow
    on CUDA) a shape seen `capture_after` times is captured, while the static buffers (one set per conformer
    cache size, grown to the largest bucket) stay under `max_bytes`; other shapes run the padded code
    eagerly. `calls` counts flow batches run."""

    def __init__(self, flow: Flow, graphs: bool, capture_after: int = 2, max_bytes: int = 16 * 2**30) -> None:
        if capture_after < 1:
            raise ValueError("capture_after must be >= 1")
        self.flow = flow
        self.graphs = graphs and flow.input_embedding.weight.is_cuda
        self.capture_after = capture_after
        self.max_bytes = max_bytes
        self.store = EstimatorStore(window_frames=TOKEN_SLOTS[-1] * flow.up_rate)
        self.seen: dict[ChunkShape, int] = {}
        self.chunks: dict[ChunkShape, _Captured] = {}
        self._eager_captured: set[ChunkShape] = set()  # off CUDA: the shapes a GPU would have captured
        self.buffers: dict[int, RaggedInputs] = {}  # per cache_slots
        self.calls = 0
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self._store_version = self.store.version

    @property
    def bytes_used(self) -> int:
        # a copy first: the worker's memory log reads this from its IPC thread
        buffers = list(self.buffers.values())
        return sum(b.nbytes for b in buffers)

    @property
    def captured(self) -> Collection[ChunkShape]:
        """The shapes replayed as CUDA graphs (off CUDA: those that would be, for the same batching)."""
        return self.chunks.keys() if self.graphs else self._eager_captured

    def _drop_graphs(self) -> None:
        """Forget captured graphs and static buffers (they read a store tensor or buffers now replaced)."""
        had = bool(self.chunks)
        self.chunks.clear()
        self._eager_captured.clear()
        if had and self.graphs:
            # Never capture again into a pool whose graphs were destroyed: once its use count falls to
            # zero the allocator may release it (empty_cache, an out-of-memory retry) and a later capture
            # into it fails an internal assertion (torch 2.11).
            self._pool = torch.cuda.graph_pool_handle()

    def release(self) -> None:
        """Drop every captured graph and static buffer (a worker's failed warm-up, before it retries smaller):
        later rounds capture again."""
        self._drop_graphs()
        self.buffers.clear()
        self.seen.clear()

    def covering_shape(self, shape: ChunkShape, end: int) -> ChunkShape:
        """`shape`, or if it has no graph, the smallest captured graph that covers its rows (the same windows,
        caches and base, a larger bucket within the half ending at `end`). While calls join, a phase's half
        fills row by row and each smaller bucket would be captured inside a live tick (0.3–0.6 s each); the
        larger graph's idle rows cost GPU time that the full load spends anyway."""
        captured = self.captured
        if shape in captured:
            return shape
        covering = [
            s
            for s in captured
            if shape.bucket < s.bucket <= end - s.base and replace(s, bucket=shape.bucket) == shape
        ]
        return min(covering, key=lambda s: s.bucket, default=shape)

    def rows_of_batch(self, index: int) -> tuple[int, int]:
        """The store rows a flow batch holding the turn at row `index` may cover, [first, end): its tick phase's
        half of the store (`EstimatorStore.reserve`; the whole store without phases, and the rows past both
        halves if it grew), cut in groups of `MAX_BUCKET`."""
        half, rows = self.store.phase_rows, self.store.rows
        if half and index < half:
            first, end = 0, half
        elif half and index < 2 * half:
            first, end = half, 2 * half
        else:
            first, end = 2 * half, rows
        first += (index - first) // MAX_BUCKET * MAX_BUCKET
        return first, min(first + MAX_BUCKET, end, rows)

    def shape_of(self, windows: Sequence[WindowRow], base: int, end: int, n_steps: int) -> ChunkShape:
        """The padded shape of a batch based at store row `base`. Its bucket covers every open turn of rows
        base..end-1, not only those with a window now: a round in which a few turns end (their last windows)
        then replays the graph of the tick's main round instead of capturing a shape of its own."""
        lookahead = self.flow.lookahead
        outputs = max(len(w.tokens) - (0 if w.last_chunk else lookahead) for w in windows)
        longest = max(max(w.capacity, w.cache.conformer_att.shape[3]) for w in windows if w.cache is not None)
        owners = self.store.owners
        highest = max(w.slot.index for w in windows)
        highest = max([highest, *(i for i in range(highest, min(end, len(owners))) if owners[i])])
        # the store may hold fewer rows than the next power of two (it grows by 16)
        bucket = min(batch_bucket(highest - base + 1), end - base)
        return ChunkShape(bucket, token_slots(outputs), _round_up(longest, CACHE_GRANULE), n_steps, base)

    def _static_inputs(self, shape: ChunkShape) -> RaggedInputs | None:
        """Views of the shared static buffers for `shape`, growing them if needed (None: over budget)."""
        width = shape.token_slots + self.flow.lookahead
        frames = self.store.frames
        have = self.buffers.get(shape.cache_slots)
        if (
            have is None
            or have.rows < shape.bucket
            or have.tokens.shape[1] < width
            or have.conv.shape[0] < shape.n_steps
            or have.key_valid.shape[1] != frames
        ):
            rows = max(shape.bucket, 0 if have is None else have.rows)
            wide = max(width, 0 if have is None else have.tokens.shape[1])
            steps = max(shape.n_steps, 0 if have is None else have.conv.shape[0])
            need = RaggedInputs.row_bytes(self.flow, wide, shape.cache_slots, steps, frames) * rows
            if self.bytes_used - (0 if have is None else have.nbytes) + need > self.max_bytes:
                return None
            dropped = [s for s in self.chunks if s.cache_slots == shape.cache_slots]
            for old in dropped:
                del self.chunks[old]  # captured on the old buffers
            if dropped and self.graphs:
                self._pool = torch.cuda.graph_pool_handle()  # see `_drop_graphs`
            self.buffers.pop(shape.cache_slots, None)
            have = self.buffers[shape.cache_slots] = RaggedInputs.zeros(
                self.flow, rows, wide, shape.cache_slots, steps, frames
            )
        return have.view(shape.bucket, width, shape.token_slots * self.flow.up_rate, shape.n_steps)

    def run(
        self, windows: Sequence[WindowRow], n_steps: int, done: RowDone | None = None
    ) -> list[tuple[torch.Tensor, FlowCache]]:
        """Every window in padded batches: one per tick phase's half of the store and group of 64 rows
        (`rows_of_batch`). Tokens valid ids; non-final windows longer than the look-ahead; caches of any lengths;
        each window's turn once. Returns each window's (mel, new untrimmed cache), owned; `done` gets each
        window's index in `windows`."""
        if len({id(w.slot) for w in windows}) != len(windows):
            raise ValueError("a turn can have only one window per round")
        groups: dict[tuple[int, int], list[int]] = {}
        for i, w in enumerate(windows):
            if w.slot.closed or w.slot.store is not self.store:
                raise ValueError("a window's KV slot is closed or belongs to another flow")
            groups.setdefault(self.rows_of_batch(w.slot.index), []).append(i)
        results: list[tuple[torch.Tensor, FlowCache] | None] = [None] * len(windows)
        for (base, end), members in sorted(groups.items()):

            def group_done(k: int, mel: torch.Tensor, cache: FlowCache, members: list[int] = members) -> None:
                if done is not None:
                    done(members[k], mel, cache)

            part = self._run_group([windows[i] for i in members], base, end, n_steps, group_done)
            for i, result in zip(members, part, strict=True):
                results[i] = result
        return [r for r in results if r is not None]

    def _run_group(
        self, windows: Sequence[WindowRow], base: int, end: int, n_steps: int, done: RowDone
    ) -> list[tuple[torch.Tensor, FlowCache]]:
        flow, store = self.flow, self.store
        lookahead, low_layers, up_rate = flow.lookahead, len(flow.encoder.encoders), flow.up_rate
        need = max(w.slot.length + w.frames(lookahead, up_rate) for w in windows) + 1
        store.ensure(len(store.owners), need)  # only a window longer than 28 tokens can need more
        if store.version != self._store_version:
            self._drop_graphs()
            self.buffers.clear()
            self._store_version = store.version
        rows_of = [w.slot.index - base for w in windows]
        shape = self.covering_shape(self.shape_of(windows, base, end, n_steps), end)
        self.seen[shape] = self.seen.get(shape, 0) + 1
        self.calls += 1
        assert store.kv is not None
        kv_view = store.kv[:, :, 2 * base : 2 * (base + shape.bucket)]
        chunk = self.chunks.get(shape)
        if chunk is not None:
            claimed = chunk.inputs.fill(windows, rows_of, lookahead, low_layers, up_rate)
            outputs = chunk.run()
        else:
            # Not captured yet: with graphs on, fill the shared static buffers (no transient batch-sized
            # copy) and capture once the shape has been seen often enough; fresh zeros otherwise.
            static = self._static_inputs(shape) if self.graphs else None
            inputs = static
            if inputs is None:
                inputs = RaggedInputs.zeros(
                    flow,
                    shape.bucket,
                    shape.token_slots + lookahead,
                    shape.cache_slots,
                    n_steps,
                    store.frames,
                )
            claimed = inputs.fill(windows, rows_of, lookahead, low_layers, up_rate)
            if static is not None and self.seen[shape] >= self.capture_after:
                started = time.perf_counter()
                chunk = self.chunks[shape] = _Captured(flow, static, n_steps, kv_view, self._pool)
                log.info(
                    "flow graph %d captured in %.0f ms: %s (%d rows)",
                    len(self.chunks),
                    (time.perf_counter() - started) * 1e3,
                    shape,
                    len(windows),
                )
                outputs = chunk.run()
            else:
                outputs = inputs.forward(flow, n_steps, kv_view)
                if not self.graphs and self.seen[shape] >= self.capture_after:
                    self._eager_captured.add(shape)
        for w, positions in zip(windows, claimed, strict=True):
            w.slot.commit(positions)
        return split_rows(outputs, windows, rows_of, lookahead, low_layers, up_rate, done)
