"""The full-duplex unit's state and rules (spec §3.3): one unit per second of user audio (plus an optional
video frame).

Per session: `prepare` once (system prefix, reference-audio embeddings, suffix); then every unit runs as part of
a tick of `engine.batcher.DuplexBatcher` (prefill, decode, TTS, vocoder for all sessions at once), and
`engine.duplex_session.DuplexSession` owns one call's state. This module holds what the tick needs per
session: the `DuplexConfig`, the `DuplexState`, the unit's inputs and results, and the integer bookkeeping of
the unit loop (`start_unit`, `unit_token`, `record_token`, `record_fed`, `at_unit_cap`, `end_unit`, the pending
tail). No model call runs here except `prepare`'s feeds. (The per-session reference loop the tests compare the
tick with lives in `tests/reference_engine.py`.)

A unit ends with a tail the decoder chose but did not feed: its terminator (if any) and `</unit>`. The
reference feeds that tail in a separate "finalize" forward after each unit. Here the tail waits in the state
and the next prefill feeds it in front of the next unit's `<unit>`, in the same forward: attention is causal,
so the KV and the logits are the ones the separate forward gives, and a unit costs one LLM step less.
`DuplexBatcher.finalize` feeds pending tails explicitly: before the session's KV is read as a whole (a
context-window slide, see `DuplexSession.make_room`; a mode switch keeps nothing, so it needs none).
`context_length` is the KV length with the pending tail counted: where the next unit starts.

The listen/speak decision (`batched_decision.decide_batch`) follows the reference decoder. Two reference bugs
are not copied: the listen scale/top-k settings act on `<|listen|>` (the reference applies them to
`<|im_end|>`), and by default the repetition penalty lowers negative logits instead of raising them (see
`DuplexConfig.repetition_penalty_style`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, Field

from ..audio.mel import DYNAMIC_FLOOR, FIXED_FLOOR_MODE, batch_features
from ..audio.mel_stream import StreamingMel
from ..tokenizer import MiniCPMOTokenizer
from .core import Engine
from .session import Mode, Session

if TYPE_CHECKING:
    from ..token2wav import PromptCache, TurnState
    from .unit_frames import EncodedFrames

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
    # Log-mel floor of the offline reference-audio features. The reference reads it from state its streaming
    # mel left on a shared extractor (fixed -10 while that buffer was under 5 s); the parity fixture was made
    # in that state, so "fixed" is the default.
    ref_audio_floor: Literal["fixed", "dynamic"] = "fixed"
    seed: int | None = None


@dataclass
class OpenUnit:
    """A unit whose start is in the KV before its audio came: the previous unit's tail, `<unit>` and its camera
    frame's image blocks (`DuplexBatcher.open_units`). `logits`: the next-token logits after them, the unit's
    decision input if no audio follows."""

    schema: list[SchemaItem]
    logits: torch.Tensor


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
    # (or `DuplexBatcher.finalize`) feeds it.
    tail_pending: bool = False
    # the next unit, opened before its audio came (`DuplexBatcher.open_units`): its tick feeds only the rest
    open_unit: OpenUnit | None = None
    decoded: list[int] = field(default_factory=list)  # every id the decoder chose (repetition window)
    # every id of the units after their prefill pieces, in KV order (a pending tail is already listed)
    total_ids: list[int] = field(default_factory=list)
    schema: list[list[SchemaItem]] = field(default_factory=list)
    system_length: int = 0
    # The call's speech: its voice (None: the batcher's default), whether its TTS turn is open (a unit that
    # opens one resets the slot's TTS cache) and its vocoder turn (started at the turn's first voiced unit).
    voice: PromptCache | None = None
    tts_open: bool = False
    vocoder_turn: TurnState | None = None

    def end_speech(self) -> None:
        """Forget the spoken turn (its tail was played, or it was cut off): TTS and vocoder restart."""
        self.tts_open = False
        self.vocoder_turn = None


@dataclass
class UnitInput:
    """One unit of user input: 1 s of 16 kHz mono audio and the frames taken at that second."""

    audio: np.ndarray | None
    frames: list[Image.Image] = field(default_factory=list)
    force_listen: bool = False
    max_slice_nums: int | None = None
    # the frames already through the vision tower (`DuplexBatcher.encode_frames`): `frames` is then not read
    encoded: EncodedFrames | None = None


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


def record_prefill(
    sessions: Sequence[Session],
    logits: torch.Tensor | Sequence[torch.Tensor],
    schemas: Sequence[list[SchemaItem]],
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


# ---- the decision ---------------------------------------------------------------------------------------------


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
        # fed with </unit> in front of the next unit (or by `DuplexBatcher.finalize`)
        st.pending_terminator = tok
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
