"""A chat reply started before its turn's end is certain (the `early_reply` option, on by default).

A spoken turn ends after a silence (`inference.vad.TurnDetector`), and the worker hears the caller a 320 ms unit
at a time. When a unit leaves the caller within one unit of silence of the turn's end
(`TurnDetector.ends_within`), that unit's tick already prefills the turn as heard so far and starts its reply with
the tick's other new replies: the first text chunk, TTS piece and vocoder window run in that tick, and what the
reply says is held (`EarlyStart.held`). In the next unit either

- the turn ends (the silence went on): the held outputs go out at once, before that tick's GPU work
  (`ModeUnit.emit`), so the turn end -> first speech is the unit's way into the tick rather than a tick's work; or
- it does not (the caller spoke on, or a control came): the reply is dropped before anything of it went out,
  and the session is put back as it was before the prefill (`EarlyStart.restore`: the KV slot cut back, the
  context window's span marks, the turn bookkeeping, the reply history and both random generators), so a seeded
  session's later replies are those it would have given without the early start.

The model of a turn answered this way has not heard the turn's last unit (silence: the VAD found no speech in it).
A dropped start costs its tick a reply's first chunk in the batched steps; `early_dropped` counts them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from inference.modes.base import Output
from MiniCPMO45.engine.context_window import SlidingWindow
from MiniCPMO45.engine.core import Engine
from MiniCPMO45.engine.session import Session
from MiniCPMO45.modules.tts import TTSSession


@dataclass
class EarlyStart:
    """A session's state from before an early reply's prefill, and what the reply said since (held)."""

    kv_length: int
    marks: int  # the context window's span marks
    half_duplex: tuple[
        bool, bool, bool, bool
    ]  # prefilled_any, new_user_msg, llm_generated, llm_generate_completed
    history: list[int]
    generator: torch.Tensor
    tts_generator: torch.Tensor
    held: list[Output] = field(default_factory=list)

    @classmethod
    def take(cls, engine: Engine, session: Session, window: SlidingWindow, tts: TTSSession) -> EarlyStart:
        st = session.half_duplex
        return cls(
            kv_length=engine.kv_length(session),
            marks=len(window.starts),
            half_duplex=(st.prefilled_any, st.new_user_msg, st.llm_generated, st.llm_generate_completed),
            history=list(session.history),
            generator=session.generator.get_state(),
            tts_generator=tts.generator.get_state(),
        )

    def restore(self, engine: Engine, session: Session, window: SlidingWindow, tts: TTSSession) -> None:
        """Undo the early reply: what it fed to the KV slot, its span mark, its turn bookkeeping, its history and
        what it drew from the generators. (Older turns the context window dropped to make room stay dropped.)"""
        engine.cache.truncate(session.slot, self.kv_length)
        del window.starts[self.marks :]
        st = session.half_duplex
        st.prefilled_any, st.new_user_msg, st.llm_generated, st.llm_generate_completed = self.half_duplex
        session.history = list(self.history)
        session.generator.set_state(self.generator)
        tts.generator.set_state(self.tts_generator)
