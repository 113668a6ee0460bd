"""`audio_duplex` and `omni_duplex`: the 1 s full-duplex unit loop (spec §3.3) over the shared engine.

The worker runs the units of all its duplex sessions together: `DuplexMode.on_units` takes one unit of each
session that has one waiting and runs them as one tick of the host's `DuplexBatcher` — batched prefill
(streaming audio encoder, vision, ragged LLM feed), decode of the listen/speak/text tokens, the TTS and the
vocoder. Per session it keeps only the control flow: the context window, forced listens, turn numbers and
the outputs — `text` deltas, speech (24 kHz, played as soon as it arrives), `state` changes, and
`UnitTimings` (the tick's prefill / decide / TTS / vocoder times, batch size, KV length, backlog).

Turns: a spoken turn opens on the first speaking unit and gets its own turn number; it ends when the model
emits `<|turn_eos|>` (its tail is flushed out of the vocoder and plays to the end). A listen decision while
a turn is still open (the user interrupted, or the caller sent `interrupt`) cuts it: `Flush` drops the queued
speech at once and the next turn gets a new number.

Falling behind: every unit is processed, in order — the model hears all of the caller's audio. When more
than `max_backlog_units` units of the session are already waiting behind the current one, the unit is
processed as a forced listen (no TTS, no vocoder), so the session catches up instead of speaking about the
past; every `metrics` event carries `backlog_units` and `queue_ms`.

Context: the system prompt (with the reference voice) is kept; when the KV slot would pass its limit the
oldest whole units are dropped and the rest are moved down with their RoPE re-rotated
(`MiniCPMO45.engine.context_window`), so a call can go on indefinitely.

Sampling in a batch draws from the batcher's one generator, so a session's `seed` makes it reproducible
only when it runs alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from inference.engine_host import EngineHost, Voice, get_host
from inference.modes.base import (
    Flush,
    Output,
    SessionOptions,
    SessionSetup,
    Speech,
    State,
    Text,
    UnitInput,
    UnitTimings,
)
from inference.options import ModeOptions
from MiniCPMO45.audio.rates import DUPLEX_UNIT_SAMPLES, SPEECH_RATE
from MiniCPMO45.engine import duplex as dx
from MiniCPMO45.engine.batcher import DuplexBatcher, UnitOutput
from MiniCPMO45.engine.context_window import SlidingWindow
from MiniCPMO45.engine.session import Session

DEFAULT_PROMPTS = {
    "audio_duplex": "You are a helpful assistant. You are in duplex mode: you can listen and speak at the same time.",
    "omni_duplex": "Streaming Omni Conversation.",
}
# KV positions one unit may add: <unit> + image blocks (64 rows + 2 per view) + 10 audio rows + up to 20 decoded
# tokens + terminator + </unit>.
UNIT_BUDGET = {"audio_duplex": 40, "omni_duplex": 40 + 2 * 66}
FRAME_MAX_SIDE = 448


class DuplexMode:
    def __init__(self, name: str, settings: dict[str, Any]) -> None:
        if name not in DEFAULT_PROMPTS:
            raise ValueError(f"unknown duplex mode {name!r}")
        self.name = name
        self.omni = name == "omni_duplex"
        self.settings = settings
        self.host: EngineHost | None = None
        self.batcher: DuplexBatcher | None = None
        self.session: Session | None = None
        self.voice: Voice | None = None
        self.window: SlidingWindow | None = None
        self.turn = 0
        self.speaking = False
        self.paused = False
        self.close_turn = False  # the caller interrupted: the next unit closes the model's open turn

    # ---- lifecycle --------------------------------------------------------------------------------------------
    def open(self, options: SessionOptions) -> tuple[SessionSetup, list[Output]]:
        self.options = ModeOptions.model_validate(
            {k: v for k, v in options.extra.items() if k in ModeOptions.model_fields}
        )
        self.host = get_host(self.settings)
        self.system_prompt = options.system_prompt or DEFAULT_PROMPTS[self.name]
        self.voice = self.host.voice(options.voice)
        self.batcher = self.host.duplex_batcher()
        self.session = self.host.engine.open_session(seed=self.options.seed, top_slot=options.tick_phase == 1)
        try:
            self.batcher.attach(self.session.slot, self.voice.prompt)
            self._prepare()
        except BaseException:
            self.close()  # a failed open (e.g. out of memory) must not keep its KV slot
            raise
        setup = SessionSetup(
            unit_samples=DUPLEX_UNIT_SAMPLES,
            output_rate=SPEECH_RATE,
            video_max_side=FRAME_MAX_SIDE if self.omni else None,
            align_units=True,
        )
        return setup, [State("listening")]

    def _prepare(self) -> None:
        assert self.host is not None and self.session is not None and self.voice is not None
        engine = self.host.engine
        # Sampling settings the caller set explicitly override the duplex defaults (which differ from chat's:
        # top-k 20; length penalty 1.1 in omni and 1.05 in audio, as the reference UI uses).
        chosen = self.options.model_fields_set
        overrides = {k: getattr(self.options, k) for k in ("temperature", "top_p", "top_k") if k in chosen}
        penalty = self.options.length_penalty if "length_penalty" in chosen else (1.1 if self.omni else 1.05)
        config = dx.DuplexConfig(**overrides, length_penalty=penalty, seed=self.options.seed)
        dx.prepare(engine, self.session, self.system_prompt, self.voice.audio_16k, config)
        limit = self.options.max_kv_tokens or engine.cache.max_len
        limit = min(limit, engine.cache.max_len)
        keep = self.options.keep_kv_tokens or limit * 3 // 4
        protected = engine.kv_length(self.session)
        self.window = SlidingWindow(protected, limit, min(keep, limit))

    def close(self) -> None:
        if self.host is not None and self.session is not None:
            try:
                if self.batcher is not None:
                    self.batcher.release(self.session.slot)
            finally:  # the KV slot goes back even if the batcher's bookkeeping failed
                self.host.engine.close_session(self.session)
        self.session = self.voice = None

    def _end_turn(self) -> None:
        assert self.batcher is not None and self.session is not None
        self.batcher.end_turn(self.session.slot)
        self.speaking = False

    # ---- units ------------------------------------------------------------------------------------------------
    def on_unit(self, unit: UnitInput, frame: np.ndarray | None) -> list[Output]:
        return self.on_units([(self, unit, frame)])[0]

    @staticmethod
    def on_units(batch: Sequence[tuple[DuplexMode, UnitInput, np.ndarray | None]]) -> list[list[Output]]:
        """One unit of each of several duplex sessions (each at most once) as one tick of the batcher."""
        outputs: list[list[Output]] = [[] for _ in batch]
        live = [k for k, (mode, _, _) in enumerate(batch) if not mode.paused]
        if not live:
            return outputs
        modes = [batch[k][0] for k in live]
        batcher = modes[0].batcher
        assert batcher is not None and all(m.batcher is batcher for m in modes)
        engine = batcher.engine
        sessions, inputs, force_listen, scripts, catching_up, dropped = [], [], [], [], [], []
        # one device read for every session's KV length (not one per session)
        lengths = engine.cache.lengths[[m.session.slot for m in modes]].tolist()  # type: ignore[union-attr]
        for k, mode, length in zip(live, modes, lengths, strict=True):
            _, unit, frame = batch[k]
            assert mode.session is not None and mode.window is not None
            behind = unit.queued_units > mode.options.max_backlog_units
            # the previous unit's tail ([terminator] </unit>) is still pending: it goes in with this prefill
            context = length + len(dx.pending_tail(engine, mode.session))
            shed = 0
            if context + UNIT_BUDGET[mode.name] > mode.window.max_tokens:  # rare: the window slides
                shed = dx.make_room(engine, mode.session, mode.window, UNIT_BUDGET[mode.name])
                context = dx.context_length(engine, mode.session)
            dropped.append(shed)
            mode.window.mark(context)
            frames = [Image.fromarray(frame)] if mode.omni and frame is not None else []
            sessions.append(mode.session)
            inputs.append(dx.UnitInput(audio=unit.pcm, frames=frames))
            listen = behind or mode.close_turn or mode.options.force == "listen"
            mode.close_turn = False
            force_listen.append(listen)
            # the `force: speak` test option makes the unit's first decision <|speak|>; the rest is the model's
            scripts.append([engine.special.speak] if mode.options.force == "speak" and not listen else None)
            catching_up.append(behind)
        results = batcher.run_units(sessions, inputs, force_listen=force_listen, scripts=scripts)
        tick = batcher.timings
        after = engine.cache.lengths[[s.slot for s in sessions]].tolist()
        for n, (k, mode, out) in enumerate(zip(live, modes, results, strict=True)):
            timings = {
                "backlog_units": float(batch[k][1].queued_units),
                "prefill_ms": tick["prefill_ms"],
                "decide_ms": tick["generate_ms"],
                "batch_sessions": float(len(modes)),
                # the context after the unit: its KV plus the tail still pending
                "kv_tokens": float(after[n] + len(dx.pending_tail(engine, sessions[n]))),
                "dropped_tokens": float(dropped[n]),
            }
            outputs[k] = mode._unit_outputs(out, timings)
        return outputs

    def _unit_outputs(self, out: UnitOutput, timings: dict[str, float]) -> list[Output]:
        assert self.batcher is not None
        result, outputs = out.result, []
        if result.is_listen:
            if self.speaking:  # cut off mid-turn: drop what is still queued, at once
                self.turn += 1
                outputs += [Flush(self.turn), State("listening")]
                self._end_turn()
        else:
            if not self.speaking:
                self.speaking = True
                outputs.append(State("speaking"))
            # what the caller reads: the unit's tokens without control tokens (the engine's text keeps them)
            text = self.batcher.engine.tokenizer.display_text(result.tts_token_ids)
            if text:
                outputs.append(Text(text, self.turn))
            if out.speech is not None:
                timings.update(
                    tts_ms=self.batcher.timings["tts_ms"], vocoder_ms=self.batcher.timings["vocoder_ms"]
                )
                outputs += [Speech(pcm, self.turn) for pcm in out.speech.pcm if pcm.size]
            if result.end_of_turn:
                self.speaking = False  # the batcher closed the TTS and vocoder turn with its tail
                self.turn += 1
                outputs.append(State("listening"))
        outputs.append(UnitTimings(timings))
        return outputs

    # ---- controls ---------------------------------------------------------------------------------------------
    def on_control(self, message: dict[str, Any]) -> list[Output]:
        kind = message.get("type")
        if kind == "pause":
            self.paused = True
        elif kind == "resume":
            self.paused = False
        elif kind == "interrupt" and self.speaking:
            self.turn += 1
            self.close_turn = True
            self._end_turn()
            return [Flush(self.turn), State("listening")]
        elif kind == "system_prompt":
            # A new system prompt starts a new conversation (the KV cache holds the old prompt at its start).
            self.system_prompt = str(message.get("text") or DEFAULT_PROMPTS[self.name])
            was_speaking = self.speaking
            self._end_turn()
            self._prepare()
            if was_speaking:
                self.turn += 1
                return [Flush(self.turn), State("listening")]
        return []
