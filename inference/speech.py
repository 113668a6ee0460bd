"""Speech for the turn-based modes: LLM tokens -> TTS codes -> token2wav -> 24 kHz PCM.

`TurnVoice`, one per reply: the reply's tokens are conditioned in chunks of `TEXT_CHUNK` tokens (the first one
`FIRST_TEXT_CHUNK`) through the sliding-recompute `TTSStreamer`; codes go through the vocoder's turn windowing;
it keeps the TTS slot of its session and times its two stages. (The duplex modes speak through `MiniCPMO45.engine.batcher.DuplexBatcher`.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from MiniCPMO45.audio.rates import SPEECH_RATE
from MiniCPMO45.modules.tts import TTSSession
from MiniCPMO45.modules.tts_streamer import TTSStreamer, next_pieces
from MiniCPMO45.token2wav import PushRequest

from .engine_host import EngineHost, Voice

TEXT_CHUNK = 10  # LLM tokens per TTS condition in turn-based replies (the reference chunking)
# ... except the reply's first condition: a short first chunk starts its speech 5 decode steps sooner (the next
# chunk's sliding recompute still sees it whole)
FIRST_TEXT_CHUNK = 5


@dataclass
class SpeechTimes:
    tts_ms: float = 0.0
    vocoder_ms: float = 0.0


CODES_PER_TOKEN = 12  # cap on speech per text chunk: 12 codes (0.48 s) per LLM token, at least 1 s


@dataclass(eq=False)
class TurnVoice:
    """The speech of one turn-based reply, produced lazily: `add` tokens, then each `speak_batch` call (or
    `next_audio()`, the same for this voice alone) gives one vocoder window (~1 s) at a time, so a reply never
    computes far ahead of what the caller hears and a barge-in wastes at most one window."""

    host: EngineHost
    voice: Voice
    tts: TTSSession
    tokens: list[int] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)
    times: SpeechTimes = field(default_factory=SpeechTimes)
    finished: bool = False
    seconds: float = 0.0  # speech produced so far
    chunks: int = 0  # text chunks conditioned so far
    voiced_tokens: int = 0  # reply tokens in those chunks

    def __post_init__(self) -> None:
        self.streamer = TTSStreamer(self.host.tts, self.tts)
        # No tick phase: every chat reply speaks in the same tick (one grid), so their turns pack from the start
        # of the vocoder's store and a round's windows are one flow batch (a duplex turn takes its phase's half,
        # and a chat tick over both halves ran two: 101-103 ms against 74 for 32 sessions on an H100). No lead-in
        # zeros: a reply keeps up to `LEAD_S` of speech queued ahead of the caller, so its first audio can start
        # with the speech (a duplex turn keeps them: its units come one second apart, and they cover the
        # vocoder's delay)
        self.turn = self.host.vocoder.start_turn(self.voice.prompt, rule="turn", lead_in=False)
        self._flushed = False

    @property
    def busy(self) -> bool:
        """Speech of a fed text chunk is still being produced (call `next_audio` before adding more)."""
        return self.streamer.feeding or (self.finished and not self._flushed)

    @property
    def chunk_tokens(self) -> int:
        """The length of its next text chunk: `FIRST_TEXT_CHUNK` for the first, then `TEXT_CHUNK`."""
        return TEXT_CHUNK if self.chunks else FIRST_TEXT_CHUNK

    def add(self, token: int, hidden: torch.Tensor) -> None:
        """A reply token with its hidden state; after `FIRST_TEXT_CHUNK` tokens, then every `TEXT_CHUNK`, a
        condition goes to the TTS."""
        if self.busy:
            raise RuntimeError("drain next_audio() before adding tokens")
        self.tokens.append(token)
        self.hidden.append(hidden)
        if len(self.tokens) >= self.chunk_tokens:
            self._start_feed(finished=False)

    def finish(self) -> None:
        """The reply's text is complete: condition the rest (with text_eos)."""
        if not self.finished:
            self.finished = True
            self._start_feed(finished=True)

    def drop(self) -> None:
        """The reply was cut (barge-in): stop drawing for the chunk in progress."""
        self.streamer.end_chunk()

    def _start_feed(self, finished: bool) -> None:
        tts = self.host.tts
        d = self.host.engine.model.config.llm.hidden_size
        hidden = torch.stack(self.hidden) if self.hidden else torch.zeros(0, d)
        cond = tts.condition(torch.tensor(self.tokens, dtype=torch.long), hidden, text_finished=finished)
        self.streamer.max_new = max(25, CODES_PER_TOKEN * len(self.tokens))
        self.voiced_tokens += len(self.tokens)
        self.tokens, self.hidden = [], []
        self.chunks += 1
        self.streamer.begin(cond, text_finished=finished)

    def next_audio(self) -> list[np.ndarray]:
        """The next window of speech of the fed text (empty when there is none yet or any more)."""
        return speak_batch([self])[0]


def speak_batch(voices: list[TurnVoice]) -> list[list[np.ndarray]]:
    """The next window of speech of each voice (empty when it has none yet or any more): the TTS draws of
    every voice speaking a text chunk run as one batch, then their vocoder windows as one batch. The shared
    time of each stage is added to every voice that took part."""
    out: list[list[np.ndarray]] = [[] for _ in voices]
    if not voices:
        return out
    host = voices[0].host
    started = time.perf_counter()
    drawing = [k for k, v in enumerate(voices) if v.streamer.feeding]
    pieces = next_pieces([voices[k].streamer for k in drawing])
    mid = time.perf_counter()
    requests: list[tuple[int, PushRequest]] = []
    for k, piece in zip(drawing, pieces, strict=True):
        voices[k].times.tts_ms += (mid - started) * 1000
        if piece is not None:
            requests.append((k, PushRequest(voices[k].turn, piece[0].tolist())))
    asked = {k for k, _ in requests}
    for k, v in enumerate(voices):
        # the text is finished and its last chunk fully drawn: the rest goes out as the turn's end
        if k not in asked and v.finished and not v.streamer.feeding and not v._flushed:
            v._flushed = True
            requests.append((k, PushRequest(v.turn, v.streamer.finish().tolist(), end_of_turn=True)))
    if requests:
        audio = host.vocoder.push_codes_batch([r for _, r in requests])
        spent = (time.perf_counter() - mid) * 1000
        for (k, _), wavs in zip(requests, audio, strict=True):
            voices[k].times.vocoder_ms += spent
            voices[k].seconds += sum(w.size for w in wavs) / SPEECH_RATE
            out[k] = wavs
    return out
