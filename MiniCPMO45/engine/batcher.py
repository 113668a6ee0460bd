"""The per-worker duplex batcher: every active session's unit as one batch, from audio/frames to PCM.

One `DuplexBatcher.run_units(sessions, inputs)` call is one tick of the worker (the server's one duplex
runtime; `DuplexSession.tick` wraps it per call): for all sessions at once, a unit's prefill, its decode, and
the TTS and the vocoder of the speaking ones:

* prefill: the streaming audio encoder batched across sessions (`batched_audio`), the vision encoder over all
  frames in one call, then one static LLM step over the ragged unit pieces (audio-only and omni units together),
  each led by the session's pending tail from its previous unit (terminator + `</unit>`: there is no separate
  finalize step in a tick; `finalize` feeds pending tails on demand, e.g. before a session leaves the batch);
* generate: one static (graph-replayed) LLM decode step per token for all sessions still decoding, with the
  listen/speak/text decision vectorized over the batch (`batched_decision.decide_batch`);
* speak (`tick_speech.TickSpeech`): TTS conditions in one projector call, the 26 TTS draws of all speaking sessions as static steps with
  sampling on the device (`static_tts`), then the vocoder windows (`Token2Wav.push_codes_batch`:
  equal-shaped windows share one flow batch, the streaming HiFT batches blocks of equal geometry).

The per-session Python that remains is integer bookkeeping (the control flow of the unit loop, in
`engine.duplex`), never a model call. Each session's state, its speech turn included, is its `DuplexState`;
the batcher keeps none per session. The per-session reference loop the tests compare a tick with
(`tests/reference_engine.py`) shares that state, so a session can move between it and the batcher between
units.

At ~520 lines this module is one piece on purpose: prefill, generate and finalize share the tick's static LLM
step, its host-side KV-length count and its `_Run` bookkeeping, and `warm_up` must capture exactly the shapes
those three feed (`unit_positions`); split, each change to a unit's layout would have to be made in two places.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..audio.mel_stream import push_many
from ..host_copy import upload
from ..modules.whisper import pooled_tokens
from ..token2wav import PromptCache, Token2Wav
from .batched_audio import BatchedAudioEncoder
from .batched_decision import DecisionParams, RecentIds, decide_batch
from .core import Engine
from .duplex import (
    DuplexConfig,
    DuplexState,
    OpenUnit,
    SchemaItem,
    UnitInput,
    UnitResult,
    _state,
    at_unit_cap,
    end_unit,
    pending_tail,
    record_fed,
    record_prefill,
    record_token,
    stamp_prefill,
    start_unit,
    take_tails,
    unit_token,
)
from .flex_decode import FOLDED_MAX_TOKENS, flex_available
from .graphs import graphs_available, pick_bucket
from .session import Session
from .static_decode import StaticLLM
from .static_tts import TTS_WINDOW, StaticTTS
from .static_vision import StaticVision
from .tick_speech import SpeechOut, TickSpeech
from .unit_frames import EncodedFrames, UnitFrames


def enable_static_steps(
    engine: Engine, window: int | None = None, use_graphs: bool | None = None, fused: bool = False
) -> StaticLLM:
    """Route `engine.feed` through static-shape steps (CUDA graphs on a GPU; attention through FlexAttention
    there, see `flex_decode`; with `fused`, the layers' element-wise work compiled, see `fused`). Same results,
    see tests."""
    if engine.static is None:
        flex = flex_available(engine.cache.lengths.device) and use_graphs is not False
        engine.static = StaticLLM(
            engine.model.llm, engine.cache, window, use_graphs=use_graphs, flex_decode=flex, fused=fused
        )
    return engine.static


# token buckets of a chat turn's prefill (the user's turn and the assistant prefix: a typed "Hi" takes 14 positions,
# a typed sentence ~18; a spoken turn ~10 a second, 7-8 s of speech the 96 bucket) beside the duplex units', captured
# per tick phase as well. Longer spoken turns (over ~11 s: 192, 256) still capture once, live.
CHAT_TURN_TOKENS = (96, 32, 16)
# up to this many chat turns ending in one tick prefill as one gathered step (`StaticLLM.gathered_shape`), wherever their
# sessions' slots are; more take one window step per tick phase
CHAT_TURN_ROWS = 8

# frame sizes whose vision graphs the warm-up captures: browsers' default camera (4:3) and 720p webcams (16:9)
CAMERA_SIZES = ((640, 480), (1280, 720))


@dataclass
class UnitOutput:
    result: UnitResult
    speech: SpeechOut | None
    decision_s: float | None  # perf_counter() when the unit's listen/speak decision was known
    done_s: float  # perf_counter() when the unit was complete (PCM included; a listen: at generate end)


@dataclass
class _Run:
    index: int
    slot: int
    st: DuplexState
    forced: bool
    row: int  # row in the unit's logits tensor
    unit_ids: list[int] = field(default_factory=list)
    hidden_at: list[int] = field(default_factory=list)  # rows of the unit's decode-step hidden states
    done: bool = False
    script: list[int] | None = None


class DuplexBatcher:
    def __init__(
        self,
        engine: Engine,
        vocoder: Token2Wav | None = None,
        voice: PromptCache | None = None,
        *,
        window: int | None = None,
        tts_window: int = TTS_WINDOW,
        use_graphs: bool | None = None,
        seed: int = 0,
        host_threads: int = 4,
        fused: bool = False,
    ) -> None:
        self.engine = engine
        self.llm = enable_static_steps(engine, window, use_graphs, fused)
        if fused and flex_available(engine.model.device) and use_graphs is not False:
            # the vision encoder's and the vocoder estimator's element-wise work fused too
            if engine.model.vpm is not None:
                engine.model.vpm.fuse_layers()
            if vocoder is not None and vocoder.flow_graphs is not None:
                vocoder.fuse_kernels()
        tts = engine.model.tts
        self.tts = (
            StaticTTS(tts, engine.cache.num_slots, tts_window, use_graphs=use_graphs, fused=fused)
            if tts is not None
            else None
        )
        if tts is not None:
            tts.static = self.tts  # turn-based TTS sessions in its cache draw through its steps too
        # the streaming audio encoder of every session in one pass (per-slot caches allocated on first use)
        self.audio = BatchedAudioEncoder(engine.model, engine.cache.num_slots, use_graphs=use_graphs)
        # on a GPU the frames of every omni session go through the vision tower as graphs (per view bucket and
        # patch grid); elsewhere through the model's eager path
        graphs = graphs_available(engine.model.device) and use_graphs is not False
        self.vision = StaticVision(engine.model) if engine.model.vpm is not None and graphs else None
        self.vocoder, self.voice = vocoder, voice
        self.device = engine.model.device
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self._host_pool = ThreadPoolExecutor(max_workers=host_threads, thread_name_prefix="unit-prep")
        self.frames = UnitFrames(engine, self.vision, self._host_pool)
        self.timings: dict[str, float] = {}  # stage times of the last tick (ms)
        self.speech = TickSpeech(engine, self.tts, vocoder, voice)

    # ---- warm-up ------------------------------------------------------------------------------------------
    def unit_positions(self) -> tuple[int, int]:
        """Positions one audio unit and one omni unit (a frame without HD slices) feed: the previous unit's
        tail (at most two), `<unit>`, [`<image>`, the frame's queries, `</image>`,] one second of audio."""
        cfg = self.engine.model.config
        audio = 3 + pooled_tokens(round(cfg.audio_chunk_length * 100), cfg.audio_pool_step)
        return audio, audio + cfg.query_num + 2

    def warm_up(
        self, max_sessions: int, prefill_tokens: Sequence[int] | None = None, phases: int = 1
    ) -> None:
        """Capture the graphs a tick of up to `max_sessions` sessions uses (decode, finalize, prefill, TTS), and
        build every kernel a tick of fewer sessions can need, so that no kernel compile (seconds on a GPU) lands
        in a live tick: the one-token step's FlexAttention kernel is compiled per row bucket, and whether a
        longer step's compile serves a given row count depends on the shapes Dynamo saw before (it turns a size
        dynamic once it changes). Shapes other than the largest are only compiled (`compile_shape`), not
        captured: their graphs would hold their outputs' memory; a live tick captures one in a few 100 ms.
        The longest step goes first: if its kernel fails to build, the fallback drops the steps before it.

        With two tick `phases` a tick holds about half of the sessions, on the lowest or the highest slots
        (`graphs.row_window`): the graphs of half the sessions are captured at both ends instead."""
        buckets = [r for r in self.llm.row_buckets if r <= pick_bucket(self.llm.row_buckets, max_sessions)]
        per_phase = -(-max_sessions // phases)
        largest = pick_bucket(buckets, per_phase)
        ends = (False, True) if phases > 1 else (False,)
        if prefill_tokens is None:
            prefill_tokens = sorted(self.unit_positions(), reverse=True)
        # Two long folded steps too: a session's prompt prefill can take any token bucket up to 128. A chat
        # turn's prefill runs one gathered step, or one step per phase (`CHAT_TURN_TOKENS`).
        captured = (FOLDED_MAX_TOKENS, FOLDED_MAX_TOKENS // 2, *prefill_tokens, *CHAT_TURN_TOKENS, 2, 1)
        for tokens in captured:
            for top in ends:
                self.llm.warm_up(largest, (tokens,), top)
            for rows in reversed(buckets):
                if rows != largest:
                    self.llm.compile_shape(rows, tokens)
        # The other token buckets up to 128 are only compiled, at every row bucket (each shape is compiled for
        # its own sizes, `flex_decode`): the last piece of a prompt's prefill, and the first units of calls that
        # join together (shorter than the later ones), can take any of them; a live tick then only captures.
        done = {pick_bucket(self.llm.token_buckets, t) for t in captured}
        for tokens in self.llm.token_buckets:
            if tokens <= FOLDED_MAX_TOKENS and tokens not in done:
                for rows in reversed(buckets):
                    self.llm.compile_shape(rows, tokens)
        self.llm.warm_up_gathered(min(CHAT_TURN_ROWS, largest), CHAT_TURN_TOKENS)
        for rows in buckets:  # the decode step runs at every session count: its graphs are kept
            for top in ends:
                if rows <= largest:
                    self.llm.warm_up(rows, (1,), top)
        # A tick that holds both phases (one phase's stragglers in the other's tick) runs every slot: its
        # unit steps are captured too, so that an overloaded tick does not also pay for captures.
        merged: int | None = pick_bucket(buckets, max_sessions)
        if phases == 1 or merged == largest:
            merged = None
        if merged is not None:
            self.llm.warm_up(merged, (*prefill_tokens, 2, 1))
        if self.tts is not None:
            for top in ends:
                self.tts.warm_up(per_phase, top=top)
            if merged is not None:
                self.tts.warm_up(merged)
            self.tts.warm_up(1)  # its fused halves have a one-row case too (see `fused`)
            for top in ends:  # chat replies' TTS pieces: one loop graph per piece (`StaticTTS.draw_pieces`)
                self.tts.warm_up_pieces(per_phase, top=top)
            if merged is not None:
                self.tts.warm_up_pieces(merged)
            for rows in buckets:  # the draws' FlexAttention kernel is built per row bucket
                self.tts.compile_shape(rows)
        if self.engine.model.apm is not None:
            for top in ends:
                self.audio.warm_up(per_phase, top=top)
            if merged is not None:
                self.audio.warm_up(merged)
        if self.vision is not None:  # the usual cameras' frames never meet an eager tower or a capture live
            images = self.engine.images
            self.vision.warm_up(self.camera_grids(), (images.config.norm_mean, images.config.norm_std))
        # the vocoder of a tick in which one phase's sessions all speak (every session at once did not fit beside
        # 64 sessions' caches on an H100: a live tick's flow batch covers that many rows, fewer of them real)
        for phase in range(len(ends)):  # each phase's turns in its own half of the vocoder's store
            self.speech.warm_up(per_phase, phase=phase)

    def camera_grids(self) -> list[tuple[int, int]]:
        """The patch grids of the usual cameras' frames (`CAMERA_SIZES`) as an omni unit slices them by default."""
        slices = DuplexConfig.model_fields["max_slice_nums"].default
        grids: set[tuple[int, int]] = set()
        for size in CAMERA_SIZES:
            out = self.engine.images.preprocess(Image.new("RGB", size), slices, normalized=False)
            grids.update((int(r), int(c)) for r, c in out.tgt_sizes)
        return sorted(grids)

    # ---- prefill ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_frames(
        self, sessions: Sequence[Session], frames: Sequence[Sequence[Image.Image]]
    ) -> list[EncodedFrames]:
        """Each session's frames of its next unit through the vision tower now, in one call, sliced as that
        unit's prefill would slice them (`UnitInput.encoded` takes them in)."""
        slices = [_state(s).config.max_slice_nums for s in sessions]
        return self.frames.encode(self.frames.slice(list(zip(frames, slices, strict=True)))())

    @staticmethod
    def _frames_of(session: Session, unit: UnitInput) -> tuple[list[Image.Image], int]:
        """A unit's frames and how many slices each may take (the unit's own limit, else its session's)."""
        return unit.frames, unit.max_slice_nums or _state(session).config.max_slice_nums

    @torch.no_grad()
    def prefill(self, sessions: Sequence[Session], inputs: Sequence[UnitInput]) -> list[UnitResult]:
        """Each session's unit into its KV in one static step: the streaming audio encoder batched across
        sessions, the frames through the vision tower, then the ragged pieces (each ready session's pending tail
        first, `<unit>`, image blocks, audio rows; a unit opened ahead, `open_units`, only what it did not take
        then). The next-token logits wait in the state for `generate`."""
        if len(sessions) != len(inputs):
            raise ValueError("one unit input per session")
        eng, sp = self.engine, self.engine.special
        results = [UnitResult(session=s) for s in sessions]
        for s in sessions:
            _state(s).pending_logits = None

        # the frames not encoded before their unit came are sliced on the pool while this thread computes every
        # session's streaming mel in one batch and queues the audio encoder on the GPU
        with_frames = [i for i, unit in enumerate(inputs) if unit.frames and unit.encoded is None]
        sliced = self.frames.slice([self._frames_of(sessions[i], inputs[i]) for i in with_frames])
        audio = [u.audio if u.audio is not None and len(u.audio) else None for u in inputs]
        # on a GPU the transform runs there; the CPU keeps the per-session-exact path
        on_gpu = self.device if self.device.type == "cuda" else None
        all_mel_units = push_many([_state(s).mel for s in sessions], audio, on_gpu)
        t_audio = time.perf_counter()
        with_audio = [i for i, m in enumerate(all_mel_units) if m is not None]
        audio_rows: dict[int, torch.Tensor] = {}  # by session index
        if with_audio:
            mels = [m for m in all_mel_units if m is not None]
            embs = self.audio.encode_sessions([sessions[i] for i in with_audio], mels)
            audio_rows = dict(zip(with_audio, embs, strict=True))
        t_vision = time.perf_counter()
        frames_of = {i: u.encoded for i, u in enumerate(inputs) if u.encoded is not None and u.encoded.views}
        frames_of.update(zip(with_frames, self.frames.encode(sliced()), strict=True))
        opened = {i for i, s in enumerate(sessions) if _state(s).open_unit is not None}
        ready = [
            i
            for i, mel_unit in enumerate(all_mel_units)
            if mel_unit is not None or i in frames_of or i in opened
        ]
        for i in set(range(len(sessions))) - set(ready):
            results[i].prefilled = False  # not enough audio yet: this unit will be a listen
        t_feed = time.perf_counter()
        tok, tail_rows = self._unit_markers([pending_tail(eng, sessions[i]) for i in ready])
        # the sessions this step feeds (not a unit opened ahead that brings nothing more)
        fed: list[int] = []
        pieces: list[torch.Tensor] = []
        schemas: list[list[SchemaItem]] = []
        for k, i in enumerate(ready):
            open_unit = _state(sessions[i]).open_unit
            if open_unit is None:
                parts, schema = [tail_rows[k], tok["unit"][None]], [sp.unit_start]
            else:  # its tail, <unit> and frame are in the KV already
                parts, schema = [], list(open_unit.schema)
            images, items = self._image_parts(tok, frames_of.get(i))
            parts += images
            schema += items
            if i in audio_rows:
                parts.append(audio_rows[i])
                schema.append(("audio", audio_rows[i].shape[0]))
            schemas.append(schema)
            if parts:
                fed.append(i)
                pieces.append(torch.cat(parts))
        logits: dict[int, torch.Tensor] = {}
        if fed:
            out = self.llm.feed([sessions[i].slot for i in fed], pieces, hidden=False)
            take_tails(eng, [sessions[i] for i in fed])  # fed with the units
            logits = dict(zip(fed, out["logits"], strict=True))
        if ready:
            rows = []
            for i in ready:
                st = _state(sessions[i])
                rows.append(logits[i] if i in logits else st.open_unit.logits)  # type: ignore[union-attr]
                st.open_unit = None
            record_prefill([sessions[i] for i in ready], rows, schemas)
        stamp_prefill(results, (t_feed - t_vision) * 1000, (t_vision - t_audio) * 1000, t_feed)
        return results

    def _unit_markers(
        self, tails: Sequence[Sequence[int]]
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """The embeddings of a unit's markers (`<unit>`, the image and slice brackets) by name, and each session's
        pending tail's rows, from one embedding call."""
        sp = self.engine.special
        fixed = [sp.unit_start, sp.image_start, sp.image_end, sp.slice_start, sp.slice_end]
        emb = self.engine.model.embed_ids(upload([*fixed, *(t for tail in tails for t in tail)], self.device))
        tok = dict(zip(("unit", "img0", "img1", "sl0", "sl1"), emb[: len(fixed)], strict=True))
        tail_rows, at = [], len(fixed)
        for tail in tails:
            tail_rows.append(emb[at : at + len(tail)])
            at += len(tail)
        return tok, tail_rows

    def _image_parts(
        self, tok: dict[str, torch.Tensor], encoded: EncodedFrames | None
    ) -> tuple[list[torch.Tensor], list[SchemaItem]]:
        """A unit's image blocks (each frame: its overview in `<image>` … `</image>`, then its slices in `<slice>`
        … `</slice>`) as rows to feed, and their schema items."""
        sp = self.engine.special
        parts: list[torch.Tensor] = []
        schema: list[SchemaItem] = []
        used = 0
        for n_views in encoded.views if encoded is not None else []:
            assert encoded is not None
            for v in range(n_views):
                a, b = ("img0", "img1") if v == 0 else ("sl0", "sl1")
                rows = encoded.rows[used + v]
                parts += [tok[a][None], rows, tok[b][None]]
                schema += [
                    sp.image_start if v == 0 else sp.slice_start,
                    ("img", rows.shape[0]),
                    sp.image_end if v == 0 else sp.slice_end,
                ]
            used += n_views
        return parts, schema

    @torch.no_grad()
    def open_units(self, sessions: Sequence[Session], encoded: Sequence[EncodedFrames]) -> None:
        """Open each session's next unit now, before its audio comes: the previous unit's pending tail, `<unit>` and
        the image blocks of the unit's frame, encoded ahead (`encode_frames`), into the KV in one static step. The
        unit's tick (`prefill`) then feeds only its audio; a unit that brings none decides from the logits this
        step left. Attention is causal: the KV and the logits are those of the whole unit fed in its tick."""
        if len(sessions) != len(encoded):
            raise ValueError("one encoded frame set per session")
        if not sessions:
            return
        for s in sessions:
            if _state(s).open_unit is not None or _state(s).pending_logits is not None:
                raise RuntimeError(f"session {s.session_id!r}: its previous unit is not complete")
        tok, tail_rows = self._unit_markers([pending_tail(self.engine, s) for s in sessions])
        pieces, schemas = [], []
        for tail, frames in zip(tail_rows, encoded, strict=True):
            images, items = self._image_parts(tok, frames)
            pieces.append(torch.cat([tail, tok["unit"][None], *images]))
            schemas.append([self.engine.special.unit_start, *items])
        out = self.llm.feed([s.slot for s in sessions], pieces, hidden=False)
        take_tails(self.engine, sessions)
        for s, schema, logits in zip(sessions, schemas, out["logits"], strict=True):
            _state(s).open_unit = OpenUnit(schema, logits)

    # ---- generate -----------------------------------------------------------------------------------------
    def _feed_tokens(
        self,
        runs: Sequence[_Run],
        tokens: Sequence[Sequence[int]],
        lengths: Sequence[int] | None = None,
        hidden: bool = True,
    ) -> dict[str, torch.Tensor]:
        """One static step feeding `tokens[i]` to `runs[i]`'s slot (`hidden`: return the hidden states too).
        With the slots' `lengths` known on the host, nothing here waits for the device."""
        slots = [r.slot for r in runs]
        flat = [t for ts in tokens for t in ts]
        emb = self.engine.model.embed_ids(upload(flat, self.device))
        pieces, at = [], 0
        for ts in tokens:
            pieces.append(emb[at : at + len(ts)])
            at += len(ts)
        return self.llm.feed(slots, pieces, lengths, hidden)

    @torch.no_grad()
    def generate(
        self,
        sessions: Sequence[Session],
        prefills: Sequence[UnitResult],
        force_listen: Sequence[bool] | None = None,
        scripts: Sequence[list[int] | None] | None = None,
    ) -> tuple[list[UnitResult], list[float | None]]:
        """The listen/speak decision and the unit's text for the whole batch. `scripts[i]`, when given, replaces session i's
        decisions by those tokens in order (benchmarks: a fixed speak/listen workload on random weights).

        Per decode step the host waits for the device once (the decision's tokens): the slots' KV lengths are
        read once per unit and then counted on the host, index tensors are copied asynchronously, the
        repetition windows live on the device, and the hidden states for the TTS are gathered once at the end.

        Returns the results and, per session, perf_counter() when its decision (the unit's first token) was
        known."""
        t0 = time.perf_counter()
        eng, sp, dev = self.engine, self.engine.special, self.device
        force_listen = list(force_listen) if force_listen is not None else [False] * len(sessions)
        results = list(prefills)
        decided_at: list[float | None] = [None] * len(sessions)
        runs: list[_Run] = []
        logit_rows: list[torch.Tensor] = []
        closers: list[_Run] = []
        for i, s in enumerate(sessions):
            st = _state(s)
            if st.pending_logits is None:
                results[i].is_listen = True
                continue
            logit_rows.append(st.pending_logits)
            st.pending_logits = None
            forced = start_unit(s, force_listen[i])
            results[i].forced_listen = forced
            script = list(scripts[i]) if scripts is not None and scripts[i] is not None else None
            run = _Run(i, s.slot, st, forced, len(runs), script=script)
            runs.append(run)
            if force_listen[i] and st.turn_open:
                closers.append(run)
        slots = [s.slot for s in sessions]
        # The slots' KV lengths, counted on the host from here. Read after the first decision, whose sync has
        # let the device catch up: read first, the host would wait for the prefill and then leave the GPU idle
        # while it queued the decision.
        queued_lengths = eng.cache.lengths.index_select(0, upload(slots, dev))
        length: dict[int, int] = {}

        def read_lengths() -> None:
            if not length:
                length.update(zip(slots, queued_lengths.tolist(), strict=True))

        step_hidden: list[torch.Tensor] = []  # per decode step: hidden states of the rows it fed
        fed_so_far = 0
        if runs:
            logits = torch.stack(logit_rows)
        if closers:
            read_lengths()
            out = self._feed_tokens(
                closers, [[sp.turn_eos]] * len(closers), [length[r.slot] for r in closers], hidden=False
            )
            logits.index_copy_(0, upload([r.row for r in closers], dev), out["logits"])
            for r in closers:
                length[r.slot] += 1
                r.st.total_ids.append(sp.turn_eos)
                r.st.turn_open = False
                results[r.index].closed_turn_by_force = True
        if runs:
            params = DecisionParams.from_configs([r.st.config for r in runs], dev)
            recent = RecentIds([r.st for r in runs], params.windows, logits.shape[-1], dev)
        max_steps = max((r.st.config.max_new_speak_tokens_per_chunk for r in runs), default=0)
        for j in range(max_steps):
            deciders = [
                r
                for r in runs
                if not r.done and not r.forced and j != r.st.config.max_new_speak_tokens_per_chunk - 1
            ]
            decided: dict[int, int] = {}
            if deciders:
                keep = [r.row for r in deciders]
                rows = upload(keep, dev)
                toks = decide_batch(
                    eng,
                    [r.st for r in deciders],
                    logits.index_select(0, rows),
                    params.select(rows, keep),
                    recent,
                    rows,
                    self.generator,
                    [
                        r.script.pop(0) if r.script else None  # a spent script: the model decides
                        for r in deciders
                    ],
                )
                decided.update(zip(keep, toks, strict=True))
            now = time.perf_counter()
            read_lengths()
            to_feed: list[tuple[_Run, int]] = []
            for run in runs:
                if run.done:
                    continue
                st, res = run.st, results[run.index]
                if at_unit_cap(eng, st, j):
                    run.done = True
                    continue
                tok = unit_token(eng, st, res, None if run.forced else decided[run.row])
                if j == 0:
                    decided_at[run.index] = now
                if not record_token(eng, st, res, run.unit_ids, tok, j):
                    run.done = True
                    continue
                to_feed.append((run, tok))
            if not to_feed:
                break
            fed = [r for r, _ in to_feed]
            out = self._feed_tokens(fed, [[t] for _, t in to_feed], [length[r.slot] for r in fed])
            logits.index_copy_(0, upload([r.row for r in fed], dev), out["logits"])
            step_hidden.append(out["hidden"][:, 0])
            for k, (run, tok) in enumerate(to_feed):
                length[run.slot] += 1
                record_fed(eng, run.st, results[run.index], tok)
                if j != 0:
                    run.unit_ids.append(tok)
                    run.hidden_at.append(fed_so_far + k)
            fed_so_far += len(fed)
        t1 = time.perf_counter()
        read_lengths()
        order = [k for run in runs for k in run.hidden_at]
        hidden = torch.cat(step_hidden).index_select(0, upload(order, dev)) if order else None
        at = 0
        for run in runs:
            res = results[run.index]
            end_unit(eng, run.st)
            n = len(run.hidden_at)
            res.tts_token_ids = list(run.unit_ids)
            res.tts_hidden = hidden[at : at + n] if hidden is not None and n else None
            at += n
            res.text = eng.tokenizer.decode(run.unit_ids, skip_special_tokens=True) if run.unit_ids else ""
            if res.is_listen:
                res.text, res.tts_token_ids, res.tts_hidden = "", [], None
        ran = {run.index for run in runs}
        for i, s in enumerate(sessions):
            # a session that did not run this unit may still hold the previous unit's tail
            results[i].kv_length = length[s.slot] + (0 if i in ran else len(pending_tail(eng, s)))
            results[i].timings_ms["generate_ms"] = (t1 - t0) * 1000
        return results, decided_at

    # ---- finalize -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def finalize(self, sessions: Sequence[Session]) -> None:
        """Feed pending unit tails as one static step: feed the pending tails now (not part of a tick; for a
        session that leaves the batch or whose KV is read as a whole, e.g. before a context-window slide)."""
        todo = [s for s in sessions if _state(s).tail_pending]
        if not todo:
            return
        runs = [_Run(i, s.slot, _state(s), False, i) for i, s in enumerate(todo)]
        self._feed_tokens(runs, [pending_tail(self.engine, s) for s in todo], hidden=False)
        take_tails(self.engine, todo)

    # ---- speak ------------------------------------------------------------------------------------------
    def conditions(self, results: Sequence[UnitResult]) -> list[torch.Tensor]:
        return self.speech.conditions(results)

    @torch.no_grad()
    def speak(self, results: Sequence[UnitResult]) -> list[SpeechOut | None]:
        """TTS (+ vocoder when the batcher has one) for every speaking unit of the tick (`TickSpeech.speak`)."""
        return self.speech.speak(results)

    def _synced(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # ---- one tick -----------------------------------------------------------------------------------------
    def run_units(
        self,
        sessions: Sequence[Session],
        inputs: Sequence[UnitInput],
        force_listen: Sequence[bool] | None = None,
        scripts: Sequence[list[int] | None] | None = None,
    ) -> list[UnitOutput]:
        """One unit of every session: prefill (led by the previous unit's tail), generate, TTS and vocoder. The
        unit's own tail stays pending for the next tick's prefill."""
        marks = [time.perf_counter()]
        pre = self.prefill(sessions, inputs)
        marks.append(self._synced())
        results, decided_at = self.generate(sessions, pre, force_listen, scripts)
        t_decided = self._synced()  # listening units are complete once generate ended
        marks.append(t_decided)
        speech = self.speak(results)
        marks.append(self._synced())
        names = ("prefill_ms", "generate_ms", "speak_ms")
        self.timings = {k: (b - a) * 1000 for k, a, b in zip(names, marks[:-1], marks[1:], strict=True)}
        self.timings["vocoder_ms"] = self.speech.vocoder_s * 1000
        self.timings["tts_ms"] = self.timings["speak_ms"] - self.timings["vocoder_ms"]
        return [
            UnitOutput(r, sp, d, sp.done_s if sp is not None else t_decided)
            for r, sp, d in zip(results, speech, decided_at, strict=True)
        ]
