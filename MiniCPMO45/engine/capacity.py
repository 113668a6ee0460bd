"""How many real-time sessions of each mode one worker holds: the table `bench/capacity.py` measures.

A worker loads the table (JSON) that was measured on its card and reports the numbers in its `hello`; the
server admits that many sessions per worker and queues the rest. Without a table the worker reports nothing and
the server's configured capacity applies.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, Field


class ModeCapacity(BaseModel):
    sessions: int = Field(ge=0)  # concurrent sessions with p95 unit latency within target and no late unit


class CapacityTable(BaseModel):
    card: str
    context: int = Field(4096, ge=1)  # KV positions per session the numbers were measured at
    modes: dict[str, ModeCapacity]

    @classmethod
    def from_file(cls, path: str | Path) -> CapacityTable:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"capacity table {path} not found")
        return cls.model_validate_json(path.read_text())

    def for_mode(self, mode: str) -> int | None:
        entry = self.modes.get(mode)
        return entry.sessions if entry is not None else None

    def worker_capacity(self, modes: Iterable[str]) -> int | None:
        """Sessions a worker serving `modes` may admit without knowing the mix: the smallest measured
        number among them (the most expensive mode); None when none of them was measured."""
        known = [c for m in modes if (c := self.for_mode(m)) is not None]
        return min(known) if known else None
