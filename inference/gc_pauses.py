"""Python's cyclic garbage collector in a worker: its pauses timed, and the loaded model kept out of its scans.

A collection runs in whichever thread allocated last, holding the GIL, so every thread of the worker (the mode
thread's tick included) stops until it ends. A full (generation 2) collection walks every tracked container
object: in a worker with a model, its graphs and caches loaded, that is millions of objects and can take tens of
ms. `freeze_loaded` moves what exists after start-up to the permanent generation (`gc.freeze`), so a full
collection during live ticks walks only the objects the calls made since. `PAUSES` counts the collections that
took longer than its threshold; the tick loop reports those that fell inside a tick (`inference.ticker`).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class GcPauses:
    """A `gc.callbacks` entry: the collections that took at least `threshold_ms`, how many and how long."""

    threshold_ms: float = 10.0
    count: int = 0
    total_ms: float = 0.0
    longest_ms: float = 0.0
    _started: float = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        ms = (time.perf_counter() - self._started) * 1000
        if ms >= self.threshold_ms:
            self.count += 1
            self.total_ms += ms
            self.longest_ms = max(self.longest_ms, ms)


PAUSES = GcPauses()


def watch() -> GcPauses:
    """Time this process's collections from now on (once per process)."""
    if not any(cb is PAUSES for cb in gc.callbacks):
        gc.callbacks.append(PAUSES)
    return PAUSES


def freeze_loaded() -> int:
    """Collect once, then keep every object alive now out of later collections' scans; returns how many."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
