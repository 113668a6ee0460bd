"""`audio_duplex` and `omni_duplex`: the 1 s full-duplex unit loop (spec §3.3) over the shared engine.

The worker runs the units of all its duplex sessions together: `DuplexMode.on_units` takes one unit of each
session that has one waiting and runs them as one tick of the host's `DuplexBatcher` — batched prefill
(streaming audio encoder, vision, ragged LLM feed), decode of the listen/speak/text tokens, the TTS and the
vocoder. Per session it keeps only the control flow: the context window, forced listens, turn numbers and
the outputs — `text` deltas, speech (24 kHz, played as soon as it arrives), `state` changes, and
`UnitMetrics` (the tick's prefill / decide / TTS / vocoder times, batch size, KV length, backlog).

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

The call's engine state (KV slot, unit state, speech turn, context window) is one
`MiniCPMO45.engine.duplex_session.DuplexSession`; this mode only maps it to the worker's outputs.

Sampling in a batch draws from the batcher's one generator, so a session's `seed` makes it reproducible
only when it runs alone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from inference import protocol as p
from inference.engine_host import EngineHost, get_host
from inference.modes.base import ModeUnit, Output, SessionOptions, SessionSetup
from inference.options import ModeOptions
from inference.settings import WorkerSettings
from MiniCPMO45.audio.rates import DUPLEX_UNIT_SAMPLES, SPEECH_RATE
from MiniCPMO45.engine.duplex import DuplexConfig
from MiniCPMO45.engine.duplex import UnitInput as EngineUnit
from MiniCPMO45.engine.duplex_session import DuplexSession, TickUnit
from MiniCPMO45.engine.unit_frames import EncodedFrames

DEFAULT_PROMPTS = {
    "audio_duplex": "You are a helpful assistant. You are in duplex mode: you can listen and speak at the same time.",
    "omni_duplex": "Streaming Omni Conversation.",
}
# KV positions one unit may add: <unit> + image blocks (64 rows + 2 per view) + 10 audio rows + up to 20 decoded
# tokens + terminator + </unit>.
UNIT_BUDGET = {"audio_duplex": 40, "omni_duplex": 40 + 2 * 66}
FRAME_MAX_SIDE = 448  # a frame's longer side where the server cannot size it for the model (`video_fit`)
AHEAD_KEPT = 2  # frames encoded ahead of their units that a session keeps (a later unit's may come first)


@dataclass
class EncodedAhead:
    """A frame that came ahead of its unit (`DuplexMode.encode_frames_ahead`): the frame object its unit will
    bring, what the vision tower gave and that run's ms, and, where the unit was opened with it
    (`prefill_ahead`), that step's ms."""

    frame: np.ndarray
    encoded: EncodedFrames
    vision_ms: float
    opened_ms: float | None = None


class DuplexMode:
    def __init__(self, name: str, settings: WorkerSettings) -> None:
        if name not in DEFAULT_PROMPTS:
            raise ValueError(f"unknown duplex mode {name!r}")
        self.name = name
        self.omni = name == "omni_duplex"
        self.settings = settings
        self.host: EngineHost | None = None
        self.call: DuplexSession | None = None  # the call's engine state
        self.audio_16k: np.ndarray | None = None  # the voice's reference audio (the system prompt's)
        self.turn = 0
        self.speaking = False
        self.paused = False
        self.close_turn = False  # the caller interrupted: the next unit closes the model's open turn
        # frames that came ahead of their units, through the vision tower (`encode_frames_ahead`), oldest first
        self.ahead: list[EncodedAhead] = []
        self.last_index = -1  # the index of the last unit the mode took (`ModeUnit.index`)

    # ---- lifecycle --------------------------------------------------------------------------------------------
    def open(self, options: SessionOptions) -> tuple[SessionSetup, list[Output]]:
        self.options = ModeOptions.model_validate(
            {k: v for k, v in options.extra.items() if k in ModeOptions.model_fields}
        )
        self.host = get_host(self.settings)
        self.system_prompt = options.system_prompt or DEFAULT_PROMPTS[self.name]
        voice = self.host.voice(options.voice)
        self.audio_16k = voice.audio_16k
        self.call = DuplexSession(
            self.host.duplex_batcher(),
            voice.prompt,
            unit_budget=UNIT_BUDGET[self.name],
            seed=self.options.seed,
            top_slot=options.tick_phase == 1,
        )
        try:
            self._prepare()
        except BaseException:
            self.close()  # a failed open (e.g. out of memory) must not keep its KV slot
            raise
        setup = SessionSetup(
            unit_samples=DUPLEX_UNIT_SAMPLES,
            output_rate=SPEECH_RATE,
            video_max_side=FRAME_MAX_SIDE if self.omni else None,
            video_fit=self._frame_fit() if self.omni else None,
            frames_ahead=self.omni and self.options.frames_ahead,
            align_units=True,
        )
        return setup, [p.StateOut(state="listening")]

    def _frame_fit(self) -> tuple[int, int]:
        """Frames come at the size the image processor gives one unsliced view (units take one slice): it then
        resizes nothing, and the camera's frame is resized once, from its own size, as the official demo's is."""
        assert self.host is not None
        images = self.host.engine.images.config
        return images.scale_resolution, images.patch_size

    def _prepare(self) -> None:
        assert self.call is not None
        # Sampling settings the caller set explicitly override the duplex defaults (which differ from chat's:
        # top-k 20; length penalty 1.1 in omni and 1.05 in audio, as the reference UI uses).
        chosen = self.options.model_fields_set
        overrides = {k: getattr(self.options, k) for k in ("temperature", "top_p", "top_k") if k in chosen}
        penalty = self.options.length_penalty if "length_penalty" in chosen else (1.1 if self.omni else 1.05)
        config = DuplexConfig(**overrides, length_penalty=penalty, seed=self.options.seed)
        self.call.prepare(
            self.system_prompt,
            self.audio_16k,
            config,
            self.options.max_kv_tokens,
            self.options.keep_kv_tokens,
        )

    def close(self) -> None:
        self.ahead = []
        if self.call is not None:
            self.call.close()
        self.call = None

    def _end_turn(self) -> None:
        assert self.call is not None
        self.call.end_turn()
        self.speaking = False

    # ---- units ------------------------------------------------------------------------------------------------
    def on_unit(self, unit: ModeUnit, frame: np.ndarray | None) -> list[Output]:
        return self.on_units([(self, unit, frame)])[0]

    @staticmethod
    def on_units(batch: Sequence[tuple[DuplexMode, ModeUnit, np.ndarray | None]]) -> list[list[Output]]:
        """One unit of each of several duplex sessions (each at most once) as one tick of the batcher."""
        outputs: list[list[Output]] = [[] for _ in batch]
        for mode, unit, _ in batch:
            mode.last_index = unit.index
        live = [k for k, (mode, _, _) in enumerate(batch) if not mode.paused]
        if not live:
            return outputs
        modes = [batch[k][0] for k in live]
        calls, inputs, force_listen, force_speak = [], [], [], []
        aheads: list[EncodedAhead | None] = []
        for k, mode in zip(live, modes, strict=True):
            _, unit, frame = batch[k]
            assert mode.call is not None
            behind = unit.queued_units > mode.options.max_backlog_units
            ahead = mode._take_ahead(frame)
            if ahead is not None and ahead.opened_ms is not None and mode.call.state.open_unit is None:
                # the call was prepared again since (a new system prompt): the frame is not in its KV
                ahead.opened_ms = None
            aheads.append(ahead)
            if ahead is not None and ahead.opened_ms is not None:  # in the KV already, with the unit's start
                frames, encoded = [], None
            elif ahead is not None:
                frames, encoded = [], ahead.encoded
            else:
                frames = [Image.fromarray(frame)] if mode.omni and frame is not None else []
                encoded = None
            calls.append(mode.call)
            inputs.append(EngineUnit(audio=unit.pcm, frames=frames, encoded=encoded))
            listen = behind or mode.close_turn or mode.options.force == "listen"
            mode.close_turn = False
            force_listen.append(listen)
            # the `force: speak` test option makes the unit's first decision <|speak|>; the rest is the model's
            force_speak.append(mode.options.force == "speak")
        units = DuplexSession.tick(calls, inputs, force_listen, force_speak)
        for k, mode, done, ahead in zip(live, modes, units, aheads, strict=True):
            timings = {
                "backlog_units": float(batch[k][1].queued_units),
                "prefill_ms": done.tick_ms["prefill_ms"],
                "decide_ms": done.tick_ms["generate_ms"],
                "batch_sessions": float(len(modes)),
                "kv_tokens": float(done.kv_tokens),
                "dropped_tokens": float(done.dropped_tokens),
            }
            if ahead is not None:
                timings["vision_ahead_ms"] = ahead.vision_ms
                if ahead.opened_ms is not None:
                    timings["prefill_ahead_ms"] = ahead.opened_ms
            outputs[k] = mode._unit_outputs(done, timings)
        return outputs

    @staticmethod
    def encode_frames_ahead(batch: Sequence[tuple[DuplexMode, np.ndarray, int]]) -> None:
        """The frames that came ahead of their units (each session's newest), through the vision tower in one
        call; each unit then takes its frame's rows (`_take_ahead`) instead of encoding it in its tick. With
        `prefill_ahead`, the units whose sessions are between units (their previous unit ticked, none opened) are
        opened with them in one more step (`DuplexSession.open_units`), and their ticks feed only the audio."""
        newest: dict[int, tuple[DuplexMode, DuplexSession, np.ndarray, int]] = {}
        for mode, frame, index in batch:
            if mode.omni and mode.call is not None:
                newest[id(mode)] = (mode, mode.call, frame, index)
        if not newest:
            return
        started = time.perf_counter()
        encoded = DuplexSession.encode_frames(
            [call for _, call, _, _ in newest.values()],
            [[Image.fromarray(frame)] for _, _, frame, _ in newest.values()],
        )
        vision_ms = (time.perf_counter() - started) * 1000
        entries = []
        for (mode, _, frame, _), enc in zip(newest.values(), encoded, strict=True):
            entry = EncodedAhead(frame, enc, vision_ms)
            mode.ahead = [*mode.ahead[1 - AHEAD_KEPT :], entry]
            entries.append(entry)
        opening = [
            (call, entry)
            for (mode, call, _, index), entry in zip(newest.values(), entries, strict=True)
            if mode._opens_unit(index)
        ]
        if opening:
            started = time.perf_counter()
            DuplexSession.open_units([c for c, _ in opening], [e.encoded for _, e in opening])
            opened_ms = (time.perf_counter() - started) * 1000
            for _, entry in opening:
                entry.opened_ms = opened_ms

    def _opens_unit(self, index: int) -> bool:
        """Whether unit `index` is opened ahead (`prefill_ahead`): the option is on, the call takes units (not
        paused) and is between units, and its unit before this one has ticked (a frame that comes while earlier
        units still wait would go into the KV before them)."""
        return (
            self.options.prefill_ahead
            and not self.paused
            and self.call is not None
            and self.last_index == index - 1
            and self.call.can_open_unit()
        )

    def _take_ahead(self, frame: np.ndarray | None) -> EncodedAhead | None:
        """The unit's frame that came ahead (the same frame object), through the tower already; frames that came
        ahead of earlier units than this one are dropped."""
        for k, entry in enumerate(self.ahead):
            if entry.frame is frame:
                del self.ahead[: k + 1]
                return entry
        return None

    def _unit_outputs(self, done: TickUnit, timings: dict[str, float]) -> list[Output]:
        out = done.output
        result, outputs = out.result, []
        if result.is_listen:
            if self.speaking:  # cut off mid-turn: drop what is still queued, at once
                self.turn += 1
                outputs += [p.FlushOut(turn=self.turn), p.StateOut(state="listening")]
                self._end_turn()
        else:
            if not self.speaking:
                self.speaking = True
                outputs.append(p.StateOut(state="speaking"))
            # what the caller reads: the unit's tokens without control tokens (the engine's text keeps them)
            if done.text:
                outputs.append(p.TextOut(text=done.text, turn=self.turn))
            if out.speech is not None:
                timings.update(tts_ms=done.tick_ms["tts_ms"], vocoder_ms=done.tick_ms["vocoder_ms"])
                outputs += [p.AudioOut(pcm=pcm, turn=self.turn) for pcm in out.speech.pcm if pcm.size]
            if result.end_of_turn:
                self.speaking = False  # the batcher closed the TTS and vocoder turn with its tail
                self.turn += 1
                outputs.append(p.StateOut(state="listening"))
        outputs.append(p.UnitMetrics(**timings))
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
            return [p.FlushOut(turn=self.turn), p.StateOut(state="listening")]
        elif kind == "system_prompt":
            # A new system prompt starts a new conversation (the KV cache holds the old prompt at its start).
            self.system_prompt = str(message.get("text") or DEFAULT_PROMPTS[self.name])
            was_speaking = self.speaking
            self._end_turn()
            self._prepare()
            if was_speaking:
                self.turn += 1
                return [p.FlushOut(turn=self.turn), p.StateOut(state="listening")]
        return []
