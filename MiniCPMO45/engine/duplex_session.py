"""One full-duplex call's engine state, in one object: `DuplexSession`.

It owns the call's KV slot (an engine `Session`), its `DuplexState` (unit counters, pending tail, decoded ids,
and its speech turn: voice, TTS turn, vocoder turn), and its context window. `DuplexSession.tick` runs one unit
of several calls as one tick of the shared `DuplexBatcher`, sliding each call's context window first when the
unit would not fit; the worker's `DuplexMode` adapts this to its outputs and never reads the engine itself.

    batcher = DuplexBatcher(engine, vocoder, default_voice)
    call = DuplexSession(batcher, voice, unit_budget=40, seed=1)
    call.prepare("Streaming Omni Conversation.", ref_audio_16k, DuplexConfig())
    [unit] = DuplexSession.tick([call], [UnitInput(audio)])
    ...
    call.close()
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..token2wav import PromptCache
from .batcher import DuplexBatcher, UnitOutput
from .context_window import SlidingWindow
from .duplex import DuplexConfig, DuplexState, UnitInput, _state, context_length, pending_tail, prepare
from .session import Mode
from .unit_frames import EncodedFrames


@dataclass
class TickUnit:
    """What one tick gave one call."""

    output: UnitOutput
    text: str  # what the caller reads of the unit's spoken tokens (no control tokens)
    kv_tokens: int  # the context after the unit: its KV plus the tail still pending
    dropped_tokens: int  # positions the context window dropped before the unit
    tick_ms: dict[str, float] = field(default_factory=dict)  # the tick's stage times (shared by its calls)


class DuplexSession:
    def __init__(
        self,
        batcher: DuplexBatcher,
        voice: PromptCache | None = None,
        *,
        unit_budget: int,
        seed: int | None = None,
        top_slot: bool = False,
    ) -> None:
        """A call on a free KV slot (with `top_slot`, the highest: the second tick phase). `voice` is the
        call's vocoder voice (None: the batcher's default); `unit_budget` the KV positions one unit may add."""
        self.batcher = batcher
        self.engine = batcher.engine
        self.voice = voice
        self.unit_budget = unit_budget
        self.session = self.engine.open_session(Mode.DUPLEX, seed=seed, top_slot=top_slot)
        self.window: SlidingWindow | None = None
        self._dropped_ahead = 0  # positions the window dropped to open the next unit ahead (`open_units`)

    # ---- state --------------------------------------------------------------------------------------------
    @property
    def slot(self) -> int:
        return self.session.slot

    @property
    def state(self) -> DuplexState:
        return _state(self.session)

    @property
    def closed(self) -> bool:
        return self.session.closed

    def context_length(self) -> int:
        """The KV length with the pending tail counted: where the next unit starts."""
        return context_length(self.engine, self.session)

    def prepare(
        self,
        system_prompt: str,
        ref_audio: np.ndarray | None,
        config: DuplexConfig,
        max_kv_tokens: int | None = None,
        keep_kv_tokens: int | None = None,
    ) -> None:
        """(Re)start the conversation: the system prompt with the reference audio, a fresh `DuplexState` (no
        turn carries over) and a context window of at most `max_kv_tokens` positions that slides down to
        `keep_kv_tokens` (default three quarters), the prompt kept."""
        prepare(self.engine, self.session, system_prompt, ref_audio, config)
        self.state.voice = self.voice
        limit = min(max_kv_tokens or self.engine.cache.max_len, self.engine.cache.max_len)
        keep = keep_kv_tokens or limit * 3 // 4
        self.window = SlidingWindow(self.engine.kv_length(self.session), limit, min(keep, limit))

    def end_turn(self) -> None:
        """Forget the spoken turn (played out, or cut off): the next speaking unit starts a new one."""
        if self.session.duplex is not None:
            self.state.end_speech()

    def close(self) -> None:
        """Give the KV slot back, the vocoder turn first (idempotent)."""
        try:
            self.end_turn()
        finally:  # the KV slot goes back even if ending the turn failed
            self.engine.close_session(self.session)

    # ---- the context window -------------------------------------------------------------------------------
    def make_room(self, needed: int) -> int:
        """Slide the window when `needed` more positions would not fit: the pending tail counts, and it is fed
        (one static step) before any unit is dropped, so every dropped span is a whole unit. Returns the
        positions dropped."""
        assert self.window is not None
        if self.context_length() + needed <= self.window.max_tokens:
            return 0
        self.batcher.finalize([self.session])
        return self.window.make_room(self.engine, self.session, needed)

    # ---- one tick -----------------------------------------------------------------------------------------
    @staticmethod
    def encode_frames(
        calls: Sequence[DuplexSession], frames: Sequence[Sequence[Image.Image]]
    ) -> list[EncodedFrames]:
        """Each call's frames of its next unit through the vision tower now, in one call (before the unit's tick:
        `UnitInput.encoded` takes them in)."""
        if not calls:
            return []
        batcher = calls[0].batcher
        if any(c.batcher is not batcher for c in calls):
            raise ValueError("the calls share one batcher")
        return batcher.encode_frames([c.session for c in calls], frames)

    @staticmethod
    def open_units(calls: Sequence[DuplexSession], encoded: Sequence[EncodedFrames]) -> None:
        """Open each call's next unit now with its frame's rows (`encode_frames`), before the unit's audio comes: the
        previous unit's tail, `<unit>` and the image blocks go into the KV (`DuplexBatcher.open_units`), the window
        sliding first as for a tick, and the unit's tick feeds only its audio. Only between a call's ticks."""
        if not calls:
            return
        batcher = calls[0].batcher
        if any(c.batcher is not batcher for c in calls):
            raise ValueError("the calls share one batcher")
        sessions = [c.session for c in calls]
        for call, length in zip(calls, batcher.engine.kv_lengths(sessions), strict=True):  # one device read
            call._dropped_ahead = call._start_unit(length + len(pending_tail(batcher.engine, call.session)))
        batcher.open_units(sessions, encoded)

    def can_open_unit(self) -> bool:
        """Whether the call is between units, with none opened ahead yet (`open_units`)."""
        return self.window is not None and self.state.open_unit is None and self.state.pending_logits is None

    def _start_unit(self, context: int) -> int:
        """Before a unit's first position goes in: slide the window if the unit might not fit, and mark where the
        unit starts. `context`: the call's context length (its KV and pending tail). Returns the positions
        dropped."""
        assert self.window is not None, "prepare the call first"
        shed = 0
        if context + self.unit_budget > self.window.max_tokens:  # rare: the window slides
            shed = self.make_room(self.unit_budget)
            context = self.context_length()
        self.window.mark(context)
        return shed

    @staticmethod
    def tick(
        calls: Sequence[DuplexSession],
        inputs: Sequence[UnitInput],
        force_listen: Sequence[bool] | None = None,
        force_speak: Sequence[bool] | None = None,
    ) -> list[TickUnit]:
        """One unit of each call (each at most once, all on one batcher) as one batcher tick. `force_listen[i]`
        makes call i's unit a listen (closing an open turn); `force_speak[i]` makes its first decision
        `<|speak|>` (the rest is the model's)."""
        if not calls:
            return []
        batcher = calls[0].batcher
        if any(c.batcher is not batcher for c in calls):
            raise ValueError("the calls of one tick share one batcher")
        engine = batcher.engine
        listen = list(force_listen) if force_listen is not None else [False] * len(calls)
        speak = list(force_speak) if force_speak is not None else [False] * len(calls)
        sessions = [c.session for c in calls]
        dropped = []
        for call, length in zip(calls, engine.kv_lengths(sessions), strict=True):  # one device read
            if call.state.open_unit is not None:  # opened ahead: the window made room for it then
                dropped.append(call._dropped_ahead)
                call._dropped_ahead = 0
                continue
            # the previous unit's tail ([terminator] </unit>) is still pending: it goes in with this prefill
            dropped.append(call._start_unit(length + len(pending_tail(engine, call.session))))
        scripts = [
            [engine.special.speak] if s and not li else None for s, li in zip(speak, listen, strict=True)
        ]
        outs = batcher.run_units(sessions, inputs, force_listen=listen, scripts=scripts)
        after = engine.kv_lengths(sessions)
        units = []
        for out, session, n, shed in zip(outs, sessions, after, dropped, strict=True):
            res = out.result
            text = "" if res.is_listen else engine.tokenizer.display_text(res.tts_token_ids)
            kv = n + len(pending_tail(engine, session))
            units.append(TickUnit(out, text, kv, shed, dict(batcher.timings)))
        return units
