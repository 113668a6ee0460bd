"""`chat`: turn-based voice chat over the shared engine (half-duplex conversation in one KV slot).

The caller's audio arrives in 320 ms units. Silero VAD (`inference.vad`) finds speech: a user turn starts
when speech starts (with 0.5 s of audio before it) and ends after `min_silence_ms` of silence (after
`fast_silence_ms` when the VAD is confident and the caller's own pauses are short), or at once
when the client sends `end_turn` (push-to-talk: without any detected speech the audio since the last turn,
at most 30 s, is the turn). Typed text (`text`) is a turn as well.

The worker runs the units of all its chat sessions together (`ChatMode.on_units`, one tick): VAD and the turn
logic per session, then, batched over the sessions: the prefills of the turns that end in this tick (user audio
or text and the assistant prefix as one piece per session, one LLM step), the reply decoding (one batched
sample-and-feed step per token, `engine.generation.decode_steps`; steps run only when a reply's voice waits for
text, as many as its next chunk needs: `FIRST_TEXT_CHUNK` for a new reply, so its speech starts sooner, then
`TEXT_CHUNK`; the other replies decode up to one chunk ahead in those steps, `Reply.ahead`), the TTS draws of
every reply that has a text chunk to speak (`inference.speech.speak_batch`) and their vocoder windows. A reply
advances in a tick only when none of its session's later units is waiting and its speech is less than `LEAD_S`
ahead of real time (replies up to `JOIN_S` further ahead join it, so that the replies' work gathers in fewer
ticks), so VAD keeps running on every unit while the model answers and the tick's chat work stays proportional
to what the callers hear. Text deltas go out as `text` events; speech goes out as it is produced. Barge-in:
speech detected during a reply (or `interrupt`) drops the reply — `Flush` empties the outbound speech queue at
once, the state goes back to `listening`, and what the user says becomes the next turn. Early replies: a unit that
leaves the caller one unit of silence short of a turn's end starts the turn's reply in its tick, its outputs held
until the next unit ends the turn, then sent from inside that tick (`inference/modes/early_reply.py`).

Context: every user turn starts a span; when the KV slot would pass its limit, the oldest whole turns after
the system prompt are dropped (RoPE re-rotated, `MiniCPMO45.engine.context_window`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from inference import protocol as p
from inference.engine_host import EngineHost, get_host
from inference.images import decode_image
from inference.modes.base import ModeUnit, Output, SessionOptions, SessionSetup
from inference.modes.early_reply import EarlyStart
from inference.modes.heard import truncate_reply
from inference.options import ModeOptions
from inference.settings import WorkerSettings
from inference.speech import TEXT_CHUNK, TurnVoice, speak_batch
from inference.vad import WINDOW, TurnDetector, push_many
from MiniCPMO45.audio.rates import CHAT_UNIT_SAMPLES, MODEL_INPUT_RATE, SPEECH_RATE
from MiniCPMO45.engine import half_duplex as hd
from MiniCPMO45.engine.context_window import SlidingWindow
from MiniCPMO45.engine.core import Engine
from MiniCPMO45.engine.generation import ReplyRow, decode_steps, reference_chunk_budget, start_row
from MiniCPMO45.engine.half_duplex import AudioSegment
from MiniCPMO45.engine.sampling import ChatSampling
from MiniCPMO45.engine.session import Session
from MiniCPMO45.modules.tts import TTSSession

MAX_TURN_SAMPLES = 30 * MODEL_INPUT_RATE
MIN_TURN_SAMPLES = MODEL_INPUT_RATE // 10  # a shorter turn (100 ms) is not answered
DEFAULT_PROMPT = "You are a helpful voice assistant. Answer briefly, in a natural spoken style."


# a user turn: its 16 kHz audio, or its typed text and an optional still image
TurnInput = tuple[np.ndarray | None, str | None, Image.Image | None]
LEAD_S = 1.5  # a reply advances only while its produced speech is less than this ahead of real time
JOIN_S = 1.0  # ... or when it is less than LEAD_S + JOIN_S ahead and another reply advances in the same tick
UNIT_WINDOWS = CHAT_UNIT_SAMPLES // WINDOW  # VAD windows in a unit: how far ahead an early reply looks


class Reply:
    """One reply in progress: its decoding row and its speech. Text may be decoded up to one chunk ahead of the
    voice: while the voice speaks a chunk it takes no tokens, so they wait in `ahead` (`take`, `hand_over`)."""

    def __init__(self, row: ReplyRow, voice: TurnVoice, turn: int) -> None:
        self.row = row
        self.voice = voice
        self.turn = turn
        self.spoken_at: int | None = None  # index of the unit in whose tick its first speech went out
        # decoded tokens (with their hidden states) the voice has not taken yet
        self.ahead: list[tuple[int, torch.Tensor]] = []
        self.text_done = False  # the row has ended; the voice's text ends once it has taken every token

    @property
    def needs_tokens(self) -> bool:
        """Its speech waits for text: the voice is idle and no decoded token is waiting for it."""
        return not self.row.done and not self.voice.busy and not self.ahead

    @property
    def takes_tokens(self) -> bool:
        """It may decode now: at most one text chunk ahead of what its voice has taken."""
        return not self.row.done and len(self.ahead) < TEXT_CHUNK

    @property
    def tokens_to_speak(self) -> int:
        """Tokens its voice still needs before it can speak its next chunk."""
        return max(1, self.voice.chunk_tokens - len(self.voice.tokens))

    @property
    def finished(self) -> bool:
        return self.text_done and not self.ahead and self.voice.finished and not self.voice.busy

    def take(self, token: int, hidden: torch.Tensor) -> None:
        self.ahead.append((token, hidden))
        self.hand_over()

    def end_text(self) -> None:
        self.text_done = True
        self.hand_over()

    def hand_over(self) -> None:
        """Give the voice the decoded tokens it can take now (none while it speaks a chunk), and end its text once
        it has them all."""
        while self.ahead and not self.voice.busy:
            self.voice.add(*self.ahead.pop(0))
        if self.text_done and not self.ahead and not self.voice.busy:
            self.voice.finish()

    def ahead_s(self, unit_index: int) -> float:
        """How far its produced speech is ahead of real time, on the clock of the caller's units (real time in a
        call; in tests, as fast as units are given)."""
        if self.spoken_at is None:
            return 0.0
        return self.voice.seconds - (unit_index - self.spoken_at) * CHAT_UNIT_SAMPLES / MODEL_INPUT_RATE


class ChatMode:
    name = "chat"
    tick_priority = 1  # its tick runs after the duplex units of the same tick (`inference.worker.UnitTicker`)
    catches_up = True  # a session's waiting units come as one (`ModeUnit.parts`): a backlog clears in a tick

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.host: EngineHost | None = None
        self.session: Session | None = None
        self.tts: TTSSession | None = None
        self.detector: TurnDetector | None = None
        self.reply: Reply | None = None
        # a turn given by a control, prefilled in the next tick; `held`: it waits for a `respond` control
        # (option auto_respond off)
        self.pending: TurnInput | None = None
        self.held = False
        self.turn = 0
        # time.monotonic() when the turn being answered ended: a spoken turn's last unit complete at the server, a
        # typed one (or a held turn's `respond`) taken by the worker; every new turn cuts the reply before it
        self.turn_end = 0.0
        self.paused = False
        self.collecting = False
        self.segment: list[np.ndarray] = []
        self.recent: deque[np.ndarray] = deque()  # audio since the last turn (push-to-talk fallback)
        self.recent_samples = 0
        # audio a merged unit held after a turn's end: (pcm, its speech probabilities, completed_at) of each part,
        # listened to first in the next tick (one turn ends per tick: its prefill comes before what follows it)
        self.carry: list[tuple[np.ndarray, list[float] | None, float]] = []
        self.heard_cut: tuple[int, int] | None = None  # the reply a `truncate` cut: (turn, its tokens then)
        # the reply a barge-in or `interrupt` cut: (turn, its tokens that had gone to its voice); the rest was
        # decoded ahead and never spoken
        self.cut_voiced: tuple[int, int] | None = None
        # a reply started before its turn's end was certain (`inference.modes.early_reply`): the session's state
        # from before it, and its outputs held until the turn ends
        self.early: EarlyStart | None = None

    # ---- lifecycle --------------------------------------------------------------------------------------------
    def open(self, options: SessionOptions) -> tuple[SessionSetup, list[Output]]:
        self.options = ModeOptions.model_validate(
            {k: v for k, v in options.extra.items() if k in ModeOptions.model_fields}
        )
        self.host = get_host(self.settings)
        self.voice_id = options.voice
        self.voice = self.host.voice(options.voice)
        self.system_prompt = options.system_prompt or DEFAULT_PROMPT
        self.session = self.host.engine.open_session(seed=self.options.seed, top_slot=options.tick_phase == 1)
        try:
            self._open_session_parts()
        except BaseException:
            self.close()  # a failed open must not keep its KV or TTS slot
            raise
        # units on the worker's one grid: every chat call completes its units together, whatever its tick phase,
        # and they run as one tick (one chain of decode and TTS steps per 320 ms instead of one per phase)
        setup = SessionSetup(
            unit_samples=CHAT_UNIT_SAMPLES, output_rate=SPEECH_RATE, align_units=True, one_grid=True
        )
        return setup, [p.StateOut(state="listening")]

    def _open_session_parts(self) -> None:
        assert self.host is not None
        assert self.session is not None
        # the reply's TTS runs in the static steps' cache, at the session's own slot (CUDA graphs on a GPU)
        static = self.host.duplex_batcher().tts
        assert static is not None, "the host requires a checkpoint with a TTS"
        self.tts = self.host.tts.new_session(static.cache, seed=self.options.seed, slot=self.session.slot)
        self.detector = TurnDetector.from_options(self.options)
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
        self.pending = None
        self.early = None
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
            if n >= self.options.preroll_ms * MODEL_INPUT_RATE // 1000:
                break
            out.insert(0, pcm)
            n += pcm.size
        return out

    def _cut_reply(self) -> list[Output]:
        """Barge-in: drop the reply (or the turn still waiting for its tick) and the speech queued for it."""
        if self.reply is None and self.pending is None:
            return []
        if self.reply is not None:
            self.reply.voice.drop()
            self.cut_voiced = (self.reply.turn, self.reply.voice.voiced_tokens)
        self.reply = None
        self.pending, self.held = None, False
        self.turn += 1
        return [p.FlushOut(turn=self.turn), p.StateOut(state="listening")]

    def _prepare_turn(
        self,
        audio: np.ndarray | None,
        text: str | None,
        answer: bool = True,
        image: Image.Image | None = None,
    ) -> tuple[list[Output], bool]:
        """Close the previous reply and make room for a turn; returns the outputs and whether the turn goes on
        to a reply (`start_replies`)."""
        assert self.host is not None and self.session is not None
        engine, session = self.host.engine, self.session
        outputs = self._cut_reply()
        self._end_listening()
        if audio is not None and audio.size < MIN_TURN_SAMPLES:
            return outputs, False  # nothing to answer
        if (error := self._make_room(audio, text, image)) is not None:
            return [*outputs, p.ErrorOut(code="turn_too_long", message=error)], False
        self.window.mark(engine.kv_length(session))
        if audio is not None:
            outputs.append(p.UserTurnOut(turn=self.turn, seconds=round(audio.size / MODEL_INPUT_RATE, 2)))
        else:
            outputs.append(p.UserTurnOut(turn=self.turn, text=text))
        if answer:
            outputs.append(p.StateOut(state="thinking"))
        return outputs, True

    def _end_listening(self) -> None:
        """A turn ended: stop collecting its audio and forget the audio before it."""
        self.collecting = False
        self.segment = []
        self.recent.clear()
        self.recent_samples = 0

    def _make_room(self, audio: np.ndarray | None, text: str | None, image: Image.Image | None) -> str | None:
        """Room in the KV slot for a turn and its longest reply (the context window drops older turns as
        needed); the reason when there is none."""
        assert self.host is not None and self.session is not None
        engine = self.host.engine
        if audio is not None:
            estimate = audio.size // 1600 + 8  # ~10 audio positions per second
        else:
            estimate = len(engine.tokenizer.encode(text or "")) + 8
        if image is not None:  # the image and its slices: a query block each, with their markers
            grid = engine.processor.images.grid_for(image.size)
            blocks = 1 + (grid[0] * grid[1] if grid else 0)
            estimate += blocks * (engine.processor.config.image_feature_size + 2) + 8
        try:
            self.window.make_room(engine, self.session, estimate + self.options.max_new_tokens + 32)
        except ValueError as exc:
            return str(exc)
        return None

    # ---- early replies (`inference.modes.early_reply`) ---------------------------------------------------------
    def _may_start_early(self) -> bool:
        """The caller's turn ends within the next unit if the silence it is in goes on, and nothing else is
        being answered."""
        return (
            self.options.early_reply
            and self.options.auto_respond
            and self.collecting
            and self.reply is None
            and self.pending is None
            and self.early is None
            and self.detector is not None
            and self.detector.ends_within(UNIT_WINDOWS)
        )

    def _start_early(self) -> TurnInput | None:
        """The turn as heard so far, to be answered in this tick with its outputs held; None when it is too short
        or does not fit."""
        assert self.host is not None and self.session is not None and self.tts is not None
        audio = np.concatenate(self.segment)
        if audio.size < MIN_TURN_SAMPLES or self._make_room(audio, None, None) is not None:
            return None
        engine = self.host.engine
        self.early = EarlyStart.take(engine, self.session, self.window, self.tts)
        self.window.mark(engine.kv_length(self.session))
        return audio, None, None

    def _confirm_early(self, audio: np.ndarray, unit_index: int) -> list[Output]:
        """The turn ended as foreseen: the early reply becomes the turn's reply, and what it said so far goes
        out now."""
        early, self.early = self.early, None
        assert early is not None
        self._end_listening()
        if self.reply is not None and self.reply.spoken_at is not None:
            self.reply.spoken_at = unit_index  # its speech reaches the caller from this unit on
        seconds = round(audio.size / MODEL_INPUT_RATE, 2)
        return [p.UserTurnOut(turn=self.turn, seconds=seconds), p.StateOut(state="thinking"), *early.held]

    def _drop_early(self) -> None:
        """The caller spoke on (or a control came): the early reply goes, nothing of it having gone out, and
        the session is as it was before it."""
        early, self.early = self.early, None
        if early is None:
            return
        assert self.host is not None and self.session is not None and self.tts is not None
        if self.reply is not None:
            self.reply.voice.drop()
            self.reply = None
        early.restore(self.host.engine, self.session, self.window, self.tts)

    @staticmethod
    def start_replies(turns: Sequence[tuple[ChatMode, TurnInput]]) -> None:
        """Prefill the user turns of several sessions and the assistant prefix after each, as one batched LLM
        step per tick phase, and start their replies."""
        if not turns:
            return
        host = turns[0][0].host
        assert host is not None
        engine = host.engine
        prefix = engine.model.embed_ids(hd.assistant_prefix(engine, use_tts_template=True))
        sessions, pieces = [], []
        for mode, (audio, text, image) in turns:
            assert mode.session is not None
            user = hd.user_turn_embeddings(engine, mode.session, audio, text, image)
            hd.start_reply_state(mode.session)
            sessions.append(mode.session)
            pieces.append(torch.cat([user, prefix.to(user.dtype)]))
        # one step over just the turns' rows (a gathered step) when one is ready for them; else one step per tick
        # phase: a phase's sessions sit at one end of the KV slots, whose turn-length steps the warm-up captured,
        # and one step over both ends would run every slot at the longest piece's length
        counts = [int(x.shape[0]) for x in pieces]
        if engine.feeds_in_one_step(sessions, counts):
            groups = [list(range(len(sessions)))]
        else:
            groups = [
                [i for i, s in enumerate(sessions) if s.phase == ph] for ph in {s.phase for s in sessions}
            ]
        logits: dict[int, torch.Tensor] = {}  # by index in `turns`
        for group in groups:
            _, got = engine.feed_for_logits([sessions[i] for i in group], [pieces[i] for i in group])
            logits.update(zip(group, got, strict=True))
        for k, ((mode, _), session) in enumerate(zip(turns, sessions, strict=True)):
            first = logits[k]
            extra: list[int] = []
            if mode.options.force == "speak":  # test option: the reply runs to max_new_tokens
                sp = engine.special
                extra = [sp.tts_eos, sp.im_end, engine.eos_s]
            # display_text: the caller's text never shows control tokens (`<|tts_eos|>`, `<tool_call>`, ...)
            row = start_row(
                engine,
                session,
                first,
                mode.sampling,
                reference_chunk_budget(mode.options.max_new_tokens),
                hd.reply_bans(engine, spoken=True, extra_banned=extra),
                report_unfed_last=False,
                display_text=True,
            )
            assert mode.tts is not None
            mode.reply = Reply(row, TurnVoice(host, mode.voice, mode.tts), mode.turn)

    @staticmethod
    def prepare_units(batch: Sequence[tuple[ChatMode, ModeUnit]]) -> None:
        """The units' speech probabilities, part by part, off the mode thread (`inference.modes.base.PreparingMode`):
        Silero over the sessions as one batched call per 32 ms window (`push_many`; ~1.2 ms of CPU per session and
        unit alone), which the mode thread would otherwise spend between the GPU steps of every tick."""
        todo = [
            (mode.detector.vad, unit) for mode, unit in batch if mode.detector is not None and not mode.paused
        ]
        pieces = [unit.pieces() for _, unit in todo]
        for _, unit in todo:
            unit.vad_probs = []
        for i in range(max(map(len, pieces), default=0)):  # the parts in order (a merged unit has several)
            rows = [k for k, parts in enumerate(pieces) if i < len(parts)]
            got = push_many([todo[k][0] for k in rows], [pieces[k][i][0] for k in rows])
            for k, probs in zip(rows, got, strict=True):
                todo[k][1].vad_probs.append(probs)

    def on_unit(self, unit: ModeUnit, frame: np.ndarray | None) -> list[Output]:
        return self.on_units([(self, unit, frame)])[0]

    def _listen(self, unit: ModeUnit) -> tuple[list[Output], np.ndarray | None]:
        """VAD and the turn logic of the unit's parts (and of the audio carried over from the last tick): the
        outputs, and the audio of a turn that ends here (`turn_end` then says when its last part was complete at
        the server). The parts after a turn's end wait for the next tick."""
        outputs: list[Output] = []
        assert self.detector is not None
        probs = unit.vad_probs or [None] * len(unit.pieces())
        pieces = [*self.carry, *((pcm, pr, at) for (pcm, at), pr in zip(unit.pieces(), probs, strict=True))]
        self.carry = []
        for i, (pcm, part_probs, completed_at) in enumerate(pieces):
            self._remember(pcm)
            if self.collecting:
                self.segment.append(pcm)
            for event in self.detector.feed(
                part_probs if part_probs is not None else self.detector.vad.push(pcm)
            ):
                if event.kind == "start" and not self.collecting:
                    if self.options.barge_in:
                        outputs += self._cut_reply()
                    outputs.append(p.UserTurnOut(turn=self.turn, started=True))
                    self.collecting = True
                    self.segment = self._preroll()
                elif event.kind == "end" and self.collecting:
                    self.carry = pieces[i + 1 :]
                    self.turn_end = completed_at
                    return outputs, np.concatenate(self.segment)
        return outputs, None

    @staticmethod
    def on_units(batch: Sequence[tuple[ChatMode, ModeUnit, np.ndarray | None]]) -> list[list[Output]]:
        """One unit of each of several chat sessions as one tick (see the module's docstring)."""
        outputs: list[list[Output]] = [[] for _ in batch]
        timings: list[dict[str, float]] = [{} for _ in batch]
        live = [k for k, (mode, _, _) in enumerate(batch) if not mode.paused and mode.session is not None]
        turns: list[tuple[ChatMode, TurnInput]] = []
        for k in live:
            mode, unit, _ = batch[k]
            started = time.perf_counter()
            outs, ended = mode._listen(unit)
            early: dict[str, float] = {}
            # a reply started early in the last tick: its turn ended (it goes out), or the caller spoke on
            if mode.early is not None:
                if ended is not None:
                    outs += mode._confirm_early(ended, unit.index)
                    ended = None
                    early["early_reply"] = 1
                else:
                    mode._drop_early()
                    early["early_dropped"] = 1
            if ended is not None:  # a spoken turn ends here (it replaces a typed one still waiting)
                answer = mode.options.auto_respond
                more, go = mode._prepare_turn(ended, None, answer)
                outs += more
                if go and answer:
                    turns.append((mode, (ended, None, None)))
                elif go:  # held until a `respond` control
                    mode.pending, mode.held = (ended, None, None), True
            elif mode.pending is not None and not mode.held:  # a turn given by a control since the last tick
                turns.append((mode, mode.pending))
                mode.pending = None
            elif mode._may_start_early() and (heard := mode._start_early()) is not None:
                turns.append((mode, heard))
            outputs[k] += outs
            timings[k] = {
                "vad_ms": (time.perf_counter() - started) * 1000,
                "backlog_units": unit.queued_units,
                **early,
            }
            if early.get("early_reply") and unit.emit is not None:  # out now, ahead of this tick's GPU work
                unit.emit(outputs[k])
                outputs[k] = []
                if mode.reply is not None and mode.reply.spoken_at is not None:
                    timings[k]["turn_to_speech_ms"] = (time.monotonic() - mode.turn_end) * 1000
        started = time.perf_counter()
        ChatMode.start_replies(turns)
        prefill_ms = (time.perf_counter() - started) * 1000
        # replies free to advance, with how far their speech is ahead of the caller
        ready = {
            k: reply.ahead_s(batch[k][1].index)
            for k in live
            if (reply := batch[k][0].reply) is not None
            and batch[k][1].queued_units == 0
            and (not batch[k][0].collecting or batch[k][0].early is not None)
        }
        # when one reply must advance, those that would in the next ticks advance with it: their work shares
        # this tick's batched steps (whose cost hardly grows with the rows), and the next ticks stay short
        due = any(ahead < LEAD_S for ahead in ready.values())
        moving = [k for k, ahead in ready.items() if due and ahead < LEAD_S + JOIN_S]
        # where each moving reply's outputs go: an early reply's are held until its turn ends
        sinks = [m.early.held if (m := batch[k][0]).early is not None else outputs[k] for k in moving]
        decide_ms = 0.0
        if moving:
            host = batch[moving[0]][0].host
            assert host is not None
            decide_ms = ChatMode._decode(host.engine, [batch[k][0] for k in moving], sinks)
        speech_ms = ChatMode._speak([batch[k][0] for k in moving], sinks, [batch[k][1].index for k in moving])
        now = time.monotonic()
        # the replies whose first speech goes out with this tick: how long after their turn's end
        for k in live:
            mode = batch[k][0]
            if (
                mode.reply is not None
                and mode.early is None
                and mode.reply.spoken_at == batch[k][1].index
                and "turn_to_speech_ms" not in timings[k]
            ):
                timings[k]["turn_to_speech_ms"] = (now - mode.turn_end) * 1000
        advanced = set(moving)
        sessions = [s for k in live if (s := batch[k][0].session) is not None]
        host = batch[live[0]][0].host if live else None
        lengths = host.engine.kv_lengths(sessions) if host is not None else []  # one device read for all
        for k, kv_tokens in zip(live, lengths, strict=True):
            mode = batch[k][0]
            if k in advanced:  # the stages this tick ran (a tick of speech only decodes nothing)
                stages = {"decide_ms": decide_ms, "tts_ms": speech_ms[0], "vocoder_ms": speech_ms[1]}
                timings[k].update({name: ms for name, ms in stages.items() if ms > 0})
            if turns:
                timings[k]["prefill_ms"] = prefill_ms
            if mode.early is None and mode.reply is not None and mode.reply.finished:
                mode.reply = None
                mode.turn += 1
                outputs[k].append(p.StateOut(state="listening"))
            timings[k]["kv_tokens"] = float(kv_tokens)
            timings[k]["batch_sessions"] = float(len(moving))
            outputs[k].append(p.UnitMetrics(**timings[k]))
        return outputs

    @staticmethod
    def _decode(engine: Engine, modes: Sequence[ChatMode], outputs: Sequence[list[Output]]) -> float:
        """When a reply's speech waits for text: as many batched steps as its voice needs for its next chunk
        (`FIRST_TEXT_CHUNK` for a new reply, which then sets the steps alone: its first speech does not wait for
        other replies' chunks). Every other reply with room decodes ahead in the same steps, so a text chunk
        rarely needs steps of its own (a step's cost grows little with its rows: at 48 rows on an H100 it is
        bound by the GPU's reads of the weights and the KV). Each token's text goes out at once. Returns the
        time it took (ms)."""
        started = time.perf_counter()
        # each reply that may decode, and where its outputs go, by its session
        taking = {
            id(m.session): (m.reply, out)
            for m, out in zip(modes, outputs, strict=True)
            if m.reply is not None and m.reply.takes_tokens
        }
        needy = [reply for reply, _ in taking.values() if reply.needs_tokens]
        # a reply whose caller waits for its first speech sets the steps alone; the others' speech is ahead of
        # their callers, so the rest of a chunk can wait for the next tick
        first = [reply for reply in needy if reply.spoken_at is None]
        steps = max((reply.tokens_to_speak for reply in first or needy), default=0)
        if not steps:
            return 0.0

        def rows() -> list[ReplyRow]:
            return [reply.row for reply, _ in taking.values() if reply.takes_tokens]

        for events in decode_steps(engine, rows, steps):
            for event in events:
                reply, out = taking[id(event.session)]
                if event.text_delta:
                    out.append(p.TextOut(text=event.text_delta, turn=reply.turn))
                if event.token is not None and event.hidden is not None:
                    reply.take(event.token, event.hidden)
                if event.done:
                    reply.end_text()
        return (time.perf_counter() - started) * 1000

    @staticmethod
    def _speak(
        modes: Sequence[ChatMode], outputs: Sequence[list[Output]], units: Sequence[int]
    ) -> tuple[float, float]:
        """The next window of speech of every reply with text to speak (`speak_batch`). Returns the TTS and
        vocoder times (ms)."""
        pairs = [
            (m.reply, out, unit)
            for m, out, unit in zip(modes, outputs, units, strict=True)
            if m.reply and m.reply.voice.busy
        ]
        if not pairs:
            return 0.0, 0.0
        voices = [r.voice for r, _, _ in pairs]
        before = [(v.times.tts_ms, v.times.vocoder_ms) for v in voices]
        for (reply, out, unit), pieces in zip(pairs, speak_batch(voices), strict=True):
            for pcm in pieces:
                if pcm.size:
                    if reply.spoken_at is None:
                        out.append(p.StateOut(state="speaking"))
                        reply.spoken_at = unit
                    out.append(p.AudioOut(pcm=pcm, turn=reply.turn))
            reply.hand_over()  # a voice done with its chunk starts the next one from the text decoded ahead
        tts_ms = max(v.times.tts_ms - b[0] for v, b in zip(voices, before, strict=True))
        vocoder_ms = max(v.times.vocoder_ms - b[1] for v, b in zip(voices, before, strict=True))
        return tts_ms, vocoder_ms

    # ---- controls ---------------------------------------------------------------------------------------------
    def on_control(self, message: dict[str, Any]) -> list[Output]:
        kind = message.get("type")
        self._drop_early()  # a reply started early waits for its turn's end only while nothing else happens
        if kind == "pause":
            self.paused = True
        elif kind == "resume":
            self.paused = False
        elif kind == "interrupt":
            return self._cut_reply()
        elif kind == "end_turn":
            audio = self.segment if self.collecting and self.segment else list(self.recent)
            if not audio:
                return [
                    p.ErrorOut(code="empty_turn", message="end_turn without any audio since the last turn")
                ]
            if self.detector is not None:
                self.detector.reset()
            return self._turn_now((np.concatenate(audio), None, None))
        elif kind == "text":
            text = str(message.get("text") or "").strip()
            image = None
            if message.get("image") is not None:  # a still image before the text (base64 PNG/JPEG/WebP)
                try:
                    image = decode_image(message["image"])
                except ValueError as exc:
                    return [p.ErrorOut(code="bad_image", message=str(exc))]
            if text or image is not None:
                return self._turn_now((None, text, image))
        elif kind == "system_prompt":
            self.system_prompt = str(message.get("text") or DEFAULT_PROMPT)
            outputs = self._cut_reply()
            self._prefill_system()  # a new system prompt starts a new conversation
            return outputs
        elif kind == "respond":  # answer the turn held back (option auto_respond off)
            if self.pending is None or not self.held:
                return [
                    p.ErrorOut(code="empty_turn", message="respond without a turn waiting for its answer")
                ]
            self.held = False
            self.turn_end = time.monotonic()  # the reply starts now, not when the held turn ended
            return [p.StateOut(state="thinking")]
        elif kind == "truncate":  # heard-only context after a barge-in or a Realtime truncate
            return truncate_reply(self, message)
        return []

    def _turn_now(self, turn: TurnInput) -> list[Output]:
        """A turn given by a control (`end_turn`, `text`): told at once (`user_turn`, `thinking`), prefilled in the
        session's next tick with the other turns of that tick (its reply could not advance before it anyway)."""
        outputs, go = self._prepare_turn(turn[0], turn[1], image=turn[2])
        if go:
            self.pending = turn
            self.turn_end = time.monotonic()
        return outputs
