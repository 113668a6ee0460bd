"""bench/tick_profile.py: the stage marks wrap and restore every kind of function, and the summary splits a
tick's wall time into the GPU's busy time inside each range."""

from __future__ import annotations

import time
import types

import torch

from bench.tick_profile import Mark, busy_inside, marked, profile_ticks, summarise


class Worker:
    @staticmethod
    def stage(x: int) -> int:
        return x + 1

    def method(self, x: int) -> int:
        return x * 2


def test_marks_wrap_static_methods_objects_and_modules_then_restore_them() -> None:
    module = types.ModuleType("fake")
    module.fn = lambda x: x - 1  # type: ignore[attr-defined]
    worker = Worker()
    before = (Worker.__dict__["stage"], module.fn)  # type: ignore[attr-defined]
    marks = [Mark(Worker, "stage", "a"), Mark(worker, "method", "b"), Mark(module, "fn", "c", top=False)]
    with torch.profiler.profile() as prof, marked(marks):
        assert Worker.stage(1) == 2 and worker.method(3) == 6 and module.fn(5) == 4  # type: ignore[attr-defined]
        assert "method" in vars(worker)
    names = {e.name for e in prof.events()}
    assert {"a", "b", "c"} <= names
    assert Worker.__dict__["stage"] is before[0] and module.fn is before[1]  # type: ignore[attr-defined]
    assert "method" not in vars(worker)  # the class's method shows again


def test_busy_inside_counts_overlapping_spans_once() -> None:
    spans = [(0.0, 10.0), (5.0, 15.0), (20.0, 30.0)]
    assert busy_inside(spans, 0.0, 100.0) == 25.0
    assert busy_inside(spans, 12.0, 22.0) == 5.0
    assert busy_inside(spans, 30.0, 40.0) == 0.0


def test_summary_splits_the_tick_into_stages_and_the_rest() -> None:
    def x(name: str, ts: float, dur: float, cat: str = "user_annotation") -> dict[str, object]:
        return {"ph": "X", "name": name, "ts": ts, "dur": dur, "cat": cat}

    trace = {
        "traceEvents": [
            x("tick", 0, 10_000),
            x("decode", 1_000, 4_000),
            x("vocoder", 6_000, 3_000),
            x("k", 1_000, 4_000, "kernel"),  # the GPU busy for all of decode
            x("k", 6_000, 1_000, "kernel"),  # ... and a third of the vocoder
        ]
    }
    rows = summarise(trace, [Mark(None, "d", "decode"), Mark(None, "v", "vocoder")])
    table = {r.split(" | ")[0].strip("| "): r.split(" | ")[1:] for r in rows[2:]}
    assert table["tick"][:3] == ["1", "10.0", "5.0"]
    assert table["decode"][3].rstrip(" |") == "100%"
    assert table["vocoder"][2] == "1.0"
    assert table["tick outside the stages"][1:3] == ["3.0", "0.0"]


def test_profile_ticks_writes_the_summary_and_the_trace(tmp_path) -> None:  # noqa: ANN001
    seen: list[int] = []

    def tick(j: int) -> None:
        seen.append(Worker.stage(j))

    summary = profile_ticks(tick, 3, [Mark(Worker, "stage", "stage")], tmp_path / "p", "three ticks")
    assert seen == [1, 2, 3]
    assert "| stage | 3 |" in summary and "| tick | 3 |" in summary
    assert (tmp_path / "p.txt").read_text().startswith("three ticks")
    assert (tmp_path / "p.json.gz").stat().st_size > 0


def test_work_before_a_tick_stays_out_of_its_range(tmp_path) -> None:  # noqa: ANN001
    def slow_before(j: int) -> None:
        time.sleep(0.05)

    summary = profile_ticks(lambda j: None, 2, [], tmp_path / "p", "t", before=slow_before)
    tick_ms = float(next(r for r in summary.splitlines() if r.startswith("| tick |")).split(" | ")[2])
    assert tick_ms < 25  # the 50 ms before each tick are not in it
