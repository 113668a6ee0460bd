"""bench/chat_schedule.py on the embedded model (in its own process: the engine host is one per process, and the
bench's sessions would size it): it counts the chat tick's sequential steps, and one tick of both phases' calls
runs fewer TTS rounds than a tick per phase."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def schedule(ticks_per_unit: int) -> dict:
    args = ["--sessions", "2", "--ticks-per-unit", str(ticks_per_unit), "--seconds", "4", "--turn-every", "2"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chat_schedule.py"), *args, "--tokens", "12"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_one_tick_for_both_phases_runs_fewer_tts_rounds() -> None:
    one, two = schedule(1), schedule(2)
    for r in (one, two):
        assert r["replies"] >= 2 and r["first_speech_in_turn_tick"] == r["replies"], r
        assert r["decode_steps_per_s"] > 0 and r["vocoder_calls_per_s"] > 0, r
    assert two["tts_rounds_per_s"] > one["tts_rounds_per_s"] > 0, (one, two)
