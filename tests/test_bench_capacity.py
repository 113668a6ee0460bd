"""The capacity benchmark itself, on the CPU with the tiny model: it runs every N and mode, writes the JSON,
the markdown table and a capacity table a worker can load."""

from __future__ import annotations

import json
from pathlib import Path

from bench.capacity import TickClock, main
from MiniCPMO45.engine.capacity import CapacityTable


def test_capacity_bench_tiny(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["--tiny", "--config", str(tiny_model_dir / "config.json"), "--tokenizer", str(tiny_model_dir)]
    argv += ["--out", str(out), "--sessions", "1,2", "--units", "1", "--warmup", "0"]
    assert main(argv) == 0
    results = json.loads((out / "capacity.json").read_text())
    rows = results["rows"]
    assert results["filled_empty_parameters"] == 2  # the resampler's torch.empty parameters
    assert [(r["mode"], r["sessions"]) for r in rows] == [
        ("audio_duplex", 1),
        ("omni_duplex", 1),
        ("audio_duplex", 2),
        ("omni_duplex", 2),
    ]
    assert results["phases"] == 2  # the worker's default: sessions 0 and 1 on different half-second grids
    for r in rows:
        assert "skipped" not in r, r
        assert r["phases"] == 2
        assert r["units_measured"] == r["sessions"]
        assert r["speaking_p50_ms"] is not None  # session 0 speaks in unit 0
        assert 0 < r["unit_p50_ms"] <= r["unit_p99_ms"]
    table = CapacityTable.from_file(out / "capacity_table.json")
    assert set(table.modes) == {"audio_duplex", "omni_duplex"}
    assert sorted(p.name for p in out.iterdir()) == ["capacity.json", "capacity.md", "capacity_table.json"]
    md = (out / "capacity.md").read_text()
    assert "| audio_duplex | 2 |" in md and "Capacity" in md


def test_tick_clock_phases_wait_only_for_a_late_tick() -> None:
    clock = TickClock(phases=2)
    assert [clock.arrival_ms(1, p) for p in (0, 1)] == [1000.0, 1500.0]
    # ticks within half a second: each phase starts when its units arrive
    assert [clock.run(u, p, 450.0) for u in range(3) for p in (0, 1)] == [0.0] * 6
    # a 600 ms tick delays the other phase's tick by 100 ms, and the delay carries on while ticks overrun
    clock = TickClock(phases=2)
    assert [clock.run(u, p, 600.0) for u in range(2) for p in (0, 1)] == [0.0, 100.0, 200.0, 300.0]
    # one phase: a tick waits for the one before it only past a whole unit
    clock = TickClock(phases=1)
    assert [clock.run(u, 0, t) for u, t in enumerate((900.0, 1200.0, 500.0))] == [0.0, 0.0, 200.0]


def test_capacity_bench_profiles_a_level(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`--profile N`: after level N of each mode, its ticks under the profiler, the stages and parts marked."""
    out = tmp_path / "out"
    argv = ["--tiny", "--config", str(tiny_model_dir / "config.json"), "--tokenizer", str(tiny_model_dir)]
    argv += ["--out", str(out), "--sessions", "2", "--units", "1", "--warmup", "0", "--modes", "audio_duplex"]
    assert main([*argv, "--profile", "2"]) == 0
    summary = (out / "profile-audio_duplex-2.txt").read_text()
    for stage in ("prefill", "generate", "speak", "mel", "audio encoder", "LLM step", "vocoder"):
        assert f"| {stage} |" in summary, stage
    assert "| tick | 4 |" in summary  # two units of each of the two phases
    assert (out / "profile-audio_duplex-2.json.gz").stat().st_size > 0
