"""Admission control: worker slots, a bounded FIFO queue of waiting callers, and queue ETAs.

Each worker holds a share of 1.0. A session of mode m takes 1 / capacity_m of it, where capacity_m is the number
of real-time sessions of that mode the worker measured on its card (`bench/capacity.py`'s table, reported in
its hello), else 1 / the configured capacity per worker. So a worker that holds 64 audio-duplex or 48
omni-duplex sessions admits any mix of the two that fits. A caller gets a place at once if a worker that is up
has room for its mode; otherwise it waits in FIFO order. A mode switch during a call moves its share to the
new mode and never evicts anyone (the next admissions see the higher load). ETA: each busy slot is expected to free
after the mean of recent session lengths (or the configured default), counted from when its session was
admitted (at least 1 s ahead if overdue); queued callers take the earliest expected free slots in order, and
each one then holds its slot for another expected session length.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from inference.supervisor import WorkerHandle, WorkerSupervisor


class QueueFull(Exception):
    pass


class Ticket(Protocol):
    """A caller, as admission sees it (implemented by CallSession)."""

    id: str
    mode: str

    def admit(self, worker_id: int) -> None: ...

    def queue_update(self, position: int, eta_s: float) -> None: ...


@dataclass
class _Busy:
    worker_id: int
    admitted_at: float
    mode: str


def session_share(worker: WorkerHandle, mode: str) -> float:
    """The share of `worker` one session of `mode` takes."""
    measured = worker.capacity_by_mode.get(mode)
    capacity = measured if measured else worker.capacity
    return 1.0 / max(capacity, 1)


@dataclass
class Admission:
    supervisor: WorkerSupervisor
    max_queue: int
    default_session_s: float
    clock: Callable[[], float] = time.monotonic
    waiting: list[Ticket] = field(default_factory=list)
    busy: dict[str, _Busy] = field(default_factory=dict)
    recent_lengths: deque[float] = field(default_factory=lambda: deque(maxlen=20))

    def load(self, worker: WorkerHandle) -> float:
        """The share of `worker` its sessions take (1.0 = full)."""
        return sum(
            session_share(worker, b.mode) for b in self.busy.values() if b.worker_id == worker.worker_id
        )

    def _free_worker(self, mode: str) -> int | None:
        """The up worker with the most room left after one more session of `mode`, or None."""
        best, best_room = None, -1e-9  # a session that exactly fills a worker fits
        for worker in self.supervisor.workers:
            if not worker.up or not worker.capacity_final:
                continue  # down, or still loading its model and sizing its caches
            room = 1.0 - self.load(worker) - session_share(worker, mode)
            if room > best_room:
                best, best_room = worker.worker_id, room
        return best

    def request(self, ticket: Ticket) -> None:
        """Admit now (ticket.admit is called) or queue (ticket.queue_update); QueueFull if neither."""
        if not self.waiting:
            worker_id = self._free_worker(ticket.mode)
            if worker_id is not None:
                self.busy[ticket.id] = _Busy(worker_id, self.clock(), ticket.mode)
                ticket.admit(worker_id)
                return
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"all {self.capacity} session slots are busy and the queue is full")
        self.waiting.append(ticket)
        self.notify_queue()

    def would_accept(self, mode: str) -> bool:
        return len(self.waiting) < self.max_queue or (
            not self.waiting and self._free_worker(mode) is not None
        )

    def switch(self, ticket: Ticket, mode: str) -> None:
        """The call now runs `mode`: its share changes (nobody is evicted); a lighter mode may let someone in."""
        busy = self.busy.get(ticket.id)
        if busy is not None and busy.mode != mode:
            busy.mode = mode
            self.dispatch()

    def leave(self, ticket: Ticket) -> None:
        """The caller hung up: free its slot or leave the queue, and let the next caller in."""
        busy = self.busy.pop(ticket.id, None)
        if busy is not None:
            self.recent_lengths.append(self.clock() - busy.admitted_at)
            self.dispatch()
        elif ticket in self.waiting:
            self.waiting.remove(ticket)
            self.notify_queue()  # everyone behind moves up

    def dispatch(self) -> None:
        """Admit waiting callers while slots are free (also called when a worker comes back)."""
        moved = False
        while self.waiting:
            worker_id = self._free_worker(self.waiting[0].mode)
            if worker_id is None:
                break
            ticket = self.waiting.pop(0)
            self.busy[ticket.id] = _Busy(worker_id, self.clock(), ticket.mode)
            ticket.admit(worker_id)
            moved = True
        if moved:
            self.notify_queue()

    @property
    def capacity(self) -> int:
        return sum(w.capacity for w in self.supervisor.workers)

    def expected_session_s(self) -> float:
        if not self.recent_lengths:
            return self.default_session_s
        return sum(self.recent_lengths) / len(self.recent_lengths)

    def etas(self) -> list[float]:
        """Expected wait in seconds of each queued caller, in queue order."""
        expected = self.expected_session_s()
        now = self.clock()
        # A call past the usual length is not about to end: count at least half a usual call for it, so that
        # an overdue queue does not promise "1 s" to everyone.
        slots = [max(expected - (now - b.admitted_at), expected / 2) for b in self.busy.values()]
        slots += [0.0] * max(self.capacity - len(slots), 0)
        if not slots:
            slots = [expected]
        heapq.heapify(slots)
        etas = []
        for _ in self.waiting:
            t = heapq.heappop(slots)
            etas.append(t)
            heapq.heappush(slots, t + expected)
        return etas

    def notify_queue(self) -> None:
        for position, (ticket, eta) in enumerate(zip(self.waiting, self.etas(), strict=True), start=1):
            ticket.queue_update(position, round(eta, 1))

    def position(self, ticket: Ticket) -> int | None:
        try:
            return self.waiting.index(ticket) + 1
        except ValueError:
            return None
