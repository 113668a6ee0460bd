"""Where a worker's capacity comes from (inference/capacity.py), and the memory budget that clamps it.

The budget runs on the CPU here with the numbers a GPU would use: the tiny model's real cache sizes, and a
simulated amount of free device memory (`device_memory_bytes`), since this machine has no GPU."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from inference.capacity import (
    GIB,
    SHIPPED_TABLES,
    WorkerCapacity,
    limit_to_memory,
    planned_capacity,
    sessions_that_fit,
    shipped_table,
)
from inference.engine_host import EngineHost
from MiniCPMO45.engine.capacity import CapacityTable, ModeCapacity
from MiniCPMO45.modules.whisper_slots import WhisperSlotCache
from tests.worker_helpers import embedded

MODES = ["loopback", "chat", "audio_duplex", "omni_duplex"]
H100 = "NVIDIA H100 80GB HBM3"


def write_table(folder: Path, name: str, card: str, context: int, audio: int, omni: int) -> Path:
    table = CapacityTable(
        card=card,
        context=context,
        modes={"audio_duplex": ModeCapacity(sessions=audio), "omni_duplex": ModeCapacity(sessions=omni)},
    )
    path = folder / name
    path.write_text(table.model_dump_json())
    return path


def test_the_shipped_h100_table_matches_its_card_and_context() -> None:
    table = shipped_table(H100, 4096)
    assert table is not None and table.modes["audio_duplex"].sessions == 64
    assert shipped_table(H100, 8192) is None, "a table measured at 4k must not claim an 8k context"
    assert shipped_table("NVIDIA H200", 4096) is None
    for path in SHIPPED_TABLES.glob("*.json"):
        CapacityTable.model_validate(json.loads(path.read_text()))


def test_shipped_table_picks_the_shortest_context_that_covers(tmp_path: Path) -> None:
    write_table(tmp_path, "a.json", "card", 8192, 30, 20)
    write_table(tmp_path, "b.json", "card", 4096, 64, 48)
    write_table(tmp_path, "c.json", "card", 2048, 90, 70)
    found = shipped_table("card", 4000, tmp_path)
    assert found is not None and found.context == 4096


@pytest.mark.parametrize(
    ("table", "configured", "card", "context", "sessions", "by_mode", "source"),
    [
        ("explicit", 4, None, 4096, 5, {"audio_duplex": 7, "omni_duplex": 5}, "table"),
        ("", 12, H100, 4096, 12, {}, "configured"),
        # chat and omni, measured by bench/chat_capacity.py and bench/capacity.py, are the most expensive per call
        ("", None, H100, 4096, 48, {"audio_duplex": 64, "omni_duplex": 48, "chat": 48}, "shipped"),
        ("", None, H100, 8192, 1, {}, "default"),
        ("", None, None, 4096, 1, {}, "default"),
    ],
)
def test_planned_capacity_precedence(
    tmp_path: Path,
    table: str,
    configured: int | None,
    card: str | None,
    context: int,
    sessions: int,
    by_mode: dict[str, int],
    source: str,
) -> None:
    explicit = str(write_table(tmp_path, "t.json", "test", 4096, 7, 5)) if table else ""
    plan = planned_capacity(
        explicit_table=explicit, configured=configured, card=card, context=context, modes=MODES
    )
    assert (plan.sessions, plan.by_mode, plan.source) == (sessions, by_mode, source)


def test_memory_clamps_every_mode_and_says_so() -> None:
    plan = WorkerCapacity(sessions=48, by_mode={"audio_duplex": 64, "omni_duplex": 48}, source="shipped")
    assert plan.slots == 64
    per_session = 700 << 20
    assert sessions_that_fit(40 * GIB, per_session, 4 * GIB) == (36 * GIB) // per_session == 52
    limited = limit_to_memory(plan, 40 * GIB, per_session, 4 * GIB)
    assert limited.slots == 52 and limited.sessions == 48
    assert limited.by_mode == {"audio_duplex": 52, "omni_duplex": 48}
    assert limited.source == "shipped, memory-limited"
    tight = limit_to_memory(plan, 20 * GIB, per_session, 4 * GIB)
    assert tight.sessions == tight.slots == 23 and tight.by_mode == {"audio_duplex": 23, "omni_duplex": 23}
    roomy = limit_to_memory(plan, 80 * GIB, per_session, 4 * GIB)
    assert roomy.slots == 64 and roomy.source == "shipped" and roomy.per_session_mib == 700
    with pytest.raises(MemoryError, match="one session needs"):
        limit_to_memory(plan, 4 * GIB + per_session - 1, per_session, 4 * GIB)


def test_a_host_sizes_its_caches_to_the_memory_it_has() -> None:
    free = EngineHost(embedded({"max_kv_tokens": 1024}, max_sessions=8))
    assert free.capacity.source == "configured" and free.engine.cache.num_slots == 8
    per_session = free._session_bytes(free.engine.model)
    kv = free.engine.cache
    kv_bytes = sum(t.numel() * t.element_size() for t in [*kv.keys, *kv.values]) // kv.num_slots
    assert per_session > kv_bytes > 0
    # the figure is what a session's caches take: its KV slot, its slot of the static TTS cache (the only TTS
    # cache; a host once also kept a dead one of 4096 positions per session, 240 MiB each at the real size)
    # and its streaming audio encoder slot
    tts = free.duplex_batcher().tts.cache
    tts_bytes = sum(t.numel() * t.element_size() for t in [*tts.keys, *tts.values]) // tts.num_slots
    whisper = WhisperSlotCache.bytes_per_slot(free.engine.model.config.audio, free.engine.model.dtype)
    assert per_session == kv_bytes + tts_bytes + whisper
    reserve = 1 << 20
    model = {"max_kv_tokens": 1024, "gpu_reserve_gib": reserve / GIB}
    budget = reserve + 3 * per_session + per_session // 2
    host = EngineHost(embedded(model, max_sessions=8, device_memory_bytes=budget))
    assert host.capacity.sessions == 3 and host.capacity.source == "configured, memory-limited"
    assert host.engine.cache.num_slots == 3 and host.duplex_batcher().tts.cache.num_slots == 3
    with pytest.raises(MemoryError):
        EngineHost(embedded(model, max_sessions=8, device_memory_bytes=per_session))


async def test_a_preloading_worker_reports_its_budgeted_capacity_and_is_used_only_then() -> None:
    """The GPU start-up path on the CPU: the worker says hello (capacity not final: admission skips it), loads
    the model, sizes its caches to the (simulated) free memory and reports the capacity it holds."""
    from inference.supervisor import SupervisorSettings, WorkerSupervisor
    from rtc_server.admission import Admission

    probe = EngineHost(embedded({"max_kv_tokens": 1024}, max_sessions=8))
    per_session = probe._session_bytes(probe.engine.model)
    reserve = 1 << 20
    settings = embedded(
        {"max_kv_tokens": 1024, "gpu_reserve_gib": reserve / GIB},
        max_sessions=8,
        preload_engine=True,
        device_memory_bytes=reserve + 5 * per_session + per_session // 3,
    )
    seen: list[tuple[bool, int, str]] = []
    supervisor: WorkerSupervisor | None = None

    def changed() -> None:
        assert supervisor is not None
        w = supervisor.workers[0]
        seen.append((w.capacity_final, w.capacity, w.capacity_source))

    supervisor = WorkerSupervisor(
        SupervisorSettings(cpu_capacity=8, start_timeout_s=60), settings, on_workers_changed=changed
    )
    admission = Admission(supervisor, max_queue=4, default_session_s=60)
    await supervisor.start()
    try:
        (worker,) = supervisor.workers
        assert seen[0] == (False, 8, "configured")
        assert admission._free_worker("audio_duplex") is None, "a warming-up worker must not be admitted to"
        for _ in range(600):
            if worker.capacity_final:
                break
            await asyncio.sleep(0.1)
        assert worker.capacity_final and worker.capacity == 5
        assert worker.capacity_source == "configured, memory-limited"
        assert seen[-1] == (True, 5, "configured, memory-limited")
        assert admission._free_worker("audio_duplex") == 0
    finally:
        await supervisor.stop()


def test_a_warm_up_out_of_memory_retries_smaller_after_freeing_the_failed_capture(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The GPU retry path on the CPU (the device type is faked for the decision only): the first capture runs
    out of memory; the caches shrink by an eighth only once the failed capture's tensors are gone (its
    traceback kept them alive, and on the H100 the retry itself then ran out of memory), and the second
    capture's batcher serves."""
    import gc
    import weakref

    import torch

    host = EngineHost(embedded(max_sessions=8))
    real_warm, real_shrink = host._warm_batcher, host._shrink
    failed: list[weakref.ref[torch.Tensor]] = []
    alive_at_shrink: list[bool] = []

    def warm() -> object:
        if not failed:
            captured = torch.zeros(16)  # stands for the failed capture's graphs and buffers
            failed.append(weakref.ref(captured))
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        monkeypatch.setattr(host, "device", torch.device("cpu"))
        return real_warm()

    def shrink(sessions: int, why: str) -> None:
        gc.collect()
        alive_at_shrink.append(failed[0]() is not None)
        real_shrink(sessions, why)

    monkeypatch.setattr(host, "device", torch.device("cuda"))
    monkeypatch.setattr(host, "_warm_batcher", warm)
    monkeypatch.setattr(host, "_shrink", shrink)
    monkeypatch.setattr(host, "_runtime_shortfall", lambda: 0)
    batcher = host.duplex_batcher()
    assert alive_at_shrink == [False], "the failed capture was still alive when the caches were rebuilt"
    assert host.max_sessions == 7 and host.engine.cache.num_slots == 7
    assert batcher.engine is host.engine


def test_a_shrink_frees_the_first_warm_up_s_tts_steps_before_the_next_warm_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A warm-up that leaves too little memory free is dropped and the caches shrink: its static TTS steps (a
    TTS cache for every slot, and their graphs on a GPU) must be gone before the smaller warm-up starts. The
    model kept a reference to them (`MiniCPMTTS.static`), so on the H100 both warm-ups' TTS steps were alive
    at once and the worker shrank twice where once would have done."""
    import gc
    import weakref

    host = EngineHost(embedded(max_sessions=8))
    real_shrink = host._shrink
    first: list[weakref.ref[object]] = []
    alive_after_shrink: list[bool] = []
    short = [host.capacity.per_session_mib * (1 << 20) if host.capacity.per_session_mib else 1 << 30]

    def shortfall() -> int:
        if not first:
            assert host._batcher is None
        return short.pop() if short else 0

    def shrink(sessions: int, why: str) -> None:
        real_shrink(sessions, why)
        gc.collect()
        alive_after_shrink.append(first[0]() is not None)

    real_warm = host._warm_batcher

    def warm() -> object:
        batcher = real_warm()
        if not first:
            first.append(weakref.ref(batcher.tts))
        return batcher

    monkeypatch.setattr(host, "_warm_batcher", warm)
    monkeypatch.setattr(host, "_runtime_shortfall", shortfall)
    monkeypatch.setattr(host, "_shrink", shrink)
    batcher = host.duplex_batcher()
    assert alive_after_shrink == [False], "the dropped warm-up's static TTS steps outlived the shrink"
    assert host.max_sessions < 8 and batcher.tts is host.engine.model.tts.static
