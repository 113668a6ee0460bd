"""Static-shape steps of the TTS speech-token LM over a `TTSKVCache`, graph-captured per (rows, tokens) bucket,
and a batched duplex unit (`generate_codes`) that draws every speaking session's codes with no host sync per
step: after the condition step, all the unit's draws (scores, draw, feed) are one static step (`draw_loop`),
so on a GPU the whole unit replays as two graphs.

Row i of a step is TTS cache slot first + i (a bucket of slots from either end, `graphs.row_window`);
`lengths [slots]` (a device tensor owned by the caller) is how many positions each slot holds. The layout, mask and attention are `static_decode`'s (`dense_step_mask`,
`slot_attention`; the TTS has as many kv heads as query heads, so nothing is folded). The step returns float32
code logits at each row's last real token.

Sampling follows `tts_sampling.code_distribution` for the duplex settings (temperature, repetition penalty over
this call's last `window` codes, EOS forbidden before `min_new` draws, no top-k/top-p), vectorized over rows;
the draw is a Gumbel-max draw (argmax of scores + Gumbel noise, which picks code c with probability
softmax(scores)[c]) from uniform noise that one generator makes for the whole batch before the loop, so
draws differ from the per-session generators of `MiniCPMTTS.generate_chunks` (same distribution).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from ..host_copy import upload
from ..modules.tts import DUPLEX_MAX_DRAWS, MiniCPMTTS
from ..modules.tts_backbone import LLAMA_ROPE_THETA, TTSKVCache, rope_cos_sin
from ..modules.tts_sampling import DUPLEX_SAMPLING, TURN_SAMPLING, CodeSampling, keep_top_k, keep_top_p
from .flex_decode import BlockMask, flex_available, step_block_mask
from .fused import EAGER, LayerKernels, kernels_for, layer_weights, merge_projections
from .graphs import StaticStep, covering_window, graphs_available, new_pool, pick_bucket, row_window
from .static_decode import ROW_BUCKETS, dense_step_mask, rows_from, slot_attention

log = logging.getLogger(__name__)

TTS_TOKEN_BUCKETS = (1, 8, 16, 32, 64)
# TTS positions a slot holds by default: a spoken turn longer than this (about 12 s of speech: a speaking
# unit adds up to ~45) restarts its TTS context. 1024 would not fit 64 sessions of 4k context on an 80 GB card
TTS_WINDOW = 512
# draws of one turn-based piece loop call: a `TTSStreamer` piece (25 codes, 1 s of speech)
PIECE_DRAWS = 25


def static_tts_forward(
    tts: MiniCPMTTS,
    cache: TTSKVCache,
    lengths: torch.Tensor,
    embeds: torch.Tensor,
    num_new: torch.Tensor,
    window: int,
    kernels: LayerKernels = EAGER,
    flex: bool = False,
) -> dict[str, torch.Tensor]:
    """One static step; `flex`: a one-token step (a draw) attends through FlexAttention's decoding kernel,
    which reads only the key blocks each row holds (the dense mask reads the whole window)."""
    b, t, _ = embeds.shape
    device = embeds.device
    backbone = tts.model
    lens = lengths[:b]
    offsets = torch.arange(t, device=device)
    positions = lens[:, None] + offsets[None, :]
    valid = offsets[None, :] < num_new[:, None]
    write_idx = torch.where(valid, positions % cache.capacity, cache.capacity)  # padding: the spare
    first = backbone.layers[0].self_attn
    mask: torch.Tensor | BlockMask
    if flex and t == 1:
        mask = step_block_mask(lens, num_new, 1, window)
    else:
        mask = dense_step_mask(positions, window, first.heads // first.kv_heads, embeds.dtype)
    cos, sin = rope_cos_sin(positions, backbone.head_dim, LLAMA_ROPE_THETA, embeds.dtype)
    x = embeds
    for i, layer in enumerate(backbone.layers):
        w = layer_weights(layer)
        eps = layer.input_layernorm.eps
        q, k, v = kernels.inputs(w, x, cos, sin, eps, layer.self_attn.head_dim)
        out = slot_attention(q, k, v, cache.keys[i], cache.values[i], write_idx, mask, window)
        x = kernels.output(w, x, out, eps)
    lens.add_(num_new)
    hidden = backbone.norm(x)
    last = hidden[torch.arange(b, device=device), (num_new - 1).clamp(min=0)]
    return {"logits": tts.head_code[0](last).float()}


def duplex_scores(
    logits: torch.Tensor, history: torch.Tensor, forbid_eos: torch.Tensor, sampling: CodeSampling, eos: int
) -> torch.Tensor:
    """Final logits `[B, V]` (softmax gives `code_distribution`'s probabilities) from raw head logits, this
    call's draws so far `history [B, j]` (-1 = no draw) and a `[B]` EOS ban, without top-k/top-p."""
    b, vocab = logits.shape
    temperature = torch.full((1, 1), sampling.temperature, dtype=torch.float32, device=logits.device)
    scores = logits.float() / temperature
    if sampling.repetition_penalty != 1.0 and history.shape[1]:
        hist = history[:, -sampling.window :]
        hist = hist.masked_fill(hist < 0, vocab)  # the extra column is dropped after counting
        counts = torch.zeros(b, vocab + 1, dtype=torch.long, device=logits.device)
        counts.scatter_add_(1, hist, torch.ones_like(hist))
        alpha = torch.pow(sampling.repetition_penalty, counts[:, :vocab]).to(scores.dtype)
        scores = torch.where(scores < 0, scores * alpha, scores / alpha)
    ban = forbid_eos[:, None] & (torch.arange(vocab, device=logits.device) == eos)[None, :]
    return scores.masked_fill(ban, float("-inf"))


def gumbel(uniform: torch.Tensor) -> torch.Tensor:
    """Gumbel noise from uniform draws in [0, 1)."""
    return -torch.log(-torch.log(uniform.clamp(1e-10, 1.0 - 1e-7)))


def feed_codes(
    tts: MiniCPMTTS,
    cache: TTSKVCache,
    lengths: torch.Tensor,
    codes: torch.Tensor,
    rows: torch.Tensor,
    window: int,
    kernels: LayerKernels,
    flex: bool,
) -> torch.Tensor:
    """Feed each row's drawn code back where `rows [B]` (one static TTS step): the logits of its next draw."""
    emb = tts.emb_code[0](codes.clamp(0, tts.emb_code[0].num_embeddings - 1))[:, None]
    step = static_tts_forward(
        tts, cache, lengths, emb.to(cache.keys[0].dtype), rows.long(), window, kernels, flex
    )
    return step["logits"]


def draw_loop(
    tts: MiniCPMTTS,
    cache: TTSKVCache,
    lengths: torch.Tensor,
    window: int,
    sampling: CodeSampling,
    x: dict[str, torch.Tensor],
    kernels: LayerKernels = EAGER,
    flex: bool = False,
) -> dict[str, torch.Tensor]:
    """All draws of a duplex unit for rows 0..B-1, from the condition step's `logits [B, V]`.

    Inputs: `active [B]` (rows that draw), `mins [B]` (EOS allowed from this draw on), `noise [D, B, V]`
    (uniform), `forced [D, B]` with `use_forced [B]` (teacher forcing, tests). Each active row draws until EOS
    or D draws; every draw but a row's last is fed back (EOS and the D-th draw are not). Returns
    `draws [B, D]` (-1 after a row stopped)."""
    logits, active = x["logits"], x["active"].clone()
    b = logits.shape[0]
    max_new = x["noise"].shape[0]
    eos = tts.eos_id
    draws = torch.full((b, max_new), -1, dtype=torch.long, device=logits.device)
    for j in range(max_new):
        scores = duplex_scores(logits, draws[:, :j], x["mins"] > j, sampling, eos)
        code = (scores + gumbel(x["noise"][j])).argmax(-1)
        code = torch.where(x["use_forced"], x["forced"][j], code)
        draws[:, j] = torch.where(active, code, torch.full_like(code, -1))
        active = active & (code != eos)
        if j == max_new - 1:
            break
        logits = feed_codes(tts, cache, lengths, code, active, window, kernels, flex)
    return {"draws": draws}


def turn_scores(
    logits: torch.Tensor,
    history: torch.Tensor,
    forbid_eos: torch.Tensor,
    warp: torch.Tensor,
    sampling: CodeSampling,
    eos: int,
) -> torch.Tensor:
    """`code_distribution`'s steps before its softmax, on the device for a batch: temperature, the repetition
    penalty over `history [B, j]` (-1 = none), top-p then top-k on the rows where `warp [B]`, then the EOS ban."""
    scores = duplex_scores(logits, history, torch.zeros_like(forbid_eos), sampling, eos)
    if sampling.top_p is not None or sampling.top_k is not None:
        warped = scores
        if sampling.top_p is not None:
            warped = keep_top_p(warped, sampling.top_p, sampling.min_tokens_to_keep)
        if sampling.top_k is not None:
            warped = keep_top_k(warped, sampling.top_k, sampling.min_tokens_to_keep)
        scores = torch.where(warp[:, None], warped, scores)
    ban = forbid_eos[:, None] & (torch.arange(scores.shape[1], device=scores.device) == eos)[None, :]
    return scores.masked_fill(ban, float("-inf"))


def piece_loop(
    tts: MiniCPMTTS,
    cache: TTSKVCache,
    lengths: torch.Tensor,
    window: int,
    sampling: CodeSampling,
    x: dict[str, torch.Tensor],
    kernels: LayerKernels = EAGER,
    flex: bool = False,
) -> dict[str, torch.Tensor]:
    """Up to D draws of turn-based speech for rows 0..B-1 (a `TTSStreamer` piece each), from `logits [B, V]`,
    each row's next draw.

    Inputs: `active [B]`, `history [B, W]` (the codes of the row's turn the repetition penalty sees before this
    call, -1 = none), `warp [B]` (top-k/top-p on the first draw too; later draws always), `mins [B]` (EOS allowed
    from this call's draw `mins` on), `left [B]` (draws the row's text chunk still allows), `noise [D, B, V]`
    (uniform). A row stops at EOS or when `left` runs out. Every draw that another draw of its chunk follows is
    fed back, the call's last one too, so the returned `logits [B, V]` start the row's next call. Returns those
    and `draws [B, D]` (-1 where the row did not draw)."""
    logits, active = x["logits"], x["active"].clone()
    b = logits.shape[0]
    draws_max = x["noise"].shape[0]
    eos = tts.eos_id
    draws = torch.full((b, draws_max), -1, dtype=torch.long, device=logits.device)
    for j in range(draws_max):
        alive = active & (x["left"] > j)
        history = torch.cat([x["history"], draws[:, :j]], dim=1)
        warp = x["warp"] | (j > 0)
        scores = turn_scores(logits, history, x["mins"] > j, warp, sampling, eos)
        code = (scores + gumbel(x["noise"][j])).argmax(-1)
        draws[:, j] = torch.where(alive, code, torch.full_like(code, -1))
        fed = alive & (code != eos) & (x["left"] > j + 1)
        logits = torch.where(
            fed[:, None], feed_codes(tts, cache, lengths, code, fed, window, kernels, flex), logits
        )
        active = fed
    return {"draws": draws, "logits": logits}


class StaticTTS:
    """The TTS LM with its own slot cache (slot i = LLM KV slot i of the engine) and bucketed static steps."""

    def __init__(
        self,
        tts: MiniCPMTTS,
        num_slots: int,
        window: int = TTS_WINDOW,
        row_buckets: Sequence[int] = ROW_BUCKETS,
        token_buckets: Sequence[int] = TTS_TOKEN_BUCKETS,
        use_graphs: bool | None = None,
        fused: bool = False,
    ) -> None:
        self.tts = tts
        self.cache = tts.new_cache(num_slots, window)
        w = tts.emb_text.weight
        self.device, self.dtype = w.device, w.dtype
        self.lengths = torch.zeros(num_slots, dtype=torch.long, device=self.device)
        self.window = window
        self.num_slots = num_slots
        self.row_buckets = sorted({min(b, num_slots) for b in row_buckets} | {num_slots})
        self.token_buckets = sorted(token_buckets)
        self.use_graphs = graphs_available(self.device) if use_graphs is None else use_graphs
        self.kernels = kernels_for(self.device, fused)
        # draws through FlexAttention where it compiles (a GPU with graphs, as the LLM's steps)
        self.flex = flex_available(self.device) and self.use_graphs
        if self.kernels.compiled:
            for layer in tts.model.layers:
                merge_projections(layer)
            torch.cuda.empty_cache()  # the separate weights' freed blocks go back (they fit no later tensor)
        self.pool = new_pool(self.device) if self.use_graphs else None
        self.steps: dict[tuple[int, int, int], StaticStep] = {}
        self.loops: dict[tuple[int, int, int, CodeSampling], StaticStep] = {}
        self.piece_loops: dict[tuple[int, int, int, CodeSampling], StaticStep] = {}
        # turn-based pieces through `draw_pieces` (else one draw at a time): where graphs make it pay. On the CPU
        # the loop's padded rows and draws past a piece cost more than a draw's launches and syncs save (the chat
        # bench's TTS stage at 16 tiny sessions: 146 ms a tick against 79)
        self.piece_loop = self.use_graphs
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(0)
        self.last_hit_eos: list[bool] = []  # per slot of the last generate_codes call: its final draw was EOS

    def _step(self, rows: int, tokens: int, first: int = 0) -> StaticStep:
        key = (first, rows, tokens)
        if key not in self.steps:
            h = self.tts.config.hidden_size
            inputs = {
                "embeds": torch.zeros(rows, tokens, h, dtype=self.dtype, device=self.device),
                "num_new": torch.zeros(rows, dtype=torch.long, device=self.device),
            }

            cache, lengths = rows_from(self.cache, first), self.lengths[first:]

            def fn(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
                return static_tts_forward(
                    self.tts, cache, lengths, x["embeds"], x["num_new"], self.window, self.kernels, self.flex
                )

            def idle(x: dict[str, torch.Tensor]) -> None:
                x["num_new"].zero_()

            step = self._build(fn, inputs, idle)
            if step is None:
                return self._step(rows, tokens, first)
            self.steps[key] = step
        return self.steps[key]

    def _build(
        self,
        fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
        inputs: dict[str, torch.Tensor],
        idle: Callable[[dict[str, torch.Tensor]], None],
    ) -> StaticStep | None:
        """The captured step, or None after falling back (a compiled kernel failed to build: first the
        FlexAttention draws, then the compiled layer halves; the caller builds again; old graphs and their pool
        go, as in `StaticLLM`)."""
        try:
            return StaticStep(fn, inputs, idle, self.use_graphs, self.pool)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception:
            if not (self.flex or self.kernels.compiled):
                raise
            log.exception("a compiled TTS step failed to build; falling back")
            if self.flex:
                self.flex = False
            else:
                self.kernels = EAGER
            self.steps.clear()
            self.loops.clear()
            self.piece_loops.clear()
            self.pool = new_pool(self.device) if self.use_graphs else None
            return None

    def _loop(self, rows: int, max_new: int, sampling: CodeSampling, first: int = 0) -> StaticStep:
        key = (first, rows, max_new, sampling)
        while key not in self.loops:  # again after a fallback (`_build` dropped every step)
            vocab = self.tts.head_code[0].out_features
            dev = self.device
            inputs = {
                "logits": torch.zeros(rows, vocab, dtype=torch.float32, device=dev),
                "active": torch.zeros(rows, dtype=torch.bool, device=dev),
                "mins": torch.zeros(rows, dtype=torch.long, device=dev),
                "noise": torch.full((max_new, rows, vocab), 0.5, dtype=torch.float32, device=dev),
                "forced": torch.zeros(max_new, rows, dtype=torch.long, device=dev),
                "use_forced": torch.zeros(rows, dtype=torch.bool, device=dev),
            }
            self._build_loop(self.loops, key, draw_loop, inputs, sampling, first)
        return self.loops[key]

    def _build_loop(
        self,
        table: dict[tuple[int, int, int, CodeSampling], StaticStep],
        key: tuple[int, int, int, CodeSampling],
        body: Callable[..., dict[str, torch.Tensor]],
        inputs: dict[str, torch.Tensor],
        sampling: CodeSampling,
        first: int,
    ) -> None:
        """A draw loop (`draw_loop` or `piece_loop`) over rows first.. as one static step, filed in `table`
        unless the build fell back (then the caller builds again)."""
        cache, lengths = rows_from(self.cache, first), self.lengths[first:]

        def fn(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return body(self.tts, cache, lengths, self.window, sampling, x, self.kernels, self.flex)

        def idle(x: dict[str, torch.Tensor]) -> None:
            x["active"].zero_()

        step = self._build(fn, inputs, idle)
        if step is not None:
            table[key] = step

    def warm_up(
        self,
        rows: int,
        condition_tokens: int = TTS_TOKEN_BUCKETS[-1],
        sampling: CodeSampling = DUPLEX_SAMPLING,
        top: bool = False,
    ) -> None:
        """Capture the steps of up to `rows` speaking slots (the lowest slots', or with `top` the highest): the
        draw loop, and the condition step at every token bucket up to `condition_tokens`' (a unit's condition
        is its text tokens, so its bucket changes from unit to unit)."""
        r = pick_bucket(self.row_buckets, rows)
        first = self.num_slots - r if top else 0
        for tokens in self.token_buckets:
            if tokens <= pick_bucket(self.token_buckets, condition_tokens):
                self._step(r, tokens, first)
        self._loop(r, DUPLEX_MAX_DRAWS, sampling, first)

    @torch.no_grad()
    def compile_shape(self, rows: int) -> None:
        """Run one idle draw step of this row bucket eagerly (nothing written, no graph kept): on a GPU it
        builds the row bucket's FlexAttention decoding kernel (one per row count) before a live tick needs it."""
        r = pick_bucket(self.row_buckets, rows)
        h = self.tts.config.hidden_size
        embeds = torch.zeros(r, 1, h, dtype=self.dtype, device=self.device)
        num_new = torch.zeros(r, dtype=torch.long, device=self.device)
        static_tts_forward(
            self.tts, self.cache, self.lengths, embeds, num_new, self.window, self.kernels, self.flex
        )

    def _rows(self, slots: Sequence[int], max_new: int, sampling: CodeSampling) -> tuple[int, int]:
        """A captured draw loop's rows if one holds these slots: a loop's capture (every draw of the unit) takes
        seconds, far more than its idle rows cost."""
        captured = ((f, r) for f, r, m, s in self.loops if m == max_new and s == sampling)
        return covering_window(captured, slots) or row_window(self.row_buckets, self.num_slots, slots)

    @torch.no_grad()
    def feed(
        self, slots: Sequence[int], pieces: Sequence[torch.Tensor], starts: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Append `pieces[i]` (`[L_i, hidden]` embeddings) to slot `slots[i]` (at position `starts[i]` when given,
        else where the slot is) in static steps; returns float32 code logits `[n, V]` at each piece's last
        position. A piece longer than the largest token bucket goes in several steps (a turn-based TTS chunk
        recomputes its previous chunk: a few hundred positions)."""
        n = len(slots)
        if n == 0 or n != len(pieces) or len(set(slots)) != n:
            raise ValueError("one piece per slot, each slot once, at least one")
        device = self.device
        if starts is not None:
            if any(s + int(p.shape[0]) > self.window for s, p in zip(starts, pieces, strict=True)):
                raise ValueError(f"a TTS slot would pass its window of {self.window} positions")
            self.lengths.index_copy_(0, upload(list(slots), device), upload(list(starts), device))
        most = self.token_buckets[-1]
        left = list(pieces)
        logits = torch.zeros(n, self.tts.head_code[0].out_features, dtype=torch.float32, device=device)
        while True:
            ready = [i for i, p in enumerate(left) if p.shape[0]]
            if not ready:
                return logits
            now = [left[i][:most] for i in ready]
            step_slots = [slots[i] for i in ready]
            tokens = pick_bucket(self.token_buckets, max(int(p.shape[0]) for p in now))
            captured = ((f, r) for f, r, t in self.steps if t == tokens)
            first, rows = covering_window(captured, step_slots) or row_window(
                self.row_buckets, self.num_slots, step_slots
            )
            step = self._step(rows, tokens, first)
            idx = upload([s - first for s in step_slots], device)
            batch = now[0].new_zeros(len(now), tokens, now[0].shape[-1])
            for k, p in enumerate(now):
                batch[k, : p.shape[0]] = p
            step.inputs["embeds"].zero_()
            step.inputs["embeds"].index_copy_(0, idx, batch.to(self.dtype))
            step.inputs["num_new"].zero_()
            step.inputs["num_new"].index_copy_(0, idx, upload([int(p.shape[0]) for p in now], device))
            out = step.run()["logits"].index_select(0, idx)
            logits.index_copy_(0, upload(ready, device), out)
            for i in ready:
                left[i] = left[i][most:]

    # ---- turn-based pieces (chat) ----------------------------------------------------------------------------
    def _piece_loop(self, rows: int, draws: int, sampling: CodeSampling, first: int = 0) -> StaticStep:
        key = (first, rows, draws, sampling)
        while key not in self.piece_loops:  # again after a fallback (`_build` dropped every step)
            vocab = self.tts.head_code[0].out_features
            dev = self.device
            # the duplex loop of the same rows has a noise buffer at least this long: shared (the two never run
            # at once), so the pieces' graphs add no batch-sized buffer of their own
            shared = next(
                (
                    step.inputs["noise"][:draws]
                    for (f, r, m, _), step in self.loops.items()
                    if f == first and r == rows and m >= draws
                ),
                None,
            )
            noise = (
                torch.full((draws, rows, vocab), 0.5, dtype=torch.float32, device=dev)
                if shared is None
                else shared
            )
            inputs = {
                "logits": torch.zeros(rows, vocab, dtype=torch.float32, device=dev),
                "active": torch.zeros(rows, dtype=torch.bool, device=dev),
                "history": torch.full((rows, sampling.window), -1, dtype=torch.long, device=dev),
                "warp": torch.zeros(rows, dtype=torch.bool, device=dev),
                "mins": torch.zeros(rows, dtype=torch.long, device=dev),
                "left": torch.zeros(rows, dtype=torch.long, device=dev),
                "noise": noise,
            }
            self._build_loop(self.piece_loops, key, piece_loop, inputs, sampling, first)
        return self.piece_loops[key]

    def warm_up_pieces(
        self, rows: int, draws: int = PIECE_DRAWS, sampling: CodeSampling = TURN_SAMPLING, top: bool = False
    ) -> None:
        """Capture the turn-based piece loop of up to `rows` slots (the lowest, or with `top` the highest): its
        capture takes seconds, which a chat reply must not wait for in a live tick. If it cannot be built, chat
        draws one code at a time (`piece_loop` off) and the worker starts anyway."""
        if not self.piece_loop:
            return
        r = pick_bucket(self.row_buckets, rows)
        try:
            self._piece_loop(r, draws, sampling, self.num_slots - r if top else 0)
        except torch.cuda.OutOfMemoryError:
            raise  # the worker's warm-up retries with fewer sessions
        except Exception:
            log.exception("the turn-based TTS piece loop failed to build; chat TTS draws one code at a time")
            self.piece_loop = False

    @torch.no_grad()
    def draw_pieces(
        self,
        slots: Sequence[int],
        conditions: Sequence[torch.Tensor | None],
        starts: Sequence[int],
        carried: Sequence[torch.Tensor | None],
        histories: Sequence[Sequence[int]],
        warp: Sequence[bool],
        mins: Sequence[int],
        left: Sequence[int],
        generators: Sequence[torch.Generator],
        sampling: CodeSampling = TURN_SAMPLING,
        draws: int = PIECE_DRAWS,
    ) -> tuple[list[list[int]], torch.Tensor]:
        """Up to `draws` turn-based draws for every slot in one static step (`piece_loop`; one graph on a GPU):
        a slot whose text chunk starts appends its condition first (`conditions[i]`, at position `starts[i]`),
        the others continue from the logits the previous call returned (`carried[i]`). Each row's noise comes from
        its own generator, so a row draws the same codes whatever else is in the batch. Returns each slot's draws
        (EOS included when drawn) and the logits `[n, V]` of each slot's next draw (valid where it goes on)."""
        n = len(slots)
        if n == 0 or len(set(slots)) != n:
            raise ValueError("each slot once, at least one")
        device = self.device
        captured = ((f, r) for f, r, d, s in self.piece_loops if d == draws and s == sampling)
        first, rows = covering_window(captured, slots) or row_window(self.row_buckets, self.num_slots, slots)
        loop = self._piece_loop(rows, draws, sampling, first)
        x = loop.inputs
        # each row's next-draw logits straight into the loop's input: fed conditions, or carried from the last call
        x["logits"].zero_()
        fresh = [i for i in range(n) if conditions[i] is not None]
        if fresh:
            pieces = [conditions[i] for i in fresh]
            got = self.feed([slots[i] for i in fresh], pieces, [starts[i] for i in fresh])  # type: ignore[misc]
            x["logits"].index_copy_(0, upload([slots[i] - first for i in fresh], device), got)
        going = [i for i in range(n) if conditions[i] is None]
        if going:
            if any(carried[i] is None for i in going):
                raise ValueError("a slot without a condition must carry the logits of its next draw")
            held = torch.stack([carried[i] for i in going])  # type: ignore[misc]
            x["logits"].index_copy_(0, upload([slots[i] - first for i in going], device), held)
        idx = upload([s - first for s in slots], device)
        width = sampling.window
        hist = [[-1] * max(width - len(h), 0) + list(h)[max(len(h) - width, 0) :] for h in histories]
        x["active"].zero_()
        x["active"].index_fill_(0, idx, True)
        x["history"].fill_(-1)
        if width:
            x["history"].index_copy_(0, idx, upload(hist, device))
        for name, values, dtype in (
            ("warp", warp, torch.bool),
            ("mins", mins, torch.long),
            ("left", left, torch.long),
        ):
            x[name].zero_()
            x[name].index_copy_(0, idx, upload(list(values), device, dtype))
        for s, g in zip(slots, generators, strict=True):
            x["noise"][:, s - first].uniform_(generator=g)
        out = loop.run()
        rows_out = out["draws"].index_select(0, idx).tolist()  # the one host sync of the call
        return [[c for c in row if c >= 0] for row in rows_out], out["logits"].index_select(0, idx)

    def reset(self, slots: Sequence[int]) -> None:
        """Start new turns: the slots' next condition goes to position 0."""
        if slots:
            self.lengths.index_fill_(0, upload(list(slots), self.device), 0)

    @torch.no_grad()
    def generate_codes(
        self,
        slots: Sequence[int],
        conditions: Sequence[torch.Tensor],
        min_new: Sequence[int],
        max_new: int = DUPLEX_MAX_DRAWS,
        sampling: CodeSampling = DUPLEX_SAMPLING,
        forced: Sequence[Sequence[int]] | None = None,
    ) -> list[list[int]]:
        """One duplex TTS unit for every slot at once: append each condition `[L_i, hidden]`, then draw until
        EOS (allowed from draw `min_new[i]` on) or `max_new` draws. Returns each slot's codes to play (the
        final draw is neither returned nor fed, as in `MiniCPMTTS.generate_chunks`). With `forced`, those codes
        replace the draws (teacher forcing, for tests)."""
        n = len(slots)
        if not (n == len(conditions) == len(min_new)) or n == 0:
            raise ValueError("one condition and one min_new per slot, at least one slot")
        if len(set(slots)) != n:
            raise ValueError("a slot appears twice in one call")
        # one device read (indexing by a Python list would first copy the index from pageable memory)
        cur = self.lengths.index_select(0, upload(list(slots), self.device)).tolist()
        counts = [int(c.shape[0]) for c in conditions]
        # a turn that would outgrow the window restarts its TTS context (a deviation only for > window turns)
        overflow = [s for s, c, k in zip(slots, cur, counts, strict=True) if c + k + max_new > self.window]
        self.reset(overflow)
        logits = self.feed(slots, conditions)
        first, rows = self._rows(slots, max_new, sampling)
        device = self.device
        idx = upload([s - first for s in slots], device)
        loop = self._loop(rows, max_new, sampling, first)
        x = loop.inputs
        x["logits"].zero_()
        x["logits"].index_copy_(0, idx, logits)
        x["active"].zero_()
        x["active"].index_fill_(0, idx, True)
        x["mins"].zero_()
        x["mins"].index_copy_(0, idx, upload(list(min_new), device))
        x["noise"].uniform_(generator=self.generator)
        x["use_forced"].zero_()
        if forced is not None:
            table = torch.zeros(rows, max_new, dtype=torch.long)
            for s, f in zip(slots, forced, strict=True):
                table[s - first, : min(len(f), max_new)] = torch.tensor(list(f)[:max_new], dtype=torch.long)
            x["forced"].copy_(table.T)
            x["use_forced"].index_fill_(0, idx, True)
        draws = loop.run()["draws"]
        out = draws[idx].tolist()  # the one host sync of the unit
        result, self.last_hit_eos = [], []
        for row in out:
            got = [c for c in row if c >= 0]
            result.append(got[:-1])
            self.last_hit_eos.append(bool(got) and got[-1] == self.tts.eos_id)
        return result
