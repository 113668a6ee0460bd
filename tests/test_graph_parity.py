"""bench/graph_parity.py on the CPU: the server's tick and vocoder (eager backend) against the golden fixtures,
float32. On a GPU the same script runs the graph backend (results in docs/PERFORMANCE.md)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.graph_parity import main


def test_graph_parity_script_on_the_cpu(tmp_path: Path) -> None:
    assert main(["--device", "cpu", "--dtypes", "float32", "--out", str(tmp_path)]) == 0
    [row] = json.loads((tmp_path / "graph_parity.json").read_text())["rows"]
    assert row["ok"] and not row["graphs"]
    duplex, vocoder = row["duplex"], row["vocoder"]
    assert duplex["total_ids_equal"] and duplex["decisions_equal"] == duplex["units"] == 6
    assert duplex["conditions_compared"] == 5 and duplex["condition_max_abs"] < 1e-4
    assert vocoder["windows"] == 3 and vocoder["audio_max_abs"] < 5e-4 and vocoder["audio_snr_db"] > 60
