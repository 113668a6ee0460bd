"""How many sessions a worker claims, and where the number comes from.

A worker's capacity per mode is, in order of precedence:
- `table`: the `model.capacity_table` the operator named (a `bench/capacity.py` output);
- `configured`: `workers.capacity_per_gpu` (or `cpu_capacity`) set to a number;
- `shipped`: a table in `MiniCPMO45/engine/capacity_tables/` measured on the same card at a context at least
  as long as this worker's (`model.max_kv_tokens`);
- `default`: one session, when nothing else is known.

Whatever the source, a GPU worker never claims more sessions than its memory holds: after loading the weights it
measures what one session's caches take, and clamps the count to what fits in the free memory less a reserve
for graphs and activations (`model.gpu_reserve_gib`). The source then reads e.g. `shipped, memory-limited`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if (
    TYPE_CHECKING
):  # the MiniCPMO45.engine package imports torch; a worker imports this module before it loads it
    from MiniCPMO45.engine.capacity import CapacityTable

SHIPPED_TABLES = Path(__file__).resolve().parent.parent / "MiniCPMO45" / "engine" / "capacity_tables"
GIB = 1 << 30


class WorkerCapacity(BaseModel):
    """What a worker reports: sessions per mode (empty: every mode takes 1 / `sessions`), and why."""

    model_config = ConfigDict(extra="forbid")
    sessions: int = Field(ge=1)  # sessions of the most expensive mode (admission's figure for unlisted modes)
    by_mode: dict[str, int] = Field(default_factory=dict)
    source: str
    per_session_mib: float | None = None  # device memory of one session's caches, where measured
    free_mib: float | None = None  # device memory free for sessions after the weights, where measured

    @property
    def slots(self) -> int:
        """KV slots the worker needs: the most sessions any one mode may have at once."""
        return max(self.sessions, *self.by_mode.values()) if self.by_mode else self.sessions


def shipped_table(card: str, context: int, folder: Path = SHIPPED_TABLES) -> CapacityTable | None:
    """The shipped table measured on `card` at a context of at least `context` positions (the shortest such)."""
    from MiniCPMO45.engine.capacity import CapacityTable

    matches = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        table = CapacityTable.from_file(path)
        if table.card == card and table.context >= context:
            matches.append(table)
    return min(matches, key=lambda t: t.context) if matches else None


def planned_capacity(
    *,
    explicit_table: str,
    configured: int | None,
    card: str | None,
    context: int,
    modes: list[str],
) -> WorkerCapacity:
    """The capacity before memory is looked at (see the module docstring for the order)."""
    from MiniCPMO45.engine.capacity import CapacityTable

    if explicit_table:
        table = CapacityTable.from_file(explicit_table)
        source = "table"
    elif configured:
        return WorkerCapacity(sessions=configured, source="configured")
    else:
        found = shipped_table(card, context) if card else None
        if found is None:
            return WorkerCapacity(sessions=1, source="default")
        table, source = found, "shipped"
    by_mode = {m: c.sessions for m, c in table.modes.items() if c.sessions > 0}
    worst = table.worker_capacity(modes) or (max(by_mode.values()) if by_mode else 1)
    return WorkerCapacity(sessions=worst, by_mode=by_mode, source=source)


def sessions_that_fit(free_bytes: int, per_session_bytes: int, reserve_bytes: int) -> int:
    """Sessions whose caches fit in `free_bytes` after keeping `reserve_bytes` for graphs and activations."""
    if per_session_bytes <= 0:
        raise ValueError("a session takes some memory")
    return max((free_bytes - reserve_bytes) // per_session_bytes, 0)


def limit_to_memory(
    plan: WorkerCapacity, free_bytes: int, per_session_bytes: int, reserve_bytes: int
) -> WorkerCapacity:
    """`plan` with every count clamped to what the memory holds; raises MemoryError if not even one fits."""
    fit = sessions_that_fit(free_bytes, per_session_bytes, reserve_bytes)
    if fit < 1:
        raise MemoryError(
            f"one session needs {per_session_bytes / GIB:.2f} GiB but only "
            f"{(free_bytes - reserve_bytes) / GIB:.2f} GiB are free after the weights and the "
            f"{reserve_bytes / GIB:.1f} GiB reserve: lower model.max_kv_tokens or model.gpu_reserve_gib"
        )
    measured = {"per_session_mib": per_session_bytes / (1 << 20), "free_mib": free_bytes / (1 << 20)}
    return limit_to_count(plan.model_copy(update=measured), fit)


def limit_to_count(plan: WorkerCapacity, fit: int) -> WorkerCapacity:
    """`plan` with every count clamped to `fit` sessions (marked memory-limited if anything changed)."""
    if fit >= plan.slots:
        return plan
    source = plan.source if plan.source.endswith("memory-limited") else f"{plan.source}, memory-limited"
    return plan.model_copy(
        update={
            "sessions": min(plan.sessions, fit),
            "by_mode": {m: min(n, fit) for m, n in plan.by_mode.items()},
            "source": source,
        }
    )
