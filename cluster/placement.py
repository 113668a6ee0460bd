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
    """Chooses a node per call from the nodes' last reports plus the calls placed since (`pending`)."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeLoad] = {}
        self.pending: dict[str, list[tuple[str, str]]] = {}  # node -> [(call id, mode)] since its last report

    def report(self, node: NodeLoad, seen: Iterable[str] = ()) -> None:
        """A node's fresh report; `seen`: the call ids it already counts (their pending share is dropped)."""
        self.nodes[node.name] = node
        known = set(seen)
        self.pending[node.name] = [p for p in self.pending.get(node.name, []) if p[0] not in known]

    def node_down(self, name: str) -> None:
        node = self.nodes.get(name)
        if node is not None:
            self.nodes[name] = node.model_copy(update={"up": False})
        self.pending.pop(name, None)

    def _loads(self, node: NodeLoad) -> list[float]:
        loads = [w.load if w.up else 2.0 for w in node.workers]
        for _, mode in self.pending.get(node.name, []):
            self._take(node, loads, mode)
        return loads

    @staticmethod
    def _take(node: NodeLoad, loads: list[float], mode: str) -> bool:
        """Put one call of `mode` on the worker with the most room; False if none has room (then on the least
        loaded one anyway, as the node's admission would queue it there)."""
        best = -1
        for i, w in enumerate(node.workers):
            if w.up and (best < 0 or loads[i] + w.share(mode) < loads[best] + node.workers[best].share(mode)):
                best = i
        if best < 0:
            return False
        fits = loads[best] + node.workers[best].share(mode) <= 1.0 + EPS
        loads[best] += node.workers[best].share(mode)
        return fits

    def room(self, node: NodeLoad, mode: str) -> float | None:
        """Free share left on `node` after one more call of `mode`, or None if it does not fit now."""
        if not node.up or not any(w.up for w in node.workers):
            return None
        loads = self._loads(node)
        if not self._take(node, loads, mode):
            return None
        return sum(max(1.0 - load, 0.0) for load, w in zip(loads, node.workers, strict=True) if w.up)

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
            if not node.up or not up:
                continue
            per_worker = (node.queued + len(self.pending.get(node.name, []))) / up
            if waiting is None or per_worker < best_wait:
                waiting, best_wait = node.name, per_worker
        return (waiting, False) if waiting is not None else None

    def placed(self, name: str, call_id: str, mode: str) -> None:
        """A call went to `name`: count it there until the node's next report includes it."""
        self.pending.setdefault(name, []).append((call_id, mode))
