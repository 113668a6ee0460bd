"""The worker's settings: built by the front from its config, sent as JSON, parsed once by the worker."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from inference.settings import SupervisorSettings, WorkerSettings
from inference.worker import planned_capacity, wants_preload
from rtc_server.app import REPO_ROOT, worker_settings
from rtc_server.config import build_config


def test_the_front_builds_the_worker_settings_from_its_config_and_they_survive_json() -> None:
    config = build_config(
        {
            "model": {"max_kv_tokens": 2048, "vocoder_turns": 3},
            "workers": {
                "gpus": [0, 1],
                "capacity_per_gpu": 12,
                "tick_gather_ms": 40.0,
                "tick_phases": 1,
                "prepare_threads": 3,
            },
            "loopback": {"delay_s": 0.5},
        }
    )
    settings = worker_settings(config)
    assert settings.model == config.model and settings.loopback == config.loopback
    assert (settings.max_sessions, settings.tick_gather_s, settings.tick_phases) == (12, 0.04, 1)
    assert settings.prepare_threads == 3 != WorkerSettings().prepare_threads
    assert settings.voices_dir == str(REPO_ROOT / config.voices.dir)
    sent = settings.model_dump_json()  # what the supervisor puts in the worker's --settings
    assert WorkerSettings.model_validate_json(sent) == settings
    # the supervisor runs on the [workers] section itself
    assert isinstance(config.workers, SupervisorSettings) and config.workers.capacity_per_gpu == 12


def test_one_default_for_max_sessions() -> None:
    """The CPU worker gets `cpu_capacity`; a GPU worker without `capacity_per_gpu` gets None and claims one
    session (no table for its card) until it has measured its memory."""
    cpu = worker_settings(build_config({}))
    assert cpu.max_sessions == 4 == build_config({}).workers.cpu_capacity
    gpu = worker_settings(build_config({"workers": {"gpus": [0]}}))
    assert gpu.max_sessions is None and WorkerSettings().max_sessions is None
    assert planned_capacity(gpu).sessions == 1 and planned_capacity(gpu).source == "default"
    assert planned_capacity(cpu).sessions == 4 and planned_capacity(cpu).source == "configured"


def test_a_worker_refuses_settings_it_does_not_know() -> None:
    with pytest.raises(ValidationError, match="model_path"):
        WorkerSettings.model_validate_json('{"model_path": "/weights"}')  # the old flat key
    with pytest.raises(ValidationError, match="tick_phases"):
        WorkerSettings.model_validate_json('{"tick_phases": 3}')
    assert wants_preload(WorkerSettings.model_validate_json('{"preload_engine": true}'), "cpu")


def test_the_worker_prepares_units_on_as_many_threads_as_configured() -> None:
    """A tick's chat units arrive together; their VAD runs on `workers.prepare_threads` threads side by side."""
    import asyncio
    import concurrent.futures
    import threading
    import time

    from inference.sessions import Sessions

    async def run() -> int:  # the worker builds its sessions inside its event loop
        mode_thread = concurrent.futures.ThreadPoolExecutor(1)
        sessions = Sessions(mode_thread, WorkerSettings(prepare_threads=3))
        seen: set[str] = set()
        lock = threading.Lock()

        def job() -> None:
            with lock:
                seen.add(threading.current_thread().name)
            time.sleep(0.05)

        try:
            futures = [sessions.preparer.submit(job) for _ in range(9)]
            for f in futures:
                f.result()
        finally:
            sessions.preparer.shutdown()
            mode_thread.shutdown()
        return len(seen)

    assert asyncio.run(run()) == 3
