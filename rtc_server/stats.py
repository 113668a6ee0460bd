"""A media process's counters, and their sum over the front and its media shards (for `/metrics` and admin)."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from inference.protocol import UnitMetrics
from media_shard.messages import StatsSnapshot
from rtc_server.metrics import TURN_BUCKETS, Histogram

if TYPE_CHECKING:
    from media_tracks import InboundAudio, SpeechTrack


class CallMedia(Protocol):
    """What the totals read of a call (`rtc_server.session.CallSession`)."""

    @property
    def inbound(self) -> InboundAudio | None: ...

    @property
    def speech(self) -> SpeechTrack: ...


def process_cpu_s() -> float:
    """This process's CPU time so far (user + system, all threads)."""
    times = os.times()
    return times.user + times.system


@dataclass
class ServerStats:
    units_sent: int = 0
    units_done: int = 0
    frames_in_closed: int = 0  # media frames of sessions that have ended (live ones are read at scrape time)
    frames_out_closed: int = 0
    frames_dropped_closed: int = 0
    audio_lost_s_closed: float = 0.0
    sessions_started: dict[str, int] = field(default_factory=dict)
    unit_roundtrip: Histogram = field(default_factory=Histogram)
    unit_handoff: Histogram = field(default_factory=Histogram)
    turn_to_speech: Histogram = field(default_factory=lambda: Histogram(TURN_BUCKETS))
    early_replies: int = 0
    early_dropped: int = 0
    recent_handoff_ms: deque[float] = field(default_factory=lambda: deque(maxlen=20000))  # for the benchmark

    def record_unit(self, unit: UnitMetrics) -> None:
        """A unit's result is back (`UnitDone.at_server`): its hand-off and round trip go into the totals, and a
        chat reply's turn end -> first speech where the unit has one."""
        self.units_done += 1
        self.unit_handoff.observe(unit.handoff_ms / 1000)
        self.recent_handoff_ms.append(unit.handoff_ms)
        self.unit_roundtrip.observe(unit.roundtrip_ms / 1000)
        if unit.turn_to_speech_ms is not None:
            self.turn_to_speech.observe(unit.turn_to_speech_ms / 1000)
        self.early_replies += unit.early_reply or 0
        self.early_dropped += unit.early_dropped or 0

    def close_call(self, session: CallMedia) -> None:
        """Keep an ended call's frame counts in the totals."""
        if session.inbound is not None:
            self.frames_in_closed += session.inbound.frames_in
            self.frames_dropped_closed += session.inbound.frames_dropped
            self.audio_lost_s_closed += session.inbound.unfilled_gap_s
        self.frames_out_closed += session.speech.frames_out

    def snapshot(self, live: Iterable[CallMedia], cpu_s: float) -> StatsSnapshot:
        """The totals so far: the ended calls' counts plus the live calls' (`live`)."""
        frames_in, frames_out, dropped = (
            self.frames_in_closed,
            self.frames_out_closed,
            self.frames_dropped_closed,
        )
        lost = self.audio_lost_s_closed
        for session in live:
            if session.inbound is not None:
                frames_in += session.inbound.frames_in
                dropped += session.inbound.frames_dropped
                lost += session.inbound.unfilled_gap_s
            frames_out += session.speech.frames_out
        return StatsSnapshot(
            units_sent=self.units_sent,
            units_done=self.units_done,
            frames_in=frames_in,
            frames_out=frames_out,
            frames_dropped=dropped,
            audio_lost_s=round(lost, 3),
            sessions_started=dict(self.sessions_started),
            roundtrip_counts=list(self.unit_roundtrip.counts),
            roundtrip_total=self.unit_roundtrip.total,
            roundtrip_n=self.unit_roundtrip.count,
            handoff_counts=list(self.unit_handoff.counts),
            handoff_total=self.unit_handoff.total,
            handoff_n=self.unit_handoff.count,
            turn_speech_counts=list(self.turn_to_speech.counts),
            turn_speech_total=self.turn_to_speech.total,
            turn_speech_n=self.turn_to_speech.count,
            early_replies=self.early_replies,
            early_dropped=self.early_dropped,
            cpu_s=cpu_s,
        )


@dataclass
class Totals:
    """The sum of several media processes' snapshots, with the latency histograms rebuilt."""

    stats: StatsSnapshot
    unit_roundtrip: Histogram
    unit_handoff: Histogram
    turn_to_speech: Histogram


def add_up(snapshots: Iterable[StatsSnapshot]) -> Totals:
    total = StatsSnapshot()
    roundtrip, handoff, turn_speech = Histogram(), Histogram(), Histogram(TURN_BUCKETS)
    for s in snapshots:
        total.units_sent += s.units_sent
        total.units_done += s.units_done
        total.frames_in += s.frames_in
        total.frames_out += s.frames_out
        total.frames_dropped += s.frames_dropped
        total.audio_lost_s += s.audio_lost_s
        total.cpu_s += s.cpu_s
        total.early_replies += s.early_replies
        total.early_dropped += s.early_dropped
        for mode, n in s.sessions_started.items():
            total.sessions_started[mode] = total.sessions_started.get(mode, 0) + n
        for hist, counts, amount, n in (
            (roundtrip, s.roundtrip_counts, s.roundtrip_total, s.roundtrip_n),
            (handoff, s.handoff_counts, s.handoff_total, s.handoff_n),
            (turn_speech, s.turn_speech_counts, s.turn_speech_total, s.turn_speech_n),
        ):
            if counts:
                hist.counts = [a + b for a, b in zip(hist.counts, counts, strict=True)]
            hist.total += amount
            hist.count += n
    return Totals(total, roundtrip, handoff, turn_speech)
