"""The per-session duplex reference: the unit loop as plain eager calls, session list by session list, the oracle
the tests compare the server's tick (`MiniCPMO45.engine.batcher.DuplexBatcher`) with. The server never runs it.

`prefill_units` → `generate_units` per unit (`step_units` both), `finalize_units` to feed pending tails in a
separate forward (the reference's order), `decide_token` (one decision on one row of logits, the rule
`batched_decision.decide_batch` vectorizes), `tts_condition` (one unit's TTS condition through the TTS's own
`condition`), `make_room` (a context-window slide around a pending tail). The bookkeeping these share with the
tick (`start_unit`, `record_token`, ... in `MiniCPMO45.engine.duplex`) is the server's, so only the model calls
and their batching differ.

Half-duplex chat, per session: `prefill_user_audio` / `prefill_user_samples` (a user segment fed on its own,
streamed 1 s at a time or whole), `prefill_user_text`, and `generate_reply` (assistant prefix + the reply loop,
`generation.generate`). The server builds a user turn with `half_duplex.user_turn_embeddings` and decodes
replies of many sessions with `generation.decode_steps` (`inference/modes/chat.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from MiniCPMO45.audio.mel_stream import push_many
from MiniCPMO45.engine.context_window import SlidingWindow
from MiniCPMO45.engine.core import Engine
from MiniCPMO45.engine.duplex import (
    DuplexState,
    SchemaItem,
    UnitInput,
    UnitResult,
    _state,
    at_unit_cap,
    context_length,
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
from MiniCPMO45.engine.generation import TokenEvent, generate, reference_chunk_budget
from MiniCPMO45.engine.half_duplex import (
    AudioSegment,
    _audio_placeholder,
    _ensure_mode,
    _prefill_text_and_audio,
    _segment_from_samples,
    _user_turn_prefix,
    assistant_prefix,
    reply_bans,
    start_reply_state,
)
from MiniCPMO45.engine.sampling import ChatSampling, ban, penalize_length, sample, top_k_top_p
from MiniCPMO45.engine.session import Session
from MiniCPMO45.modules.whisper import pooled_tokens


def make_room(engine: Engine, session: Session, window: SlidingWindow, needed: int) -> int:
    """`window.make_room` for a duplex session: the pending tail counts, and it is fed before any unit is
    dropped, so every dropped span is a whole unit. Returns the positions dropped."""
    if context_length(engine, session) + needed <= window.max_tokens:
        return 0
    finalize_units(engine, [session])
    return window.make_room(engine, session, needed)


@dataclass
class _UnitPieces:
    pieces: list[torch.Tensor]
    schema: list[SchemaItem]


@torch.no_grad()
def prefill_units(
    engine: Engine, sessions: Sequence[Session], inputs: Sequence[UnitInput], piecewise: bool = False
) -> list[UnitResult]:
    """Feed the previous unit's pending tail, then `<unit>`, the frames' image blocks and the 10 audio
    embeddings of each session's unit. A session without enough audio (and no frame) is not fed at all: its
    tail stays pending. With `piecewise`, one forward per piece (`<unit>`, `<image>`, image rows, ... audio
    rows) like the reference; else the whole unit in one forward (same function, float rounding differs)."""
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
        last_hidden = _feed_pieces(engine, ready_sessions, units, piecewise)
        take_tails(engine, ready_sessions)  # fed with the units
        logits = engine.model.llm.logits(torch.stack(last_hidden))
        record_prefill(ready_sessions, logits, [u.schema for u in units])
    stamp_prefill(results, (t_vision - t0) * 1000, (t_audio - t_vision) * 1000, t_audio)
    return results


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


# ---- half-duplex chat, per session ----------------------------------------------------------------------


def prefill_user_audio(engine: Engine, session: Session, segment: AudioSegment, stream: bool = True) -> None:
    """Append one user audio segment (a 1-s chunk when `stream`, else a whole VAD segment)."""
    _ensure_mode(engine, session)
    st = session.half_duplex
    prefix = _user_turn_prefix(st)
    n = pooled_tokens(segment.frames, engine.model.config.audio_pool_step)
    first = not st.prefilled_any
    _prefill_text_and_audio(engine, session, [prefix, _audio_placeholder(n)], [segment], stream_audio=stream)
    st.prefilled_any = True
    st.new_user_msg = False
    if first:
        session.audio_cache.clear()


def prefill_user_samples(engine: Engine, session: Session, samples: np.ndarray, stream: bool = True) -> None:
    """Append user audio given as 16 kHz mono samples.

    `stream=True`: a 1-s chunk through the session's streaming mel (the first chunk of a turn is left-padded
    to 1035 ms) and the streaming encoder. `stream=False`: a whole VAD segment, batch log-mel and full
    attention (what the reference half-duplex server does).
    """
    _ensure_mode(engine, session)
    if stream:
        features, _ = session.half_duplex.mel.push(samples)
        segment = AudioSegment(torch.from_numpy(features)[None])
    else:
        segment = _segment_from_samples(samples)
    prefill_user_audio(engine, session, segment, stream=stream)


def generate_reply(
    engine: Engine,
    sessions: Sequence[Session],
    params: ChatSampling,
    max_new_tokens: int = 256,
    use_tts_template: bool = True,
    spoken: bool = True,
    extra_banned: Sequence[int] = (),
    observe_logits: Callable[[Session, torch.Tensor], None] | None = None,
    display_text: bool = False,
) -> Iterator[list[TokenEvent]]:
    """Feed the assistant prefix and stream the reply tokens (with hidden states for the TTS); with
    `display_text` the text deltas carry no control tokens (what a caller reads).

    Like the reference, generation runs in chunks of 10 tokens, so `max_new_tokens` is rounded up to whole
    chunks; the final sampled token is neither fed nor reported.
    """
    for s in sessions:
        _ensure_mode(engine, s)
        start_reply_state(s)
    prefix = assistant_prefix(engine, use_tts_template)
    logits = engine.last_logits(engine.feed_ids(sessions, [prefix] * len(sessions)))
    return generate(
        engine,
        sessions,
        logits,
        params,
        reference_chunk_budget(max_new_tokens),
        reply_bans(engine, spoken, extra_banned),
        report_unfed_last=False,
        observe_logits=observe_logits,
        display_text=display_text,
    )


def prefill_user_text(engine: Engine, session: Session, text: str) -> None:
    """Append a typed user message (same turn bookkeeping as `prefill_user_audio`)."""
    _ensure_mode(engine, session)
    st = session.half_duplex
    prefix = _user_turn_prefix(st)
    engine.feed_ids([session], [engine.tokenizer.encode(prefix + text)])
    st.prefilled_any = True
    st.new_user_msg = False
