"""The full-duplex unit loop (spec §3.3): one unit per second of user audio (plus an optional video frame).

Per session: `prepare` once (system prefix, reference-audio embeddings, suffix), then for every unit
`prefill_units` → `generate_units`. Each step function takes a list of sessions and runs their LLM work as one
batch; a session's state lives in its `DuplexState`.

A unit ends with a tail the decoder chose but did not feed: its terminator (if any) and `</unit>`. The
reference feeds that tail in a separate "finalize" forward after each unit. Here the tail waits in the state
and the next `prefill_units` feeds it in front of the next unit's `<unit>`, in the same forward: attention is
causal, so the KV and the logits are the ones the separate forward gives, and a unit costs one LLM step less.
`finalize_units` feeds pending tails explicitly: before the session's KV is read as a whole (a context-window
slide, see `make_room`; a mode switch keeps nothing, so it needs none), or to mirror the reference's timing.
`context_length` is the KV length with the pending tail counted: where the next unit starts.

The listen/speak decision follows the reference decoder. Two reference bugs are not copied: the listen
scale/top-k settings act on `<|listen|>` (the reference applies them to `<|im_end|>`), and by default the
repetition penalty lowers negative logits instead of raising them (see `DuplexConfig.repetition_penalty_style`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, Field

from ..audio.mel import DYNAMIC_FLOOR, FIXED_FLOOR_MODE, batch_features
from ..audio.mel_stream import StreamingMel, push_many
from ..tokenizer import MiniCPMOTokenizer
from .context_window import SlidingWindow
from .core import Engine
from .sampling import ban, penalize_length, sample, top_k_top_p
from .session import Mode, Session

SchemaItem = int | tuple[str, int]


class DuplexConfig(BaseModel):
    """Per-session duplex settings (all of them take effect per session, unlike the reference)."""

    decode_mode: Literal["sampling", "greedy"] = "sampling"
    temperature: float = Field(0.7, gt=0.0, le=2.0)
    top_k: int = Field(20, ge=0)
    top_p: float = Field(0.8, gt=0.0, le=1.0)
    listen_prob_scale: float = 1.0
    listen_top_k: int | None = None
    text_repetition_penalty: float = Field(1.05, gt=0.0)
    text_repetition_window: int = Field(512, ge=0)
    # "signed": the usual penalty (positive logits divided, negative multiplied). "reference": the reference
    # divides every logit, which makes a repeated token with a negative logit *more* likely (spec §7.3 #2).
    repetition_penalty_style: Literal["signed", "reference"] = "signed"
    length_penalty: float = Field(1.1, gt=0.0)
    force_listen_count: int = Field(3, ge=0)
    max_new_speak_tokens_per_chunk: int = Field(20, ge=1)
    max_unit_chars: int = Field(28, ge=1)
    max_slice_nums: int = Field(1, ge=1)
    chunk_ms: int = 1000
    first_chunk_ms: int = 1035
    cnn_redundancy_ms: int = 20
    # One forward per prefill piece (`<unit>`, `<image>`, image rows, ... audio rows) like the reference, or
    # the whole unit in one forward (same function, float rounding differs).
    piecewise_prefill: bool = False
    # Log-mel floor of the offline reference-audio features. The reference reads it from state its streaming
    # mel left on a shared extractor (fixed -10 while that buffer was under 5 s); the parity fixture was made
    # in that state, so "fixed" is the default.
    ref_audio_floor: Literal["fixed", "dynamic"] = "fixed"
    seed: int | None = None


@dataclass
class DuplexState:
    config: DuplexConfig
    mel: StreamingMel
    units_prefilled: int = 0
    units_generated: int = 0
    turn_open: bool = False
    pending_logits: torch.Tensor | None = None
    pending_terminator: int | None = None
    # The last unit's tail ([pending_terminator], </unit>) is decided but not in the KV yet: the next prefill
    # (or `finalize_units`) feeds it.
    tail_pending: bool = False
    decoded: list[int] = field(default_factory=list)  # every id the decoder chose (repetition window)
    # every id of the units after their prefill pieces, in KV order (a pending tail is already listed)
    total_ids: list[int] = field(default_factory=list)
    schema: list[list[SchemaItem]] = field(default_factory=list)
    system_length: int = 0


@dataclass
class UnitInput:
    """One unit of user input: 1 s of 16 kHz mono audio and the frames taken at that second."""

    audio: np.ndarray | None
    frames: list[Image.Image] = field(default_factory=list)
    force_listen: bool = False
    max_slice_nums: int | None = None


@dataclass
class UnitResult:
    session: Session
    prefilled: bool = True
    is_listen: bool = True
    text: str = ""
    end_of_turn: bool = False
    tts_token_ids: list[int] = field(default_factory=list)  # tokens to speak (j > 0), in order
    tts_hidden: torch.Tensor | None = None  # [n, D] last-layer states where those tokens were fed
    decoded_ids: list[int] = field(default_factory=list)  # every id the decoder produced this unit
    forced_listen: bool = False
    closed_turn_by_force: bool = False  # `<|turn_eos|>` was fed to end a turn the user interrupted
    kv_length: int = 0  # KV positions through this unit's decoded tokens (its own tail not counted)
    timings_ms: dict[str, float] = field(default_factory=dict)


def schema_codes(schema: Sequence[Sequence[SchemaItem]]) -> list[int]:
    """Flatten the prefill schema: ids stay, image rows → -(100000+n), audio rows → -(200000+n)."""
    out = []
    for unit in schema:
        for item in unit:
            if isinstance(item, tuple):
                kind, n = item
                out.append(-((100000 if kind == "img" else 200000) + n))
            else:
                out.append(item)
    return out


def _state(session: Session) -> DuplexState:
    if session.mode is not Mode.DUPLEX or not isinstance(session.duplex, DuplexState):
        raise RuntimeError(f"session {session.session_id!r} is not prepared for duplex")
    return session.duplex


# ---- the pending tail ----------------------------------------------------------------------------------------


def pending_tail(engine: Engine, session: Session) -> list[int]:
    """The ids of the session's pending unit tail (`[terminator] </unit>`), empty when none is pending."""
    st = _state(session)
    if not st.tail_pending:
        return []
    head = [st.pending_terminator] if st.pending_terminator is not None else []
    return [*head, engine.special.unit_end]


def take_tails(engine: Engine, sessions: Sequence[Session]) -> list[list[int]]:
    """Each session's pending tail, then marked as fed (call it once the tails are in the KV)."""
    tails = []
    for s in sessions:
        tails.append(pending_tail(engine, s))
        st = _state(s)
        st.tail_pending = False
        st.pending_terminator = None
    return tails


def context_length(engine: Engine, session: Session) -> int:
    """The session's KV length with its pending tail counted: the position where its next unit starts."""
    return engine.kv_length(session) + len(pending_tail(engine, session))


def make_room(engine: Engine, session: Session, window: SlidingWindow, needed: int) -> int:
    """`window.make_room` for a duplex session: the pending tail counts, and it is fed before any unit is
    dropped, so every dropped span is a whole unit. Returns the positions dropped."""
    if context_length(engine, session) + needed <= window.max_tokens:
        return 0
    finalize_units(engine, [session])
    return window.make_room(engine, session, needed)


# ---- prepare --------------------------------------------------------------------------------------------------


@torch.no_grad()
def prepare(
    engine: Engine,
    session: Session,
    system_prompt: str,
    ref_audio: np.ndarray | None = None,
    config: DuplexConfig | None = None,
) -> None:
    """Start a duplex conversation: `<|im_start|>system\\n{prompt}\\n<|audio_start|>`, the reference audio's
    embeddings (encoded offline with the 1-s chunk mask), then `<|audio_end|><|im_end|>` with no newline."""
    cfg = config or DuplexConfig()
    engine.switch_mode(session, Mode.DUPLEX)
    mel = StreamingMel(cfg.chunk_ms, cfg.first_chunk_ms, cfg.cnn_redundancy_ms)
    st = DuplexState(config=cfg, mel=mel)
    session.duplex = st
    if cfg.seed is not None:
        session.seed(cfg.seed)
    model = engine.model
    engine.tokenizer.decoded_bytes  # noqa: B018 -- build the text-cap table (once per tokenizer) now, not mid-unit
    prefix = engine.tokenizer.encode(f"<|im_start|>system\n{system_prompt}\n<|audio_start|>")
    engine.feed_ids([session], [prefix])
    if ref_audio is not None and len(ref_audio):
        floor = FIXED_FLOOR_MODE if cfg.ref_audio_floor == "fixed" else DYNAMIC_FLOOR
        feats, lens = batch_features([np.asarray(ref_audio, dtype=np.float32)], floor)
        rows = model.audio_embeds(
            torch.from_numpy(feats), torch.from_numpy(lens), model.config.audio_chunk_length
        )
        engine.feed([session], [torch.cat(rows)])
    engine.feed_ids([session], [engine.tokenizer.encode("<|audio_end|><|im_end|>")])
    st.system_length = engine.kv_length(session)


# ---- prefill --------------------------------------------------------------------------------------------------


@dataclass
class _UnitPieces:
    pieces: list[torch.Tensor]
    schema: list[SchemaItem]


@torch.no_grad()
def prefill_units(
    engine: Engine, sessions: Sequence[Session], inputs: Sequence[UnitInput]
) -> list[UnitResult]:
    """Feed the previous unit's pending tail, then `<unit>`, the frames' image blocks and the 10 audio
    embeddings of each session's unit. A session without enough audio (and no frame) is not fed at all: its
    tail stays pending."""
    if len(sessions) != len(inputs):
        raise ValueError("one unit input per session")
    t0 = time.perf_counter()
    model, sp = engine.model, engine.special
    results = [UnitResult(session=s) for s in sessions]
    ready: list[int] = []
    mel_units = []
    for s in sessions:
        _state(s).pending_logits = None
    audio = [u.audio if u.audio is not None and len(u.audio) else None for u in inputs]
    all_mel_units = push_many([_state(s).mel for s in sessions], audio)  # one batched transform
    for i, (mel_unit, unit) in enumerate(zip(all_mel_units, inputs, strict=True)):
        if mel_unit is None and not unit.frames:
            results[i].prefilled = False  # not enough audio yet: this unit will be a listen
            continue
        ready.append(i)
        mel_units.append(mel_unit)

    # Vision for every ready session in one encoder call.
    images = engine.images
    views: list[torch.Tensor] = []
    sizes: list[np.ndarray] = []
    per_frame: list[list[int]] = []  # per ready session: number of views of each frame
    for i in ready:
        counts = []
        for frame in inputs[i].frames:
            n_slices = inputs[i].max_slice_nums or _state(sessions[i]).config.max_slice_nums
            out = images.preprocess(frame, n_slices)
            views += [torch.from_numpy(v) for v in out.pixel_values]
            sizes.append(out.tgt_sizes)
            counts.append(len(out.pixel_values))
        per_frame.append(counts)
    vision = model.vision_embeds(views, torch.from_numpy(np.concatenate(sizes))) if views else None
    t_vision = time.perf_counter()

    units: list[_UnitPieces] = []
    used = 0
    tails = [pending_tail(engine, sessions[i]) for i in ready]
    for k, i in enumerate(ready):
        s = sessions[i]
        # the previous unit's tail goes first, in the same forward (its own piece in piecewise mode)
        pieces: list[torch.Tensor] = [model.embed_ids(tails[k])] if tails[k] else []
        pieces.append(model.embed_ids([sp.unit_start]))
        schema: list[SchemaItem] = [sp.unit_start]
        for n_views in per_frame[k]:
            assert vision is not None
            for v in range(n_views):
                open_id, close_id = (
                    (sp.image_start, sp.image_end) if v == 0 else (sp.slice_start, sp.slice_end)
                )
                rows = vision[used + v]
                pieces += [model.embed_ids([open_id]), rows, model.embed_ids([close_id])]
                schema += [open_id, ("img", rows.shape[0]), close_id]
            used += n_views
        mel_unit = mel_units[k]
        if mel_unit is not None:
            feats = torch.from_numpy(mel_unit.features)[None]
            rows = model.audio_embeds_stream(
                feats, s.audio_cache, mel_unit.prefix_frames, mel_unit.suffix_frames
            )
            pieces.append(rows)
            schema.append(("audio", rows.shape[0]))
        units.append(_UnitPieces(pieces, schema))
    t_audio = time.perf_counter()

    if ready:
        ready_sessions = [sessions[i] for i in ready]
        piecewise = any(_state(s).config.piecewise_prefill for s in ready_sessions)
        last_hidden = _feed_pieces(engine, ready_sessions, units, piecewise)
        take_tails(engine, ready_sessions)  # fed with the units
        logits = engine.model.llm.logits(torch.stack(last_hidden))
        record_prefill(ready_sessions, logits, [u.schema for u in units])
    stamp_prefill(results, (t_vision - t0) * 1000, (t_audio - t_vision) * 1000, t_audio)
    return results


def record_prefill(
    sessions: Sequence[Session], logits: torch.Tensor, schemas: Sequence[list[SchemaItem]]
) -> None:
    """Keep each prefilled session's next-token logits `logits[k]` for the decision, and its unit's schema."""
    for k, s in enumerate(sessions):
        st = _state(s)
        st.pending_logits = logits[k]
        st.schema.append(schemas[k])
        st.units_prefilled += 1


def stamp_prefill(
    results: Sequence[UnitResult], vision_ms: float, audio_ms: float, feed_started: float
) -> None:
    """Prefill timings (vision, audio encoder, LLM feed from `feed_started` up to now) on every unit."""
    feed_ms = (time.perf_counter() - feed_started) * 1000
    for r in results:
        r.timings_ms.update(vision_ms=vision_ms, audio_ms=audio_ms, prefill_feed_ms=feed_ms)


def _feed_pieces(
    engine: Engine, sessions: Sequence[Session], units: Sequence[_UnitPieces], piecewise: bool
) -> list[torch.Tensor]:
    """Feed each session's pieces; returns the last hidden state `[D]` per session."""
    if not sessions:
        return []
    if not piecewise:
        hidden = engine.feed(sessions, [torch.cat(u.pieces) for u in units])
        return [h[-1] for h in hidden]
    last: list[torch.Tensor | None] = [None] * len(sessions)
    for r in range(max(len(u.pieces) for u in units)):
        rows = [k for k, u in enumerate(units) if r < len(u.pieces)]
        hidden = engine.feed([sessions[k] for k in rows], [units[k].pieces[r] for k in rows])
        for k, h in zip(rows, hidden, strict=True):
            last[k] = h[-1]
    return [h for h in last if h is not None]


# ---- the decision ---------------------------------------------------------------------------------------------


def decide_token(
    engine: Engine, st: DuplexState, raw_logits: torch.Tensor, generator: torch.Generator
) -> int:
    """One listen/speak/text decision on the raw `[V]` logits (§3.3.3 step 2)."""
    cfg, sp = st.config, engine.special
    greedy = cfg.decode_mode == "greedy"
    # A first, untempered draw decides whether the unit's speech ends here.
    first = int(torch.argmax(raw_logits)) if greedy else sample(raw_logits, generator)
    if first == sp.chunk_eos:
        return sp.chunk_eos
    logits = raw_logits.float().clone()
    ban(logits, engine.duplex_bans)
    recent = set(st.decoded[-cfg.text_repetition_window :]) if cfg.text_repetition_window else set()
    if cfg.text_repetition_penalty != 1.0 and recent:
        idx = torch.tensor(sorted(recent), dtype=torch.long, device=logits.device)
        vals = logits[idx]
        if cfg.repetition_penalty_style == "reference":
            logits[idx] = vals / cfg.text_repetition_penalty
        else:
            logits[idx] = torch.where(
                vals > 0, vals / cfg.text_repetition_penalty, vals * cfg.text_repetition_penalty
            )
    penalize_length(logits, [sp.turn_eos], cfg.length_penalty)
    if cfg.listen_prob_scale != 1.0:
        logits[sp.listen] *= cfg.listen_prob_scale
    if cfg.listen_top_k is not None and int((logits > logits[sp.listen]).sum()) < cfg.listen_top_k:
        return sp.listen
    if greedy:
        tok = int(torch.argmax(logits))
    else:
        tok = sample(top_k_top_p(logits / cfg.temperature, cfg.top_k, cfg.top_p), generator)
    st.decoded.append(tok)
    return tok


def at_unit_cap(engine: Engine, st: DuplexState, j: int) -> bool:
    """§3.3.3 step 1: step j is the unit's last (`max_new_speak_tokens_per_chunk - 1`): the unit ends with
    `<|chunk_eos|>`, nothing decoded."""
    if j != st.config.max_new_speak_tokens_per_chunk - 1:
        return False
    st.pending_terminator = engine.special.chunk_eos
    st.total_ids.append(engine.special.chunk_eos)
    return True


def unit_token(engine: Engine, st: DuplexState, res: UnitResult, decided: int | None) -> int:
    """The token a unit step applies: `<|listen|>` for a forced listen (`decided` None); else the decision
    (listed in `res.decoded_ids`), where a `<|listen|>` inside an open turn becomes `<|tts_bos|>` (a turn in
    progress cannot fall silent)."""
    sp = engine.special
    if decided is None:
        return sp.listen
    res.decoded_ids.append(decided)
    return sp.tts_bos if decided == sp.listen and st.turn_open else decided


def record_fed(engine: Engine, st: DuplexState, res: UnitResult, tok: int) -> None:
    """After `tok` was fed: `<|turn_eos|>` ends the turn (the unit goes on; a terminator usually follows)."""
    if tok == engine.special.turn_eos:
        res.end_of_turn = True
        st.turn_open = False


def record_token(
    engine: Engine, st: DuplexState, res: UnitResult, unit_ids: Sequence[int], tok: int, j: int
) -> bool:
    """Apply the j-th decided token of a unit (§3.3.3 steps 4–5): append it, end the unit on a terminator or at
    the per-unit character cap. Returns whether the token is to be fed to the LLM."""
    sp = engine.special
    st.total_ids.append(tok)
    res.is_listen = tok == sp.listen
    if tok in (sp.listen, sp.chunk_eos, sp.chunk_tts_eos):
        st.pending_terminator = tok  # fed with </unit> in front of the next unit (or by finalize_units)
        return False
    st.turn_open = True
    if j != 0:
        if reaches_chars(engine.tokenizer, [*unit_ids, tok], st.config.max_unit_chars):
            st.total_ids[-1] = sp.chunk_eos
            st.pending_terminator = sp.chunk_eos
            return False
    return True


def reaches_chars(tokenizer: MiniCPMOTokenizer, ids: Sequence[int], limit: int) -> bool:
    """Whether `tokenizer.decode(ids, skip_special_tokens=True)` has at least `limit` characters (the unit
    text cap), mostly without decoding: from the ids' bytes (`MiniCPMOTokenizer.decoded_bytes`), which the
    decoder reads as UTF-8, replacing invalid parts. Every character, replacement or not, takes at least one
    byte; a valid byte string has exactly its UTF-8 characters; after its longest valid prefix, the rest of an
    invalid one gives at least one character and at most one per byte. Only when those bounds straddle the
    limit (a split multi-byte character right at the cap) is the text decoded."""
    table = tokenizer.decoded_bytes
    pieces = [table[t] if 0 <= t < len(table) else None for t in ids]
    if all(p is not None for p in pieces):
        data = b"".join(pieces)  # type: ignore[arg-type]
        if len(data) < limit:
            return False
        try:
            return len(data.decode("utf-8")) >= limit
        except UnicodeDecodeError as err:
            valid = len(data[: err.start].decode("utf-8"))
            if valid + 1 >= limit:
                return True
            if valid + len(data) - err.start < limit:
                return False
    return len(tokenizer.decode(ids, skip_special_tokens=True)) >= limit


@dataclass
class _UnitRun:
    index: int
    st: DuplexState
    forced: bool
    logits: torch.Tensor
    unit_ids: list[int] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)
    done: bool = False


@torch.no_grad()
def generate_units(
    engine: Engine,
    sessions: Sequence[Session],
    force_listen: Sequence[bool] | None = None,
    prefills: Sequence[UnitResult] | None = None,
    observe_logits: Callable[[Session, torch.Tensor], None] | None = None,
) -> list[UnitResult]:
    """Decide listen/speak for each session's pending unit and decode its text, batched across sessions."""
    t0 = time.perf_counter()
    sp = engine.special
    force_listen = list(force_listen) if force_listen is not None else [False] * len(sessions)
    results = list(prefills) if prefills is not None else [UnitResult(session=s) for s in sessions]
    runs: list[_UnitRun] = []
    closers: list[int] = []
    for i, s in enumerate(sessions):
        st = _state(s)
        if st.pending_logits is None:
            results[i].is_listen = True  # nothing prefilled: listen, no tail of its own
            continue
        logits, st.pending_logits = st.pending_logits, None
        forced = start_unit(s, force_listen[i])
        results[i].forced_listen = forced
        runs.append(_UnitRun(i, st, forced, logits))
        if force_listen[i] and st.turn_open:
            closers.append(len(runs) - 1)
    if closers:
        # The user interrupted a turn: close it with <|turn_eos|> before the forced listen.
        hidden = engine.feed_ids([sessions[runs[k].index] for k in closers], [[sp.turn_eos]] * len(closers))
        new_logits = engine.last_logits(hidden)
        for row, k in enumerate(closers):
            run = runs[k]
            run.st.total_ids.append(sp.turn_eos)
            run.st.turn_open = False
            run.logits = new_logits[row]
            results[run.index].closed_turn_by_force = True

    max_steps = max((r.st.config.max_new_speak_tokens_per_chunk for r in runs), default=0)
    for j in range(max_steps):
        to_feed: list[tuple[_UnitRun, int]] = []
        for run in runs:
            if run.done:
                continue
            st, res = run.st, results[run.index]
            if at_unit_cap(engine, st, j):
                run.done = True
                continue
            decided = None
            if not run.forced:
                if observe_logits is not None:
                    observe_logits(sessions[run.index], run.logits.clone())
                decided = decide_token(engine, st, run.logits, sessions[run.index].generator)
            tok = unit_token(engine, st, res, decided)
            if not record_token(engine, st, res, run.unit_ids, tok, j):
                run.done = True
                continue
            to_feed.append((run, tok))
        if not to_feed:
            break
        hidden = engine.feed_ids([sessions[r.index] for r, _ in to_feed], [[t] for _, t in to_feed])
        logits = engine.last_logits(hidden)
        for row, ((run, tok), h) in enumerate(zip(to_feed, hidden, strict=True)):
            run.logits = logits[row]
            record_fed(engine, run.st, results[run.index], tok)
            if j != 0:  # the unit's first token is never spoken
                run.unit_ids.append(tok)
                run.hidden.append(h[-1])
    t1 = time.perf_counter()
    for run in runs:
        res = results[run.index]
        end_unit(engine, run.st)
        res.tts_token_ids = list(run.unit_ids)
        res.tts_hidden = torch.stack(run.hidden) if run.hidden else None
        res.text = engine.tokenizer.decode(run.unit_ids, skip_special_tokens=True) if run.unit_ids else ""
        if res.is_listen:
            res.text, res.tts_token_ids, res.tts_hidden = "", [], None
    ran = {run.index for run in runs}
    for i, s in enumerate(sessions):
        # a session that did not run this unit may still hold the previous unit's tail
        results[i].kv_length = engine.kv_length(s) if i in ran else context_length(engine, s)
        results[i].timings_ms["generate_ms"] = (t1 - t0) * 1000
    return results


def start_unit(session: Session, force_listen: bool) -> bool:
    """Begin deciding the session's prefilled unit; returns whether the unit is a forced listen."""
    st = _state(session)
    if st.tail_pending:  # the prefill feeds it; a unit cannot start before it
        raise RuntimeError(f"session {session.session_id!r}: the previous unit's tail was not fed")
    st.units_generated += 1
    st.pending_terminator = None
    return st.units_generated <= st.config.force_listen_count or force_listen


def end_unit(engine: Engine, st: DuplexState) -> None:
    """The unit's decisions are complete: its tail (`[terminator] </unit>`) is now pending."""
    st.total_ids.append(engine.special.unit_end)
    st.tail_pending = True


# ---- finalize -------------------------------------------------------------------------------------------------


@torch.no_grad()
def finalize_units(engine: Engine, sessions: Sequence[Session]) -> None:
    """Feed the pending tails (terminator if any, `</unit>`) of the sessions in one batched forward, so their
    KV is complete now rather than at their next prefill. Sessions without a pending tail are skipped."""
    todo = [s for s in sessions if _state(s).tail_pending]
    if todo:
        engine.feed_ids(todo, [pending_tail(engine, s) for s in todo])
        take_tails(engine, todo)


def tts_condition(engine: Engine, result: UnitResult) -> torch.Tensor:
    """The TTS condition of a speaking unit: emb_text(t) + L2norm(projector_semantic(h)) per spoken token,
    then audio_bos (the duplex TTS never gets text_eos)."""
    tts = engine.model.tts
    if tts is None:
        raise RuntimeError("the model was loaded without the TTS")
    d = engine.model.config.llm.hidden_size
    hidden = result.tts_hidden if result.tts_hidden is not None else torch.zeros(0, d)
    return tts.condition(torch.tensor(result.tts_token_ids, dtype=torch.long), hidden, text_finished=False)


def step_units(engine: Engine, sessions: Sequence[Session], inputs: Sequence[UnitInput]) -> list[UnitResult]:
    """Prefill and decide one unit for every session (the unit's tail is fed by the next one's prefill, or by
    `finalize_units`)."""
    pre = prefill_units(engine, sessions, inputs)
    return generate_units(engine, sessions, [u.force_listen for u in inputs], pre)
