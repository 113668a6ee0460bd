"""Static-shape LLM steps over the engine's slot KV cache, graph-captured per (rows, tokens) bucket.

A step runs `rows` consecutive KV slots as its batch, from slot 0 up or from the last slot down
(`graphs.row_window`: row i = slot first + i; the engine hands out the lowest free slot, or the highest for
the worker's second tick phase, so each phase's active slots stay dense at one end). Row i appends its first
`num_new[i]` of `T` input embeddings at its own length `cache.lengths[i]`; rows with `num_new = 0` (idle slots, free slots, padding up to the bucket) write nothing
and do not advance. Every shape is fixed by (rows, T, window): attention runs over the first `window` cache
positions with an additive mask built on the device from the lengths, so no host value enters the step and it
can be captured once and replayed.

Attention: one SDPA call per layer over the kv heads, the query heads of each group folded into the query rows
(`[rows, kv, group*T, hd]`), so the cache is read once and never repeated or gathered. KV writes are one
scatter per layer at per-row positions: padding entries all land on the slot's spare position past `max_len`,
which no attention window reaches.

Same function as `Qwen3ForCausalLM.forward` (tests compare them); it also returns float32 logits of each
row's last real token.

A *gathered* step instead names each row's slot (`slots [rows]`, any slots in any order): it writes the rows'
keys and values into their slots, copies those slots' rows of the cache out for the attention, and adds the
rows' counts to their lengths. The copy costs ~0.35 ms per row at the real size (every position of 36 layers),
so it pays for a prefill of a few sessions whose slots lie far apart (chat turns of both tick phases: a
window step would run every slot between them at the turn's length), not for decode steps.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F

from ..host_copy import upload
from ..modules.kv_cache import CacheFullError, SlotKVCache
from ..modules.qwen3 import Qwen3ForCausalLM
from .flex_decode import (
    FOLDED_FULL_BLOCKS,
    FOLDED_MAX_TOKENS,
    MAX_TOKENS,
    BlockMask,
    step_attention,
    step_block_mask,
)
from .fused import EAGER, LayerKernels, kernels_for, layer_weights, merge_projections
from .graphs import StaticStep, covering_window, graphs_available, new_pool, pick_bucket, row_window

log = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 128)
# 80: an omni unit (tail, <unit>, one frame's 66 positions, 10 audio positions) fits with no padding to 96
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 80, 96, 128, 192, 256)
# a step of fewer tokens never gathers its slots (the copy of their cache rows would cost more than it saves)
GATHER_MIN_TOKENS = 16
GATHERED = -1  # the `first` of a gathered step's key in `StaticLLM.steps`


_Cache = TypeVar("_Cache")


def rows_from(cache: _Cache, first: int) -> _Cache:
    """The slot cache seen from slot `first` on (views of the same storage; a slot cache's `lengths` too): the
    cache a static step over slots first.. runs on."""
    if first == 0:
        return cache
    view = copy.copy(cache)
    view.keys = [k[first:] for k in cache.keys]  # type: ignore[attr-defined]
    view.values = [v[first:] for v in cache.values]  # type: ignore[attr-defined]
    if isinstance(cache, SlotKVCache):
        view.lengths = cache.lengths[first:]  # type: ignore[attr-defined]
    return view


def dense_step_mask(positions: torch.Tensor, window: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive causal mask of a static step over the first `window` positions: row b's token t (at
    `positions[b, t]`) sees keys up to its own position; with the `group` query heads of a kv head folded into
    the query rows, `[b, 1, group*t, window]` (built once per step, not per layer)."""
    b, t = positions.shape
    key_pos = torch.arange(window, device=positions.device)
    allowed = key_pos[None, None, :] <= positions[:, :, None]  # [b, t, K]
    dense = torch.zeros(allowed.shape, dtype=dtype, device=positions.device).masked_fill(
        ~allowed, float("-inf")
    )
    return dense[:, None, None].expand(b, 1, group, t, window).reshape(b, 1, group * t, window)


def gathered_rows(
    layer: torch.Tensor, slots: torch.Tensor, write_idx: torch.Tensor, new: torch.Tensor
) -> torch.Tensor:
    """Write `new [b, kv, t, hd]` into the cache tensor `layer [S, kv, L+1, hd]` at slot `slots[i]`, positions
    `write_idx[i]`, then return those slots' rows `[b, kv, L+1, hd]` (a copy with the cache's own strides, so
    the attention kernels see the shapes a window step gives them). One flat `index_copy_`: no host value, so it
    can be captured."""
    _, kv, positions, hd = layer.shape
    heads = torch.arange(kv, device=layer.device)
    rows = slots[:, None, None] * kv + heads[None, :, None]  # [b, kv, 1]: (slot, head) rows of the cache
    flat = rows * positions + write_idx[:, None, :]  # [b, kv, t]
    layer.view(-1, hd).index_copy_(0, flat.reshape(-1), new.reshape(-1, hd).to(layer.dtype))
    return layer.index_select(0, slots)


def slot_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    write_idx: torch.Tensor,
    mask: torch.Tensor | BlockMask,
    window: int,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write the step's k, v `[b, kv, t, hd]` into the slot cache (rows 0..b-1, or with `slots` row i's slot
    `slots[i]`), attend q `[b, heads, t, hd]` over the first `window` positions; returns `[b, t, heads*hd]`."""
    b, h, t, hd = q.shape
    kv = k.shape[1]
    if slots is None:
        idx = write_idx[:, None, :, None].expand(b, kv, t, hd)
        kc, vc = keys[:b], values[:b]
        kc.scatter_(2, idx, k.to(kc.dtype))
        vc.scatter_(2, idx, v.to(vc.dtype))
    else:
        kc, vc = gathered_rows(keys, slots, write_idx, k), gathered_rows(values, slots, write_idx, v)
    if isinstance(mask, BlockMask) and t <= MAX_TOKENS:  # through FlexAttention (`flex_decode`)
        out = step_attention(q, kc[:, :, :window], vc[:, :, :window], mask, decode=True)
        return out.transpose(1, 2).reshape(b, t, h * hd)
    group = h // kv
    # heads kv_i*group .. kv_i*group+group-1 share kv head kv_i: fold them into query rows (g, t)
    qf = q.reshape(b, kv, group * t, hd)
    if isinstance(mask, BlockMask):
        out = step_attention(qf, kc[:, :, :window], vc[:, :, :window], mask)
    else:
        out = F.scaled_dot_product_attention(qf, kc[:, :, :window], vc[:, :, :window], attn_mask=mask)
    return out.reshape(b, h, t, hd).transpose(1, 2).reshape(b, t, h * hd)  # SDPA may return a strided view


def static_forward(
    llm: Qwen3ForCausalLM,
    cache: SlotKVCache,
    embeds: torch.Tensor,
    num_new: torch.Tensor,
    window: int,
    flex: bool = False,
    kernels: LayerKernels = EAGER,
    flex_folded: bool = False,
    slots: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """embeds `[rows, T, D]` for slots 0..rows-1, or with `slots` for slots `slots[i]` (a gathered step; rows
    that take no token may repeat a slot); `num_new [rows]` real tokens per row (0 = untouched).
    flex: one-token steps attend through FlexAttention (rows read only their own cache blocks); flex_folded: so
    do steps of up to `FOLDED_MAX_TOKENS`, with the query heads folded into the query rows. kernels: the layer
    halves around the attention (`fused`: compiled on a GPU)."""
    b, t, _ = embeds.shape
    device = embeds.device
    lengths = cache.lengths[:b] if slots is None else cache.lengths.index_select(0, slots)
    offsets = torch.arange(t, device=device)
    positions = lengths[:, None] + offsets[None, :]  # [b, t]
    valid = offsets[None, :] < num_new[:, None]
    # padding entries all go to the slot's spare position (past max_len, never read)
    write_idx = torch.where(valid, positions % cache.max_len, cache.max_len)
    mask: torch.Tensor | BlockMask
    group = llm.config.num_attention_heads // llm.config.num_key_value_heads
    if flex and t <= MAX_TOKENS:
        mask = step_block_mask(lengths, num_new, t, window)
    elif flex_folded and MAX_TOKENS < t <= FOLDED_MAX_TOKENS:
        mask = step_block_mask(lengths, num_new, t, window, group, full_blocks=FOLDED_FULL_BLOCKS)
    else:
        mask = dense_step_mask(positions, window, group, embeds.dtype)
    cos, sin = llm.model.rotary(positions, embeds.dtype)
    x = embeds
    for i, layer in enumerate(llm.model.layers):
        w = layer_weights(layer)
        eps = layer.input_layernorm.eps
        hd = layer.self_attn.head_dim
        q, k, v = kernels.inputs(w, x, cos, sin, eps, hd)
        out = slot_attention(q, k, v, cache.keys[i], cache.values[i], write_idx, mask, window, slots)
        x = kernels.output(w, x, out, eps)
    if slots is None:
        lengths.add_(num_new)
    else:
        cache.lengths.index_add_(0, slots, num_new)
    hidden = llm.model.norm(x)
    last = hidden[torch.arange(b, device=device), (num_new - 1).clamp(min=0)]
    return {"hidden": hidden, "logits": llm.logits(last)}


class StaticLLM:
    """Bucketed static steps of one LLM + cache; graphs on CUDA (captured lazily or by `warm_up`)."""

    def __init__(
        self,
        llm: Qwen3ForCausalLM,
        cache: SlotKVCache,
        window: int | None = None,
        row_buckets: Sequence[int] = ROW_BUCKETS,
        token_buckets: Sequence[int] = TOKEN_BUCKETS,
        use_graphs: bool | None = None,
        flex_decode: bool = False,
        fused: bool = False,
        flex_prefill: bool | None = None,
    ) -> None:
        self.llm, self.cache = llm, cache
        self.flex_decode = flex_decode
        self.flex_prefill = flex_decode if flex_prefill is None else flex_prefill
        self.kernels = kernels_for(cache.lengths.device, fused)
        if self.kernels.compiled:
            for layer in llm.model.layers:
                merge_projections(layer)
            torch.cuda.empty_cache()  # the separate weights' freed blocks go back (they fit no later tensor)
        self.window = window or cache.max_len
        if not 0 < self.window <= cache.max_len:
            raise ValueError(f"window {self.window} must lie in 1..{cache.max_len}")
        self.device = cache.lengths.device
        self.row_buckets = sorted({min(b, cache.num_slots) for b in row_buckets} | {cache.num_slots})
        self.token_buckets = sorted(token_buckets)
        self.use_graphs = graphs_available(self.device) if use_graphs is None else use_graphs
        self.pool = new_pool(self.device) if self.use_graphs else None
        self.steps: dict[tuple[int, int], StaticStep] = {}
        # (rows, tokens) of the window steps whose kernels are built: captured, or run once (`compile_shape`)
        self.built_shapes: set[tuple[int, int]] = set()
        self.dim = llm.config.hidden_size
        self.dtype = llm.lm_head.weight.dtype

    def _step(self, rows: int, tokens: int, first: int = 0) -> StaticStep:
        """The step over `rows` slots from `first` (`GATHERED`: over the slots named in its `slots` input)."""
        key = (first, rows, tokens)
        if key not in self.steps:
            inputs = {
                "embeds": torch.zeros(rows, tokens, self.dim, dtype=self.dtype, device=self.device),
                "num_new": torch.zeros(rows, dtype=torch.long, device=self.device),
            }
            if first == GATHERED:
                inputs["slots"] = torch.zeros(rows, dtype=torch.long, device=self.device)

            def fn(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
                if first == GATHERED:
                    return self._forward(x["embeds"], x["num_new"], slots=x["slots"])
                return self._forward(x["embeds"], x["num_new"], first)

            def idle(x: dict[str, torch.Tensor]) -> None:
                x["num_new"].zero_()
                if first == GATHERED:  # idle rows write only slot 0's spare position
                    x["slots"].zero_()

            try:
                self.steps[key] = StaticStep(fn, inputs, idle, self.use_graphs, self.pool)
                if first != GATHERED:
                    self.built_shapes.add((rows, tokens))
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception:
                folded = self.flex_prefill and MAX_TOKENS < tokens <= FOLDED_MAX_TOKENS
                if not (folded or (self.flex_decode and tokens <= MAX_TOKENS) or self.kernels.compiled):
                    raise
                # a compiled kernel is unavailable here (no Triton toolchain, a compile error): a longer step
                # gives up the folded FlexAttention, any other the compiled parts. The old graphs go, and so
                # does their pool: capturing again into a pool whose graphs were destroyed fails an allocator
                # assertion.
                log.exception(
                    "a compiled step (%d rows, %d tokens) failed to build; falling back", rows, tokens
                )
                if folded:
                    self.flex_prefill = False
                else:
                    self.flex_decode = self.flex_prefill = False
                    self.kernels = EAGER
                self.steps.clear()
                self.pool = new_pool(self.device) if self.use_graphs else None
                return self._step(rows, tokens, first)
        return self.steps[key]

    def warm_up(self, rows: int, tokens: Sequence[int] = (1,), top: bool = False) -> None:
        """Capture the steps a batch up to `rows` slots will use (graph capture costs a few 100 ms each): the
        lowest slots', or with `top` the highest slots' (the second tick phase's)."""
        r = pick_bucket(self.row_buckets, rows)
        for t in tokens:
            self._step(r, pick_bucket(self.token_buckets, t), self.cache.num_slots - r if top else 0)

    def warm_up_gathered(self, rows: int, tokens: Sequence[int]) -> None:
        """Capture the gathered steps of every row bucket up to `rows` (a tick's few prefills anywhere in the
        cache, `feed`): the only ones `feed` runs."""
        for r in self.row_buckets:
            if r <= pick_bucket(self.row_buckets, rows):
                for t in tokens:
                    self._step(r, pick_bucket(self.token_buckets, t), GATHERED)

    def _forward(
        self, embeds: torch.Tensor, num_new: torch.Tensor, first: int = 0, slots: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        return static_forward(
            self.llm,
            rows_from(self.cache, first),
            embeds,
            num_new,
            self.window,
            self.flex_decode,
            self.kernels,
            self.flex_prefill,
            slots,
        )

    def gathered_shape(
        self, count: int, tokens: int, window_cost: int | None = None
    ) -> tuple[int, int] | None:
        """`(rows, tokens)` of the gathered step `feed` runs `count` rows of up to `tokens` tokens as, or None: the
        smallest one built (by the warm-up: a live tick never captures one) that holds them, for a prefill long
        enough for its cache copy to pay (`GATHER_MIN_TOKENS`), if it runs at most half the token rows of the
        window step it replaces (`window_cost`: rows × tokens; None: any)."""
        if tokens < GATHER_MIN_TOKENS:
            return None
        fits = [(r * t, r, t) for f, r, t in self.steps if f == GATHERED and r >= count and t >= tokens]
        if not fits:
            return None
        cost, rows, width = min(fits)
        if window_cost is not None and 2 * cost > window_cost:
            return None
        return rows, width

    @torch.no_grad()
    def compile_shape(self, rows: int, tokens: int) -> None:
        """Run the step of this shape once, eagerly and idle (no row takes a token), so that the kernels it
        compiles on a GPU are built now; unlike `warm_up` it keeps no graph (whose outputs would hold memory)."""
        r = pick_bucket(self.row_buckets, rows)
        t = pick_bucket(self.token_buckets, tokens)
        embeds = torch.zeros(r, t, self.dim, dtype=self.dtype, device=self.device)
        self._forward(embeds, torch.zeros(r, dtype=torch.long, device=self.device))
        self.built_shapes.add((r, t))

    def accepts(self, slots: Sequence[int], counts: Sequence[int]) -> bool:
        """Whether one static step can take these rows (else the caller runs the eager forward)."""
        return max(slots) < self.cache.num_slots and max(counts) <= self.token_buckets[-1]

    @torch.no_grad()
    def feed(
        self,
        slots: Sequence[int],
        pieces: Sequence[torch.Tensor],
        lengths: Sequence[int] | None = None,
        hidden: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Append `pieces[i]` (`[T_i, D]`) to slot `slots[i]` in one static step.

        Returns, for the given slots in their order, `logits [n, V]` (float32, at each row's last real token)
        and, unless `hidden` is False, `hidden [n, T, D]`; copies, so they outlive the next step (a caller that
        needs only the logits spares the hidden states' copy). `lengths` are the slots' current lengths
        if the caller knows them: the room check then reads nothing from the device, and the step is only
        queued (the slot indices and counts are copied asynchronously).
        """
        if len(slots) != len(pieces) or not slots:
            raise ValueError("one piece per slot, at least one")
        if len(set(slots)) != len(slots):
            raise ValueError("a slot appears twice in one step")
        counts = [int(p.shape[0]) for p in pieces]
        if lengths is None:
            # one device read (indexing by a Python list would first copy the index from pageable memory)
            lengths = self.cache.lengths.index_select(0, upload(list(slots), self.device)).tolist()
        cur = list(lengths)
        if any(c + n > self.window for c, n in zip(cur, counts, strict=True)):
            raise CacheFullError(f"a slot would pass the attention window of {self.window} positions")
        tokens = pick_bucket(self.token_buckets, max(counts))
        # a captured step's rows if one holds these slots: its idle rows cost less than a capture (a few 100 ms)
        # in a live tick
        captured = ((f, r) for f, r, t in self.steps if t == tokens and f != GATHERED)
        first, rows = covering_window(captured, slots) or row_window(
            self.row_buckets, self.cache.num_slots, slots
        )
        gathered = self.gathered_shape(len(slots), max(counts), rows * tokens)
        if gathered is not None:
            first, (rows, tokens) = GATHERED, gathered
            idx = torch.arange(len(slots), device=self.device)
        else:
            idx = upload([s - first for s in slots], self.device)
        step = self._step(rows, tokens, first)
        if first == GATHERED:  # rows past the real ones take no token: slot 0 stands in for them
            named = step.inputs["slots"]
            named.zero_()
            named[: len(slots)].copy_(upload(list(slots), self.device))
        if all(c == tokens for c in counts):
            batch = torch.stack(list(pieces))
        else:
            batch = pieces[0].new_zeros(len(pieces), tokens, self.dim)
            for i, p in enumerate(pieces):
                batch[i, : p.shape[0]] = p
        emb, num = step.inputs["embeds"], step.inputs["num_new"]
        emb.zero_()
        emb.index_copy_(0, idx, batch.to(emb.dtype))
        num.zero_()
        num.index_copy_(0, idx, upload(counts, self.device))
        out = step.run()
        rows = {"logits": out["logits"].index_select(0, idx)}
        if hidden:
            rows["hidden"] = out["hidden"].index_select(0, idx)
        return rows
