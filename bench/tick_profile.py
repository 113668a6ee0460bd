"""Profile a few worker ticks with `torch.profiler` and say where each marked stage spends its wall time.

The benches (`bench/chat_capacity.py`, `bench/capacity.py`, option `--profile N`) name the functions that make a
tick's stages; for the profiled ticks only, each is wrapped in a `record_function` range of the stage's name. The
summary gives, per stage, its wall time per call and how much of it the GPU was busy (kernels, copies and sets
running, whichever launch they came from): a stage whose GPU share is low waits for the host (Python, launches,
syncs), one near 100 % is bound by the GPU. Nothing here runs in the server.
"""

from __future__ import annotations

import contextlib
import gzip
import inspect
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Mark:
    """`owner.attribute` (a function of a module, a class's method or static method, or an object's method) runs
    inside a range named `name`. `top`: a stage of the tick itself (the tick's time outside every top stage is
    reported too); otherwise a part inside a top stage."""

    owner: Any
    attribute: str
    name: str
    top: bool = True


@contextlib.contextmanager
def marked(marks: Sequence[Mark]) -> Iterator[None]:
    """Each mark's function wrapped in its range while the block runs; the originals restored after."""
    undo: list[Callable[[], None]] = []

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            with torch.profiler.record_function(name):
                return fn(*args, **kwargs)

        return run

    try:
        for mark in marks:
            raw = inspect.getattr_static(mark.owner, mark.attribute)
            if isinstance(raw, staticmethod):
                setattr(mark.owner, mark.attribute, staticmethod(wrap(mark.name, raw.__func__)))
                undo.append(lambda m=mark, r=raw: setattr(m.owner, m.attribute, r))
            elif inspect.isclass(mark.owner) or inspect.ismodule(mark.owner):
                setattr(mark.owner, mark.attribute, wrap(mark.name, raw))
                undo.append(lambda m=mark, r=raw: setattr(m.owner, m.attribute, r))
            else:  # an object: the wrapper is an instance attribute that hides the class's method
                own = mark.attribute in vars(mark.owner)
                bound = getattr(mark.owner, mark.attribute)
                setattr(mark.owner, mark.attribute, wrap(mark.name, bound))
                if own:
                    undo.append(lambda m=mark, b=bound: setattr(m.owner, m.attribute, b))
                else:
                    undo.append(lambda m=mark: delattr(m.owner, m.attribute))
        yield
    finally:
        for step in reversed(undo):
            step()


def busy_inside(spans: Sequence[tuple[float, float]], lo: float, hi: float) -> float:
    """Time within [lo, hi] covered by the union of the sorted (start, end) spans."""
    total, reach = 0.0, lo
    for a, b in spans:
        if b <= reach:
            continue
        if a >= hi:
            break
        a, b = max(a, reach), min(b, hi)
        if b > a:
            total += b - a
            reach = b
    return total


def summarise(trace: dict[str, Any], marks: Sequence[Mark], tick: str = "tick") -> list[str]:
    """A markdown table: per range (the tick, each mark, the tick outside its top stages) the calls, wall ms per
    call and the GPU's busy ms inside it per call, and that share."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    gpu = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
        for e in events
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    )

    def ranges(name: str) -> list[tuple[float, float]]:
        return [
            (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
            for e in events
            if e.get("cat") == "user_annotation" and e.get("name") == name
        ]

    totals: dict[str, tuple[int, float, float]] = {}
    for name in [tick, *dict.fromkeys(m.name for m in marks)]:
        spans = ranges(name)
        wall = sum(b - a for a, b in spans) / 1000
        busy = sum(busy_inside(gpu, a, b) for a, b in spans) / 1000
        totals[name] = (len(spans), wall, busy)
    tops = list(dict.fromkeys(m.name for m in marks if m.top))
    ticks = totals[tick][0]
    totals[f"{tick} outside the stages"] = (
        ticks,
        totals[tick][1] - sum(totals[t][1] for t in tops),
        totals[tick][2] - sum(totals[t][2] for t in tops),
    )
    lines = [
        "| range | calls | wall ms per call | GPU busy ms inside, per call | GPU busy share |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, (calls, wall, busy) in totals.items():
        if calls and wall > 0:
            lines.append(
                f"| {name} | {calls} | {wall / calls:.1f} | {busy / calls:.1f} | {busy / wall:.0%} |"
            )
    return lines


def profile_ticks(
    run_tick: Callable[[int], None],
    ticks: int,
    marks: Sequence[Mark],
    dest: Path,
    title: str,
    period_s: float = 0.0,
    before: Callable[[int], None] | None = None,
) -> str:
    """Run `run_tick(j)` for j < ticks under the profiler (one tick every `period_s` at most), each inside a
    `tick` range (`before(j)`, if given, runs just before it, outside the range: work the worker does before a
    tick starts); write DEST.txt (the summary and the top operators) and DEST.json.gz (the trace). `run_tick`
    must wait for its GPU work before it returns. Returns the summary."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    cuda = torch.cuda.is_available()
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    start = time.perf_counter()
    with marked(marks), torch.profiler.profile(activities=activities) as prof:
        for j in range(ticks):
            if (wait := start + j * period_s - time.perf_counter()) > 0:
                time.sleep(wait)
            if before is not None:
                before(j)
            with torch.profiler.record_function("tick"):
                run_tick(j)
    raw = dest.with_suffix(".trace.json")
    prof.export_chrome_trace(str(raw))
    trace = json.loads(raw.read_text())
    with gzip.open(dest.with_suffix(".json.gz"), "wt") as fh:
        json.dump(trace, fh)
    raw.unlink()
    summary = "\n".join([title, *summarise(trace, marks)])
    averages = prof.key_averages()
    dest.with_suffix(".txt").write_text(
        "\n\n".join(
            [
                summary,
                averages.table(
                    sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=40
                ),
                averages.table(sort_by="self_cpu_time_total", row_limit=30),
            ]
        )
    )
    return summary
