"""The worker's garbage-collection pauses: timed by a `gc.callbacks` entry, and the loaded engine frozen out of
later scans."""

from __future__ import annotations

import gc

from inference.gc_pauses import GcPauses, freeze_loaded


def make_cycles(n: int) -> None:
    for _ in range(n):
        a: dict[str, object] = {}
        a["self"] = [a, {"x": [a]}]


def test_collections_over_the_threshold_are_counted_and_timed() -> None:
    every, none = GcPauses(threshold_ms=0.0), GcPauses(threshold_ms=1e9)
    gc.callbacks.extend([every, none])
    try:
        make_cycles(20_000)
        gc.collect()
    finally:
        gc.callbacks.remove(every)
        gc.callbacks.remove(none)
    assert every.count >= 1 and every.total_ms >= every.longest_ms > 0
    assert (none.count, none.total_ms) == (0, 0.0)


def test_freezing_keeps_what_exists_out_of_later_scans() -> None:
    try:
        frozen = freeze_loaded()
        assert frozen == gc.get_freeze_count() > 1000  # the interpreter's and pytest's objects at least
        # a full collection now walks only what was made after the freeze: far fewer objects
        stats = GcPauses(threshold_ms=0.0)
        gc.callbacks.append(stats)
        try:
            gc.collect()
        finally:
            gc.callbacks.remove(stats)
        assert len(gc.get_objects()) < frozen
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0


def test_a_preloaded_worker_keeps_its_engine_out_of_collections() -> None:
    """What a GPU worker does after its warm-up (here on the embedded model, on the CPU): the engine's objects are
    frozen, so a full collection during live ticks does not walk them (~150 ms for the tiny model's ~330,000
    objects on one EPYC core)."""
    from inference import engine_host
    from inference.worker import preload_engine
    from tests.worker_helpers import embedded

    saved, engine_host._HOST = engine_host._HOST, None  # a host of its own; the process's one back after
    try:
        assert preload_engine(embedded(max_sessions=2)) is not None
        assert gc.get_freeze_count() > 100_000
    finally:
        gc.unfreeze()
        engine_host._HOST = saved
