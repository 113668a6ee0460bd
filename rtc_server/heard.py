"""How much of a reply the caller heard, for the heard-only context after a barge-in (inference/modes/heard.py).

A call counts the speech the worker sent for the current reply turn and the part a flush dropped before it
was played (what the outbound track still held). When the worker flushes a reply (barge-in, `interrupt`), the
call sends the mode `{"type": "truncate", "turn": t, "heard": f}` with f = played / produced; a reply cut
before any of its speech was produced was not heard at all (f = 0).
"""

from __future__ import annotations

from typing import Any


class HeardTracker:
    def __init__(self) -> None:
        self.turn = -1  # the reply turn whose speech is counted
        self.produced_s = 0.0
        self.dropped_s = 0.0

    def produced(self, turn: int, seconds: float) -> None:
        if turn != self.turn:
            self.turn, self.produced_s, self.dropped_s = turn, 0.0, 0.0
        self.produced_s += seconds

    def dropping(self, buffered_s: float) -> None:
        """The track is about to drop `buffered_s` of queued speech."""
        self.dropped_s += buffered_s

    def cut(self, flush_turn: int) -> dict[str, Any] | None:
        """The control for the reply a worker flush to `flush_turn` ended (the turn before it), once."""
        turn = flush_turn - 1
        if turn < 0:
            return None
        heard = 0.0
        if self.turn == turn and self.produced_s > 0:
            heard = min(max((self.produced_s - self.dropped_s) / self.produced_s, 0.0), 1.0)
        self.turn, self.produced_s, self.dropped_s = -1, 0.0, 0.0
        return {"type": "truncate", "turn": turn, "heard": round(heard, 4)}
