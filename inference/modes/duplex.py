"""`audio_duplex` and `omni_duplex`: the 1 s full-duplex unit loop (spec §3.3) over the shared engine.

Each unit (1 s of caller audio, plus the newest camera frame in omni) runs the engine's list-of-sessions
step functions — `prefill_units`, `generate_units`, `finalize_units` — and, when the model speaks, the TTS
and the vocoder. Outputs per unit: `text` deltas, speech (24 kHz, played as soon as it arrives), `state`
changes, and `UnitTimings` (prefill, decide, TTS, vocoder, KV length, backlog).

Turns: a spoken turn opens on the first speaking unit and gets its own turn number; it ends when the model
emits `<|turn_eos|>` (its tail is flushed out of the vocoder and plays to the end). A listen decision while
a turn is still open (the user interrupted, or the caller sent `interrupt`) cuts it: `Flush` drops the queued
speech at once and the next turn gets a new number.

Falling behind: every unit is processed, in order — the model hears all of the caller's audio. When more
than `max_backlog_units` units of the session are already waiting behind the current one, the unit is
processed as a forced listen without speech (no TTS, no vocoder), so the session catches up instead of
speaking about the past; every `metrics` event carries `backlog_units` and `queue_ms`.

Context: the system prompt (with the reference voice) is kept; when the KV slot would pass its limit the
oldest whole units are dropped and the rest are moved down with their RoPE re-rotated
(`MiniCPMO45.engine.context_window`), so a call can go on indefinitely.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from inference.engine_host import EngineHost, get_host
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
from inference.speech import DuplexVoice, speak_units
from MiniCPMO45.engine import duplex as dx
from MiniCPMO45.engine.context_window import SlidingWindow
from MiniCPMO45.engine.session import Session

OUTPUT_RATE = 24000
UNIT_SAMPLES = 16000
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
        self.session: Session | None = None
        self.voice: DuplexVoice | None = None
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
        voice = self.host.voice(options.voice)
        self.session = self.host.engine.open_session(seed=self.options.seed)
        self.voice = DuplexVoice.open(self.host, voice, seed=self.options.seed)
        self._prepare()
        setup = SessionSetup(
            unit_samples=UNIT_SAMPLES,
            output_rate=OUTPUT_RATE,
            video_max_side=FRAME_MAX_SIDE if self.omni else None,
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
        dx.prepare(engine, self.session, self.system_prompt, self.voice.voice.audio_16k, config)
        limit = self.options.max_kv_tokens or engine.cache.max_len
        limit = min(limit, engine.cache.max_len)
        keep = self.options.keep_kv_tokens or limit * 3 // 4
        protected = engine.kv_length(self.session)
        self.window = SlidingWindow(protected, limit, min(keep, limit))

    def close(self) -> None:
        if self.host is not None and self.session is not None:
            self.host.engine.close_session(self.session)
        if self.voice is not None:
            self.voice.close()
        self.session = self.voice = None

    # ---- units ------------------------------------------------------------------------------------------------
    def on_unit(self, unit: UnitInput, frame: np.ndarray | None) -> list[Output]:
        assert self.host is not None and self.session is not None and self.voice is not None
        assert self.window is not None
        if self.paused:
            return []
        engine, session = self.host.engine, self.session
        timings: dict[str, float] = {"backlog_units": float(unit.queued_units)}
        catching_up = unit.queued_units > self.options.max_backlog_units
        t0 = time.perf_counter()
        dropped = self.window.make_room(engine, session, UNIT_BUDGET[self.name])
        self.window.mark(engine.kv_length(session))
        frames = [Image.fromarray(frame)] if self.omni and frame is not None else []
        inputs = [dx.UnitInput(audio=unit.pcm, frames=frames)]
        prefills = dx.prefill_units(engine, [session], inputs)
        force_listen = catching_up or self.close_turn or self.options.force == "listen"
        self.close_turn = False
        if self.options.force == "speak" and not force_listen:
            self._force_speak(session)
        t1 = time.perf_counter()
        result = dx.generate_units(engine, [session], force_listen=[force_listen], prefills=prefills)[0]
        dx.finalize_units(engine, [session])
        t2 = time.perf_counter()
        outputs = self._speech_outputs(result, catching_up, timings)
        timings.update(
            prefill_ms=(t1 - t0) * 1000,
            decide_ms=(t2 - t1) * 1000,
            kv_tokens=float(engine.kv_length(session)),
            dropped_tokens=float(dropped),
        )
        outputs.append(UnitTimings(timings))
        return outputs

    def _force_speak(self, session: Session) -> None:
        """Test option: make the unit's first decision `<|speak|>` (later tokens are the model's own)."""
        st = session.duplex
        if st is None or st.pending_logits is None:
            return
        speak = self.host.engine.special.speak  # type: ignore[union-attr]
        forced = torch.full_like(st.pending_logits, -1e4)
        forced[speak] = 0.0
        st.pending_logits = forced

    def _speech_outputs(
        self, result: dx.UnitResult, catching_up: bool, timings: dict[str, float]
    ) -> list[Output]:
        assert self.host is not None and self.voice is not None
        outputs: list[Output] = []
        if result.is_listen:
            if self.speaking:  # cut off mid-turn: drop what is still queued, at once
                self.turn += 1
                outputs += [Flush(self.turn), State("listening")]
                self.speaking = False
                self.voice.end_turn()
            return outputs
        if not self.speaking:
            self.speaking = True
            outputs.append(State("speaking"))
        if result.text:
            outputs.append(Text(result.text, self.turn))
        if not catching_up:
            condition = dx.tts_condition(self.host.engine, result)
            pieces, times = speak_units([self.voice], [condition], [result.end_of_turn])
            timings.update(tts_ms=times.tts_ms, vocoder_ms=times.vocoder_ms)
            outputs += [Speech(pcm, self.turn) for pcm in pieces[0] if pcm.size]
        if result.end_of_turn:
            self.voice.end_turn()
            self.speaking = False
            self.turn += 1
            outputs.append(State("listening"))
        return outputs

    # ---- controls ---------------------------------------------------------------------------------------------
    def on_control(self, message: dict[str, Any]) -> list[Output]:
        kind = message.get("type")
        if kind == "pause":
            self.paused = True
        elif kind == "resume":
            self.paused = False
        elif kind == "interrupt" and self.speaking:
            assert self.voice is not None
            self.turn += 1
            self.speaking = False
            self.close_turn = True
            self.voice.end_turn()
            return [Flush(self.turn), State("listening")]
        elif kind == "system_prompt":
            # A new system prompt starts a new conversation (the KV cache holds the old prompt at its start).
            assert self.voice is not None
            self.system_prompt = str(message.get("text") or DEFAULT_PROMPTS[self.name])
            was_speaking = self.speaking
            self.voice.end_turn()
            self.speaking = False
            self._prepare()
            if was_speaking:
                self.turn += 1
                return [Flush(self.turn), State("listening")]
        return []
