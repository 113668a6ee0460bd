"""Admission: worker slots, FIFO queue, leaving the queue, the bound, and ETAs from session lengths."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from inference.supervisor import SupervisorSettings, WorkerSupervisor
from rtc_server.admission import Admission, QueueFull


@dataclass(eq=False)
class FakeCaller:
    id: str
    worker: int | None = None
    updates: list[tuple[int, float]] = field(default_factory=list)

    def admit(self, worker_id: int) -> None:
        self.worker = worker_id

    def queue_update(self, position: int, eta_s: float) -> None:
        self.updates.append((position, eta_s))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _admission(gpus: list[int], max_queue: int, clock: Clock) -> Admission:
    supervisor = WorkerSupervisor(SupervisorSettings(gpus=gpus, capacity_per_gpu=1), {})  # never started
    for worker in supervisor.workers:
        worker.up = True
    return Admission(supervisor, max_queue=max_queue, default_session_s=100.0, clock=clock)


def test_fifo_queue_with_etas_and_bound() -> None:
    clock = Clock()
    adm = _admission([0, 1], max_queue=2, clock=clock)
    a, b, c, d, e = (FakeCaller(x) for x in "abcde")
    adm.request(a)
    adm.request(b)
    assert {a.worker, b.worker} == {0, 1}  # spread over both workers
    clock.now += 30
    adm.request(c)
    adm.request(d)
    assert c.worker is None and d.worker is None
    # both slots free in ~70 s (100 s default length, 30 s elapsed)
    assert c.updates[-1] == (1, 70.0) and d.updates[-1] == (2, 70.0)
    with pytest.raises(QueueFull):
        adm.request(e)
    assert not adm.would_accept()

    clock.now += 10
    adm.leave(c)  # a queued caller hangs up: d moves up
    assert d.updates[-1][0] == 1 and adm.position(d) == 1
    adm.leave(a)  # a slot frees: d is admitted on a's worker
    assert d.worker == a.worker and adm.waiting == []
    assert adm.recent_lengths[-1] == pytest.approx(40.0)

    adm.request(e)
    adm.request(c)
    # ETA now uses the measured 40 s length: b's slot (40 s old) is overdue -> 1 s; d's is fresh -> 40 s
    assert e.updates[-1] == (1, 1.0)
    assert c.updates[-1] == (2, 40.0)


def test_down_worker_takes_no_sessions_until_it_is_back() -> None:
    clock = Clock()
    adm = _admission([0], max_queue=4, clock=clock)
    adm.supervisor.workers[0].up = False
    a = FakeCaller("a")
    adm.request(a)
    assert a.worker is None and adm.position(a) == 1
    adm.supervisor.workers[0].up = True
    adm.dispatch()
    assert a.worker == 0 and adm.position(a) is None
