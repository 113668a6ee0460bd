"""`bench/units_report.py` groups an e2e level's units into worker ticks and finds the calls outside the usual
tick: read from units shaped as `bench/e2e.py` writes them."""

from __future__ import annotations

import json
from pathlib import Path

from bench.units_report import main, report, ticks


def unit(call: int, t: float, tick_ms: float, ahead: float | None = 3.0) -> dict:
    return {
        "call": call,
        "mode": "omni_duplex",
        "received_at": t,
        "tick_ms": tick_ms,
        "prefill_ms": tick_ms / 3,
        "vision_ahead_ms": ahead,
        # calls 0 and 3 opened their units ahead too
        "prefill_ahead_ms": 2.0 if ahead is not None and call % 3 == 0 else None,
        "grid_ms": 5.0,
    }


def level() -> list[dict]:
    units = []
    for second in range(4):  # each second: phase 0's tick of calls 0-2, then phase 1's of calls 3-5
        t = 100.0 + second
        units += [unit(c, t + 0.41 + c * 0.002, 410.0 + second) for c in range(3)]
        if (
            second == 2
        ):  # call 5 straggles into phase 0's next tick: phase 1 ticks with two, phase 0 with four
            units += [unit(c, t + 0.91 + c * 0.002, 300.0) for c in (3, 4)]
            units += [unit(c, t + 1.41 + c * 0.002, 520.0, None) for c in (0, 1, 2, 5)]
            break
        units += [unit(c, t + 0.91 + c * 0.002, 420.0 + second) for c in (3, 4, 5)]
    return units


def test_ticks_are_told_apart_by_their_run_and_when_they_came_back() -> None:
    groups = ticks(level())
    assert [len(g) for g in groups] == [3, 3, 3, 3, 3, 2, 4]
    # two ticks with the same run time but a second apart are two ticks
    assert len(ticks([unit(0, 1.0, 400.0), unit(1, 1.001, 400.0), unit(0, 2.0, 400.0)])) == 2


def test_the_report_shows_the_merged_tick_and_who_rode_it(tmp_path: Path, capsys) -> None:
    out = report(level())
    assert out["ticks"] == {2: 1, 3: 5, 4: 1}
    assert out["stage_p50_by_tick_size"][4]["tick_ms"] == 520.0
    assert out["frames_ahead"] == "17/21"
    assert out["opened_ahead"] == "6/21"
    assert out["stage_p50_by_tick_size"][3]["prefill_ahead_ms"] == 2.0
    assert set(out["calls_outside_usual_tick"]) == {0, 1, 2, 3, 4, 5}
    assert out["calls_outside_usual_tick"][0] == 1
    path = tmp_path / "units-omni_duplex-6.jsonl"
    path.write_text("".join(json.dumps(u) + "\n" for u in level()))
    main([str(path)])
    assert '"frames_ahead": "17/21"' in capsys.readouterr().out
