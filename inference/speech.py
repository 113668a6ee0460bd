"""Speech for the turn-based modes: LLM tokens -> TTS codes -> token2wav -> 24 kHz PCM.

`TurnVoice`, one per reply: the reply's tokens are conditioned in chunks of `TEXT_CHUNK` tokens through the
sliding-recompute `TTSStreamer`; codes go through the vocoder's turn windowing; it keeps the TTS slot of its
session and times its two stages. (The duplex modes speak through `MiniCPMO45.engine.batcher.DuplexBatcher`.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from MiniCPMO45.modules.tts import TTSSession

from .engine_host import EngineHost, Voice

TEXT_CHUNK = 10  # LLM tokens per TTS condition in turn-based replies (the reference chunking)


@dataclass
class SpeechTimes:
    tts_ms: float = 0.0
    vocoder_ms: float = 0.0


CODES_PER_TOKEN = 12  # cap on speech per text chunk: 12 codes (0.48 s) per LLM token, at least 1 s


@dataclass
class TurnVoice:
    """The speech of one turn-based reply, produced lazily: `add` tokens, then `next_audio()` returns one
    vocoder window (~1 s) at a time, so a reply never computes far ahead of what the caller hears and a
    barge-in wastes at most one window."""

    host: EngineHost
    voice: Voice
    tts: TTSSession
    tokens: list[int] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)
    times: SpeechTimes = field(default_factory=SpeechTimes)
    finished: bool = False

    def __post_init__(self) -> None:
        self.streamer = self.host.tts.streamer(self.tts)
        self.turn = self.host.vocoder.start_turn(self.voice.prompt, rule="turn")
        self._feed: Iterator[tuple[torch.Tensor, bool]] | None = None
        self._flushed = False

    @property
    def busy(self) -> bool:
        """Speech of a fed text chunk is still being produced (call `next_audio` before adding more)."""
        return self._feed is not None or (self.finished and not self._flushed)

    def add(self, token: int, hidden: torch.Tensor) -> None:
        """A reply token with its hidden state; every `TEXT_CHUNK` tokens a condition goes to the TTS."""
        if self.busy:
            raise RuntimeError("drain next_audio() before adding tokens")
        self.tokens.append(token)
        self.hidden.append(hidden)
        if len(self.tokens) >= TEXT_CHUNK:
            self._start_feed(finished=False)

    def finish(self) -> None:
        """The reply's text is complete: condition the rest (with text_eos)."""
        if not self.finished:
            self.finished = True
            self._start_feed(finished=True)

    def _start_feed(self, finished: bool) -> None:
        tts = self.host.tts
        d = self.host.engine.model.config.llm.hidden_size
        hidden = torch.stack(self.hidden) if self.hidden else torch.zeros(0, d)
        cond = tts.condition(torch.tensor(self.tokens, dtype=torch.long), hidden, text_finished=finished)
        self.streamer.max_new = max(25, CODES_PER_TOKEN * len(self.tokens))
        self.tokens, self.hidden = [], []
        self._feed = self.streamer.feed(cond, text_finished=finished)

    def next_audio(self) -> list[np.ndarray]:
        """The next window of speech of the fed text (empty when there is none yet or any more)."""
        if self._feed is None:
            if self.finished and not self._flushed:
                self._flushed = True
                started = time.perf_counter()
                rest = self.streamer.finish().tolist()
                pieces = self.host.vocoder.push_codes(self.turn, rest, end_of_turn=True)
                self.times.vocoder_ms += (time.perf_counter() - started) * 1000
                return pieces
            return []
        started = time.perf_counter()
        piece = next(self._feed, None)
        mid = time.perf_counter()
        self.times.tts_ms += (mid - started) * 1000
        if piece is None:
            self._feed = None
            return self.next_audio() if self.finished else []
        pieces = self.host.vocoder.push_codes(self.turn, piece[0].tolist(), end_of_turn=False)
        self.times.vocoder_ms += (time.perf_counter() - mid) * 1000
        return pieces
