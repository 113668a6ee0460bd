"""Read a `bench/e2e.py` level unit by unit (`units-*.jsonl`): its ticks, and the calls that rode another tick.

    python bench/units_report.py OUT/units-omni_duplex-48.jsonl [...]

The units of one worker tick share its run (`tick_ms`, the same float in each); a tick is told apart by that
value and by when its units came back (`received_at`, within `SAME_TICK_S`). Prints, per file: how many ticks
held how many sessions (a phase's tick holds about half the calls; a tick of a few is a phase's stragglers, a
tick of more than half is a merged one), each stage's p50 per tick size, how many units had their camera frame
encoded before their tick (`vision_ahead_ms`) and were opened with it (`prefill_ahead_ms`), and the calls whose
units were not in their usual tick size.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

SAME_TICK_S = 0.05  # units of one tick come back within this of each other
# a duplex tick's stages in `UnitMetrics` (the same for every unit of the tick; bench/e2e.py reports them too)
TICK_STAGES = ("prefill_ms", "vision_ahead_ms", "prefill_ahead_ms", "decide_ms", "tts_ms", "vocoder_ms")
STAGES = ("tick_wait_ms", "tick_ms", *TICK_STAGES, "grid_ms")


def ticks(units: Iterable[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The units grouped by tick: equal `tick_ms`, back at the callers within `SAME_TICK_S` of each other."""
    by_run: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for u in units:
        if u.get("tick_ms") is not None and u.get("received_at") is not None:
            by_run[u["tick_ms"]].append(u)
    out: list[list[dict[str, Any]]] = []
    for same in by_run.values():
        same.sort(key=lambda u: u["received_at"])
        group = [same[0]]
        for u in same[1:]:
            if u["received_at"] - group[0]["received_at"] > SAME_TICK_S:
                out.append(group)
                group = []
            group.append(u)
        out.append(group)
    return sorted(out, key=lambda g: g[0]["received_at"])


def p50(values: Sequence[float]) -> float | None:
    return float(np.median(values)) if len(values) else None


def report(units: list[dict[str, Any]]) -> dict[str, Any]:
    """Tick sizes, stage p50s per tick size, frames encoded ahead, and the calls outside the usual size."""
    groups = ticks(units)
    sizes = Counter(len(g) for g in groups)
    usual = sizes.most_common(1)[0][0] if sizes else 0
    stages: dict[int, dict[str, float | None]] = {}
    for size in sorted(sizes):
        rows = [g[0] for g in groups if len(g) == size]  # a tick's stage times are its units' alike
        stages[size] = {s: p50([r[s] for r in rows if r.get(s) is not None]) for s in STAGES}
    odd = Counter(u["call"] for g in groups if len(g) != usual for u in g)
    framed = [u for u in units if u.get("mode") == "omni_duplex"]
    return {
        "units": len(units),
        "ticks": dict(sorted(sizes.items())),
        "stage_p50_by_tick_size": stages,
        "frames_ahead": f"{sum(u.get('vision_ahead_ms') is not None for u in framed)}/{len(framed)}",
        "opened_ahead": f"{sum(u.get('prefill_ahead_ms') is not None for u in framed)}/{len(framed)}",
        "calls_outside_usual_tick": dict(odd.most_common(10)),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for path in args.files:
        units = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        print(path.name, json.dumps(report(units), indent=1))


if __name__ == "__main__":
    main()
