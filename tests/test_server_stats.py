"""The media processes' counters and their sum (`rtc_server.stats`): what `/metrics` and admin read."""

from __future__ import annotations

import pytest

from inference.protocol import UnitMetrics
from rtc_server.metrics import TURN_BUCKETS
from rtc_server.stats import ServerStats, add_up


def test_shards_latency_histograms_add_up_and_chat_turns_are_their_own() -> None:
    a, b = ServerStats(), ServerStats()
    a.record_unit(UnitMetrics(handoff_ms=2.0, roundtrip_ms=300.0))
    a.record_unit(UnitMetrics(handoff_ms=1.0, roundtrip_ms=220.0, turn_to_speech_ms=180.0))
    b.record_unit(UnitMetrics(handoff_ms=3.0, roundtrip_ms=260.0, turn_to_speech_ms=320.0))
    totals = add_up([a.snapshot([], 1.0), b.snapshot([], 2.0)])
    assert totals.stats.units_done == 3 and totals.stats.cpu_s == 3.0
    assert totals.unit_roundtrip.count == 3 and totals.unit_roundtrip.total == pytest.approx(0.78)
    # only the units that started a reply's speech count in the chat histogram, on its own finer buckets
    turns = totals.turn_to_speech
    assert turns.buckets == TURN_BUCKETS and turns.count == 2 and turns.total == pytest.approx(0.5)
    cumulative = dict(zip(TURN_BUCKETS, turns.counts, strict=True))
    assert (cumulative[0.15], cumulative[0.2], cumulative[0.3], cumulative[0.4]) == (0, 1, 1, 2)
