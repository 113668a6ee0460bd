"""Admission: worker slots, FIFO queue, leaving the queue, the bound, and ETAs from session lengths."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from inference.settings import SupervisorSettings, WorkerSettings
from inference.supervisor import WorkerSupervisor
from rtc_server.admission import Admission, QueueFull


@dataclass(eq=False)
class FakeCaller:
    id: str
    mode: str = "audio_duplex"
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
    supervisor = WorkerSupervisor(
        SupervisorSettings(gpus=gpus, capacity_per_gpu=1), WorkerSettings()
    )  # never started
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
    assert not adm.would_accept("audio_duplex")

    clock.now += 10
    adm.leave(c)  # a queued caller hangs up: d moves up
    assert d.updates[-1][0] == 1 and adm.position(d) == 1
    adm.leave(a)  # a slot frees: d is admitted on a's worker
    assert d.worker == a.worker and adm.waiting == []
    assert adm.recent_lengths[-1] == pytest.approx(40.0)

    adm.request(e)
    adm.request(c)
    # ETA now uses the measured 40 s length: b's slot (40 s old) is overdue -> half a usual call, 20 s, never
    # "1 s" (which the whole queue would get when every call runs long); d's is fresh -> 40 s
    assert e.updates[-1] == (1, 20.0)
    assert c.updates[-1] == (2, 40.0)
    clock.now += 300  # both calls far past the usual length: each slot is half a usual call away, not 1 s
    adm.notify_queue()
    assert e.updates[-1] == (1, 20.0) and c.updates[-1] == (2, 20.0)


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


def test_admission_by_measured_capacity_per_mode() -> None:
    """A worker that measured 4 audio / 2 omni sessions takes any mix that fits: 2 audio + 1 omni is full."""
    clock = Clock()
    adm = _admission([0], max_queue=4, clock=clock)
    adm.supervisor.workers[0].capacity_by_mode = {"audio_duplex": 4, "omni_duplex": 2}
    a1, a2, o1 = FakeCaller("a1"), FakeCaller("a2"), FakeCaller("o1", "omni_duplex")
    for caller in (a1, o1, a2):
        adm.request(caller)
    assert (a1.worker, o1.worker, a2.worker) == (0, 0, 0)
    assert adm.load(adm.supervisor.workers[0]) == pytest.approx(1.0)
    o2, a3 = FakeCaller("o2", "omni_duplex"), FakeCaller("a3")
    adm.request(o2)
    adm.request(a3)  # the worker is full: both wait, in order
    assert o2.worker is None and a3.worker is None and adm.position(a3) == 2
    adm.leave(a1)  # a quarter frees: not enough for the omni caller at the head, so nobody moves
    assert o2.worker is None and adm.position(o2) == 1
    adm.switch(o1, "audio_duplex")  # the omni call switches to audio: now a half is free
    assert o2.worker == 0 and adm.position(a3) == 1
    # a mode the worker did not measure falls back to the configured capacity (1 per worker here)
    assert adm.load(adm.supervisor.workers[0]) == pytest.approx(0.25 + 0.25 + 0.5)
    chat = FakeCaller("c", "chat")
    adm.leave(a3)
    adm.request(chat)
    assert chat.worker is None  # 1.0 share for chat on a full worker: queued
