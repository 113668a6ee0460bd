"""Cluster placement (`cluster/placement.py`, pure Python) and its simulation (`bench/placement.py`)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from cluster.placement import NodeLoad, Placer, WorkerLoad

MODES = {"audio_duplex": 4.0, "omni_duplex": 2.0}


def node(name: str, loads: list[float], up: bool = True, queued: int = 0) -> NodeLoad:
    workers = [WorkerLoad(worker_id=i, capacity_by_mode=MODES, load=load) for i, load in enumerate(loads)]
    return NodeLoad(name=name, up=up, workers=workers, queued=queued, modes=list(MODES))


def test_calls_go_to_the_node_with_the_most_room_and_a_burst_spreads_before_any_report() -> None:
    placer = Placer()
    placer.report(node("big", [0.0, 0.0]))
    placer.report(node("small", [0.0]))
    placer.report(node("busy", [0.75, 0.75]))
    placed = Counter()
    for i in range(9):  # no report in between: the placer counts its own placements
        chosen = placer.choose("audio_duplex")
        assert chosen is not None and chosen[1], f"call {i} found no room"
        placed[chosen[0]] += 1
        placer.placed(chosen[0], f"c{i}", "audio_duplex")
    # 2 + 1 + 0.5 workers free, 0.25 a call: each goes where the most share (in workers) is left after it, the
    # node reported first on a tie: big until it is down to small's 1.0, then turn about, busy last
    assert placed == Counter({"big": 7, "small": 2}), placed
    chosen = placer.choose("audio_duplex")
    assert chosen is not None and chosen[0] == "small"  # 0.25 left there after it, as on big and busy
    placer.placed("small", "c9", "audio_duplex")
    assert placer.choose("audio_duplex") == ("busy", True)
    # omni takes 0.5 of one worker, and no worker has more than 0.25 left: it waits, where fewest wait per worker
    assert placer.choose("omni_duplex") == ("busy", False)


def test_full_cluster_queues_on_the_node_with_fewest_waiting_and_down_nodes_are_skipped() -> None:
    placer = Placer()
    placer.report(node("a", [1.0, 1.0], queued=3))
    placer.report(node("b", [1.0], queued=1))
    placer.report(node("c", [0.0], up=False))
    assert placer.choose("audio_duplex") == ("b", False)  # 1 waiting per worker beats 1.5
    placer.placed("b", "q1", "audio_duplex")
    placer.placed("b", "q2", "audio_duplex")
    assert placer.choose("audio_duplex") == ("a", False)  # b now has 3 per worker
    placer.node_down("a")
    placer.node_down("b")
    assert placer.choose("audio_duplex") is None
    placer.report(node("c", [0.0]))  # c comes back: used again
    assert placer.choose("omni_duplex") == ("c", True)


def test_a_report_replaces_the_pending_calls_it_counts_and_a_refused_offer_is_undone() -> None:
    placer = Placer()
    placer.report(node("a", [0.0]))
    for i in range(4):
        placer.placed("a", f"c{i}", "audio_duplex")
    assert placer.choose("audio_duplex") == ("a", False)  # full by its own count
    placer.unplace("a", "c3")
    assert placer.choose("audio_duplex") == ("a", True)
    placer.rename("a", "c2", "session-2")
    placer.report(node("a", [0.5]), counted=["c0", "c1"])  # two are in its load now, c2 still connecting
    assert placer.pending["a"] == [("session-2", "audio_duplex")]
    assert placer.room(placer.nodes["a"], "audio_duplex") == 0.0  # 0.5 + 0.25 pending + 0.25 new


def test_simulation_of_a_cluster_measures_placement_queue_fairness_and_failures(tmp_path: Path) -> None:
    from bench.placement import main

    assert main(["--quick", "--minutes", "1.5", "--out", str(tmp_path)]) == 0
    steady, overload = json.loads((tmp_path / "placement.json").read_text())
    assert steady["concurrent_mean"] > 1500 and steady["queued_calls"] == 0 and steady["refused"] == 0
    assert steady["placement_us"]["p50"] > 0 and steady["placements_per_s"] > 100
    # offered 1.2x what it holds: full, callers wait in the nodes' FIFO queues, the overflow is refused
    assert overload["utilisation_mean"] > 0.95
    assert overload["queued_calls"] > 100 and overload["refused"] > 0
    assert 0 <= overload["fifo_inversions"] < 0.1
    assert "| overload |" in (tmp_path / "placement.md").read_text()
