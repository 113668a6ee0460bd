"""`chat`: turn-based voice chat over the shared engine (half-duplex conversation in one KV slot).

The caller's audio arrives in 320 ms units. Silero VAD (`inference.vad`) finds speech: a user turn starts
when speech starts (with 0.5 s of audio before it) and ends after `min_silence_ms` of silence, or at once
when the client sends `end_turn` (push-to-talk: without any detected speech the audio since the last turn,
at most 30 s, is the turn). Typed text (`text`) is a turn as well.

A reply is generated a step at a time (at most `TEXT_CHUNK` tokens and their speech per step), one step per
unit when no later unit of the session is waiting, so VAD keeps running on every unit while the model
answers. Text deltas go out as `text` events; speech goes out as it is produced. Barge-in: speech detected
during a reply (or `interrupt`) drops the reply — `Flush` empties the outbound speech queue at once, the
state goes back to `listening`, and what the user says becomes the next turn.

Context: every user turn starts a span; when the KV slot would pass its limit, the oldest whole turns after
the system prompt are dropped (RoPE re-rotated, `MiniCPMO45.engine.context_window`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from inference.engine_host import EngineHost, get_host
from inference.modes.base import (
    Flush,
    ModeError,
    Output,
    SessionOptions,
    SessionSetup,
    Speech,
    State,
    Text,
    UnitInput,
    UnitTimings,
    UserTurn,
)
from inference.options import ModeOptions
from inference.speech import TurnVoice
from inference.vad import TurnDetector
from MiniCPMO45.engine import half_duplex as hd
from MiniCPMO45.engine.context_window import SlidingWindow
from MiniCPMO45.engine.generation import TokenEvent
from MiniCPMO45.engine.half_duplex import AudioSegment
from MiniCPMO45.engine.sampling import ChatSampling
from MiniCPMO45.engine.session import Session
from MiniCPMO45.modules.tts import TTSSession

RATE = 16000
UNIT_SAMPLES = 5120  # 320 ms: 10 VAD windows
PREROLL_SAMPLES = RATE // 2
MAX_TURN_SAMPLES = 30 * RATE
OUTPUT_RATE = 24000
DEFAULT_PROMPT = "You are a helpful voice assistant. Answer briefly, in a natural spoken style."


class Reply:
    """One reply in progress: the token stream and its speech."""

    def __init__(self, events: Iterator[list[TokenEvent]], voice: TurnVoice, turn: int) -> None:
        self.events = events
        self.voice = voice
        self.turn = turn
        self.spoken = False
        self.done = False
        self.llm_ms = 0.0

    def step(self) -> list[Output]:
        """Produce the next window of speech, or, when the fed text is all spoken, pull up to TEXT_CHUNK
        more tokens (their text goes out at once; their speech on the next steps)."""
        outputs: list[Output] = []
        voice = self.voice
        if not voice.busy:
            while not voice.busy and not self.done:
                started = time.perf_counter()
                step_events = next(self.events, None)
                self.llm_ms += (time.perf_counter() - started) * 1000
                if not step_events:
                    self.done = True
                for event in step_events or []:
                    if event.text_delta:
                        outputs.append(Text(event.text_delta, self.turn))
                    if event.token is not None and event.hidden is not None:
                        voice.add(event.token, event.hidden)
                    if event.done:
                        self.done = True
            if self.done:
                voice.finish()
        for pcm in voice.next_audio():
            if pcm.size:
                if not self.spoken:
                    outputs.append(State("speaking"))
                    self.spoken = True
                outputs.append(Speech(pcm, self.turn))
        return outputs

    @property
    def finished(self) -> bool:
        return self.done and not self.voice.busy


class ChatMode:
    name = "chat"

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.host: EngineHost | None = None
        self.session: Session | None = None
        self.tts: TTSSession | None = None
        self.reply: Reply | None = None
        self.turn = 0
        self.paused = False
        self.collecting = False
        self.segment: list[np.ndarray] = []
        self.recent: deque[np.ndarray] = deque()  # audio since the last turn (push-to-talk fallback)
        self.recent_samples = 0

    # ---- lifecycle --------------------------------------------------------------------------------------------
    def open(self, options: SessionOptions) -> tuple[SessionSetup, list[Output]]:
        self.options = ModeOptions.model_validate(
            {k: v for k, v in options.extra.items() if k in ModeOptions.model_fields}
        )
        self.host = get_host(self.settings)
        self.voice_id = options.voice
        self.voice = self.host.voice(options.voice)
        self.system_prompt = options.system_prompt or DEFAULT_PROMPT
        self.session = self.host.engine.open_session(seed=self.options.seed)
        try:
            self._open_session_parts()
        except BaseException:
            self.close()  # a failed open must not keep its KV or TTS slot
            raise
        return SessionSetup(unit_samples=UNIT_SAMPLES, output_rate=OUTPUT_RATE), [State("listening")]

    def _open_session_parts(self) -> None:
        assert self.host is not None
        self.tts = self.host.tts.new_session(self.host.tts_cache, seed=self.options.seed)
        self.detector = TurnDetector(self.options.vad_threshold, self.options.min_silence_ms)
        self.sampling = ChatSampling(
            temperature=self.options.temperature,
            top_p=self.options.top_p,
            top_k=self.options.top_k,
            length_penalty=self.options.length_penalty,
        )
        self._prefill_system()

    def _prefill_system(self) -> None:
        assert self.host is not None and self.session is not None
        engine = self.host.engine
        content: list[hd.Content] = [self.system_prompt]
        if self.voice_id:  # an explicit reference voice also goes to the LLM, inside the system message
            feats, lens = hd.batch_features([self.voice.audio_16k], hd.DYNAMIC_FLOOR)
            content = [self.system_prompt, AudioSegment(torch.from_numpy(feats), int(lens[0]))]
        hd.prefill_system(engine, self.session, content)
        limit = min(self.options.max_kv_tokens or engine.cache.max_len, engine.cache.max_len)
        keep = min(self.options.keep_kv_tokens or limit * 3 // 4, limit)
        self.window = SlidingWindow(engine.kv_length(self.session), limit, keep)

    def close(self) -> None:
        self.reply = None
        tts, self.tts = self.tts, None
        try:
            if tts is not None:
                tts.close()
        finally:
            if self.host is not None and self.session is not None:
                self.host.engine.close_session(self.session)
            self.session = None

    # ---- turns ------------------------------------------------------------------------------------------------
    def _remember(self, pcm: np.ndarray) -> None:
        self.recent.append(pcm)
        self.recent_samples += pcm.size
        while self.recent_samples - self.recent[0].size >= MAX_TURN_SAMPLES:
            self.recent_samples -= self.recent.popleft().size

    def _preroll(self) -> list[np.ndarray]:
        out, n = [], 0
        for pcm in reversed(self.recent):
            if n >= PREROLL_SAMPLES:
                break
            out.insert(0, pcm)
            n += pcm.size
        return out

    def _cut_reply(self) -> list[Output]:
        """Barge-in: drop the reply and the speech still queued for it."""
        if self.reply is None:
            return []
        self.reply = None
        self.turn += 1
        return [Flush(self.turn), State("listening")]

    def _start_reply(self, audio: np.ndarray | None, text: str | None) -> list[Output]:
        assert self.host is not None and self.session is not None
        engine, session = self.host.engine, self.session
        outputs = self._cut_reply()
        self.collecting = False
        self.segment = []
        self.recent.clear()
        self.recent_samples = 0
        if audio is not None and audio.size < RATE // 10:
            return outputs  # under 100 ms: nothing to answer
        if audio is not None:
            estimate = audio.size // 1600 + 8  # ~10 audio positions per second
        else:
            estimate = len(engine.tokenizer.encode(text or "")) + 8
        needed = estimate + self.options.max_new_tokens + 32
        try:
            self.window.make_room(engine, session, needed)
        except ValueError as exc:
            return [*outputs, ModeError("turn_too_long", str(exc))]
        self.window.mark(engine.kv_length(session))
        if audio is not None:
            outputs.append(UserTurn(self.turn, seconds=round(audio.size / RATE, 2)))
        else:
            outputs.append(UserTurn(self.turn, text=text))
        outputs.append(State("thinking"))
        if audio is not None:
            hd.prefill_user_samples(engine, session, audio, stream=False)
        else:
            hd.prefill_user_text(engine, session, text or "")
        extra_banned: list[int] = []
        if self.options.force == "speak":  # test option: the reply runs to max_new_tokens
            sp = engine.special
            extra_banned = [sp.tts_eos, sp.im_end, engine.eos_s]
        # display_text: the caller's text never shows control tokens (`<|tts_eos|>`, `<tool_call>`, ...)
        events = hd.generate_reply(
            engine,
            [session],
            self.sampling,
            self.options.max_new_tokens,
            extra_banned=extra_banned,
            display_text=True,
        )
        voice = TurnVoice(self.host, self.voice, self.tts)
        self.reply = Reply(events, voice, self.turn)
        return outputs

    def _advance(self) -> list[Output]:
        reply = self.reply
        if reply is None:
            return []
        outputs = reply.step()
        if reply.finished:
            self.reply = None
            self.turn += 1
            outputs.append(State("listening"))
        return outputs

    def on_unit(self, unit: UnitInput, frame: np.ndarray | None) -> list[Output]:
        if self.paused or self.session is None:
            return []
        started = time.perf_counter()
        outputs: list[Output] = []
        events = self.detector.push(unit.pcm)
        vad_ms = (time.perf_counter() - started) * 1000
        self._remember(unit.pcm)
        if self.collecting:
            self.segment.append(unit.pcm)
        for event in events:
            if event.kind == "start" and not self.collecting:
                outputs += self._cut_reply()
                self.collecting = True
                self.segment = self._preroll()
            elif event.kind == "end" and self.collecting:
                outputs += self._start_reply(np.concatenate(self.segment), None)
        timings = {"vad_ms": vad_ms, "backlog_units": float(unit.queued_units)}
        if self.reply is not None and unit.queued_units == 0 and not self.collecting:
            reply = self.reply
            llm_before, times_before = reply.llm_ms, (reply.voice.times.tts_ms, reply.voice.times.vocoder_ms)
            outputs += self._advance()
            timings.update(
                decide_ms=reply.llm_ms - llm_before,
                tts_ms=reply.voice.times.tts_ms - times_before[0],
                vocoder_ms=reply.voice.times.vocoder_ms - times_before[1],
            )
        assert self.host is not None
        timings["kv_tokens"] = float(self.host.engine.kv_length(self.session))
        outputs.append(UnitTimings(timings))
        return outputs

    # ---- controls ---------------------------------------------------------------------------------------------
    def on_control(self, message: dict[str, Any]) -> list[Output]:
        kind = message.get("type")
        if kind == "pause":
            self.paused = True
        elif kind == "resume":
            self.paused = False
        elif kind == "interrupt":
            return self._cut_reply()
        elif kind == "end_turn":
            audio = self.segment if self.collecting and self.segment else list(self.recent)
            if not audio:
                return [ModeError("empty_turn", "end_turn without any audio since the last turn")]
            self.detector.reset()
            return self._start_reply(np.concatenate(audio), None)
        elif kind == "text":
            text = str(message.get("text") or "").strip()
            if text:
                return self._start_reply(None, text)
        elif kind == "system_prompt":
            self.system_prompt = str(message.get("text") or DEFAULT_PROMPT)
            outputs = self._cut_reply()
            self._prefill_system()  # a new system prompt starts a new conversation
            return outputs
        return []
