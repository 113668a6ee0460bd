"""A call's outbound speech: the WebRTC track the caller hears, what of each reply was heard, and the turns.

`CallSpeech` is owned by `rtc_server.session.CallSession`, which gives it the worker's `audio` and `flush`
messages. Every mode counts its turns from 0, so the track's turn is the mode's turn plus `turn_base`, which
moves up when a mode (re)opens: the track drops older turns as stale (`SpeechTrack.flush`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from media_tracks import SpeechTrack
from media_tracks.speech_track import DEFAULT_COMPRESSION_LEVEL, DEFAULT_PACKET_MS
from MiniCPMO45.audio.rates import SPEECH_RATE
from rtc_server.heard import HeardTracker


class CallSpeech:
    def __init__(
        self, compression_level: int = DEFAULT_COMPRESSION_LEVEL, packet_ms: int = DEFAULT_PACKET_MS
    ) -> None:
        # Opus encoded on the loop at libopus's `compression_level` (`rtc.opus_compression_level`), one packet
        # every `packet_ms` (`rtc.outbound_packet_ms`)
        self.track = SpeechTrack(
            input_rate=SPEECH_RATE, encode=True, compression_level=compression_level, packet_ms=packet_ms
        )
        self.heard = HeardTracker()  # how much of the current reply was played (heard-only context)
        self.turn_base = 0  # the track's turn = the mode's turn + this
        self._opened_once = False
        self._timers: set[asyncio.TimerHandle] = set()  # speech scheduled to start later (`play_at`)

    def mode_opened(self) -> None:
        """A mode opened: after the first one, its turns start above every turn the track has seen."""
        if self._opened_once:
            self.turn_base = self.track.turn + 1
            self.heard = HeardTracker()
        self._opened_once = True

    def play(self, pcm: np.ndarray, turn: int, play_at: float | None, closed: Callable[[], bool]) -> None:
        """Queue the mode's speech of `turn` now, or at `play_at` (server monotonic time) unless the call is
        `closed()` by then."""
        self.heard.produced(turn, pcm.size / self.track.input_rate)
        delay = 0.0 if play_at is None else play_at - time.monotonic()
        track_turn = turn + self.turn_base
        if delay <= 0:
            self.track.push(pcm, track_turn)
            return
        handle: asyncio.TimerHandle

        def later() -> None:
            self._timers.discard(handle)
            if not closed():
                self.track.push(pcm, track_turn)

        handle = asyncio.get_running_loop().call_later(delay, later)
        self._timers.add(handle)

    def flush(self, turn: int | None = None) -> None:
        """Drop the speech queued on the track (counted as not heard)."""
        self.heard.dropping(self.track.buffered_s)
        self.track.flush(turn)

    def model_stopped(self, turn: int) -> dict[str, Any] | None:
        """The mode's `flush` of `turn`: drop every older turn's speech at once; returns the `truncate` control
        that keeps in the model's context only what the caller heard of the reply (None: nothing to cut)."""
        self.cancel_scheduled()
        self.flush(max(turn + self.turn_base, self.track.turn))
        return self.heard.cut(turn)

    def cancel_scheduled(self) -> None:
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
