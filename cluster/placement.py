"""Where a new call goes: the node with room for its mode and the most free share (pure Python, no Ray).

Each GPU worker of a node holds a share of 1.0 (as in `rtc_server.admission`): a call of mode m takes
1 / capacity_m of one worker. A node reports, per worker, its capacity per mode and the share its calls take
now. The placer adds the calls it has placed there since that report (`pending`), so that a burst of offers
between two reports spreads instead of piling onto the node that looked emptiest.

If no node has room, the call goes to the node whose first worker is expected to free soonest relative to
the callers already waiting there (its own FIFO queue holds the caller, who hears its position and ETA). The
same class runs in the cluster registry and in the simulation of `bench/placement.py`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from pydantic import BaseModel, Field

EPS = 1e-9


class WorkerLoad(BaseModel):
    """One GPU (or CPU) worker of a node, as the node agent reports it."""

    worker_id: int
    up: bool = True
    capacity_by_mode: dict[str, float] = Field(default_factory=dict)  # sessions of each mode it holds
    capacity: float = 1.0  # sessions of a mode it has no number for
    load: float = 0.0  # share taken by its calls (1.0 = full)

    def share(self, mode: str) -> float:
        capacity = self.capacity_by_mode.get(mode) or self.capacity
        return 1.0 / max(capacity, 1.0)


class NodeLoad(BaseModel):
    """A node as placement sees it: its workers, its queue and whether it is usable."""

    name: str
    up: bool = True
    workers: list[WorkerLoad] = Field(default_factory=list)
    queued: int = 0  # callers waiting in the node's own FIFO queue
    modes: list[str] = Field(default_factory=list)  # the modes its workers serve

    def capacity_by_mode(self) -> dict[str, float]:
        """Calls of each mode the node's up workers hold, all of that mode."""
        modes = set(self.modes) | {m for w in self.workers for m in w.capacity_by_mode}
        return {m: sum(1.0 / w.share(m) for w in self.workers if w.up) for m in sorted(modes)}

    def free_share(self) -> float:
        """Room left over the up workers, in workers (8 idle GPUs: 8.0)."""
        return sum(max(1.0 - w.load, 0.0) for w in self.workers if w.up)


class Placer:
    """Chooses a node per call from the nodes' last reports plus the calls placed since (`pending`).

    Each node's effective worker loads (report + pending) are kept up to date as calls are placed, so one
    choice costs one pass over the nodes' workers."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeLoad] = {}
        self.pending: dict[str, list[tuple[str, str]]] = {}  # node -> [(call id, mode)] since its last report
        self._loads: dict[str, list[float]] = {}  # node -> effective load of each worker (down: not there)

    def report(self, node: NodeLoad, counted: Iterable[str] = ()) -> None:
        """A node's fresh report; `counted`: the pending call ids it already counts (in its load or queue, or
        ended): they are dropped from its pending list."""
        self.nodes[node.name] = node
        known = set(counted)
        self.pending[node.name] = [p for p in self.pending.get(node.name, []) if p[0] not in known]
        loads = [w.load if w.up else math.inf for w in node.workers]
        for _, mode in self.pending[node.name]:
            self._take(node, loads, mode)
        self._loads[node.name] = loads

    def node_down(self, name: str) -> None:
        node = self.nodes.get(name)
        if node is not None:
            self.nodes[name] = node.model_copy(update={"up": False})
        self.pending.pop(name, None)
        self._loads.pop(name, None)

    @staticmethod
    def _best(node: NodeLoad, loads: list[float], mode: str) -> tuple[int, float]:
        """The worker that takes a call of `mode` with the least load after it, and that load (inf: none)."""
        best, best_after = -1, math.inf
        for i, w in enumerate(node.workers):
            after = loads[i] + w.share(mode)
            if after < best_after:
                best, best_after = i, after
        return best, best_after

    @classmethod
    def _take(cls, node: NodeLoad, loads: list[float], mode: str) -> None:
        """Put one call of `mode` on its best worker (past full if none has room: the node queues it)."""
        best, after = cls._best(node, loads, mode)
        if best >= 0 and after < math.inf:
            loads[best] = after

    def room(self, node: NodeLoad, mode: str) -> float | None:
        """Free share left on `node` after one more call of `mode`, or None if it does not fit now."""
        loads = self._loads.get(node.name)
        if not node.up or loads is None:
            return None
        best, after = self._best(node, loads, mode)
        if best < 0 or after > 1.0 + EPS:
            return None
        free = sum(1.0 - load for load in loads if load < 1.0)
        return free - (after - loads[best])

    def choose(self, mode: str) -> tuple[str, bool] | None:
        """(node, admitted at once?) for a new call of `mode`, or None when no node is up. With room
        somewhere: the node with the most free share left. Without: the node with the fewest waiting callers
        per worker (its FIFO queue holds the caller)."""
        best: str | None = None
        best_room = -1.0
        for node in self.nodes.values():
            room = self.room(node, mode)
            if room is not None and room > best_room:
                best, best_room = node.name, room
        if best is not None:
            return best, True
        waiting: str | None = None
        best_wait = 0.0
        for node in self.nodes.values():
            up = sum(1 for w in node.workers if w.up)
            if not node.up or not up or node.name not in self._loads:
                continue
            per_worker = (node.queued + len(self.pending.get(node.name, []))) / up
            if waiting is None or per_worker < best_wait:
                waiting, best_wait = node.name, per_worker
        return (waiting, False) if waiting is not None else None

    def rename(self, name: str, key: str, call_id: str) -> None:
        """The call placed under `key` is `call_id` from now on (the node answered with its id)."""
        self.pending[name] = [(call_id if k == key else k, m) for k, m in self.pending.get(name, [])]

    def unplace(self, name: str, key: str) -> None:
        """The call placed under `key` did not go there after all (the node refused it)."""
        self.pending[name] = [p for p in self.pending.get(name, []) if p[0] != key]
        node = self.nodes.get(name)
        if node is not None and name in self._loads:
            self.report(node)

    def placed(self, name: str, call_id: str, mode: str) -> None:
        """A call went to `name`: count it there until the node's next report includes it."""
        self.pending.setdefault(name, []).append((call_id, mode))
        node, loads = self.nodes.get(name), self._loads.get(name)
        if node is not None and loads is not None:
            self._take(node, loads, mode)
