"""A worker that has a measured capacity table reports it in its hello, and the server admits that many."""

from __future__ import annotations

from pathlib import Path

import pytest

from inference.settings import ModelSettings, SupervisorSettings, WorkerSettings
from inference.supervisor import WorkerSupervisor
from MiniCPMO45.engine.capacity import CapacityTable, ModeCapacity


def test_table_gives_the_most_expensive_mode(tmp_path: Path) -> None:
    table = CapacityTable(
        card="H100",
        modes={"audio_duplex": ModeCapacity(sessions=64), "omni_duplex": ModeCapacity(sessions=48)},
    )
    path = tmp_path / "capacity_table.json"
    path.write_text(table.model_dump_json())
    again = CapacityTable.from_file(path)
    assert again.worker_capacity(["audio_duplex"]) == 64
    assert again.worker_capacity(again.modes) == 48
    assert again.worker_capacity(["chat"]) is None
    with pytest.raises(FileNotFoundError):
        CapacityTable.from_file(tmp_path / "missing.json")


async def test_worker_hello_sets_capacity(tmp_path: Path) -> None:
    path = tmp_path / "capacity_table.json"
    path.write_text(
        CapacityTable(
            card="test",
            modes={"audio_duplex": ModeCapacity(sessions=7), "omni_duplex": ModeCapacity(sessions=5)},
        ).model_dump_json()
    )
    supervisor = WorkerSupervisor(
        SupervisorSettings(cpu_capacity=2, start_timeout_s=30),
        WorkerSettings(model=ModelSettings(capacity_table=str(path))),
    )
    await supervisor.start()
    try:
        (worker,) = supervisor.workers
        assert worker.up and worker.capacity == 5
        assert worker.capacity_by_mode == {"audio_duplex": 7, "omni_duplex": 5}
    finally:
        await supervisor.stop()
    plain = WorkerSupervisor(SupervisorSettings(cpu_capacity=2, start_timeout_s=30), WorkerSettings())
    await plain.start()
    try:
        assert plain.workers[0].capacity == 2
    finally:
        await plain.stop()
