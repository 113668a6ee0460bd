"""The chat capacity bench on the CPU with the embedded tiny model: it speaks turns, measures the turn end to
the first PCM from the tick and from the unit, prepares the units' VAD off the tick, and profiles a level."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.chat_capacity import main
from inference import engine_host


@pytest.fixture
def own_host():  # noqa: ANN201
    """The bench builds the process's engine host with its own session count; the tests after it that share this
    process's host (one per worker process) get back the one they had, or build theirs."""
    saved, engine_host._HOST = engine_host._HOST, None
    try:
        yield
    finally:
        engine_host._HOST = saved


def test_chat_capacity_bench_tiny(tmp_path: Path, own_host: None) -> None:
    out = tmp_path / "out"
    argv = ["--tiny", "--sessions", "2", "--seconds", "12", "--turn-every", "6", "--reply-tokens", "12"]
    assert main([*argv, "--profile", "2", "--out", str(out)]) == 0
    row = json.loads((out / "chat_capacity.json").read_text())["rows"][0]
    assert row["sessions"] == 2 and row["turns"] >= 2 and row["replies_started_speaking"] >= 1
    assert row["prepare_ms_p50"] is not None and row["prepare_ms_p50"] > 0
    # measured from the unit's completion, the VAD (before the tick) and any lateness are included
    assert row["unit_to_first_pcm_ms_p50"] >= row["turn_to_first_pcm_ms_p50"] > 0
    summary = (out / "profile-2.txt").read_text()
    for stage in ("tick", "prefill", "decode", "tts", "vocoder", "tick outside the stages"):
        assert f"| {stage} |" in summary, stage
