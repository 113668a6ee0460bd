"""The capacity benchmark itself, on the CPU with the tiny model: it runs every N and mode, writes the JSON,
the markdown table and a capacity table a worker can load."""

from __future__ import annotations

import json
from pathlib import Path

from bench.capacity import main
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
        ("audio_duplex", 2),
        ("omni_duplex", 1),
        ("omni_duplex", 2),
    ]
    for r in rows:
        assert "skipped" not in r, r
        assert r["units_measured"] == r["sessions"]
        assert r["speaking_p50_ms"] is not None  # session 0 speaks in unit 0
        assert 0 < r["unit_p50_ms"] <= r["unit_p99_ms"]
    table = CapacityTable.from_file(out / "capacity_table.json")
    assert set(table.modes) == {"audio_duplex", "omni_duplex"}
    md = (out / "capacity.md").read_text()
    assert "| audio_duplex | 2 |" in md and "Capacity" in md
