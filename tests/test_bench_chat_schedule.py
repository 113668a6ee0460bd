"""bench/chat_schedule.py on the embedded model: it counts the chat tick's sequential steps, and one tick of both
phases' calls runs fewer TTS rounds than a tick per phase."""

from __future__ import annotations

from bench.chat_schedule import run


def test_one_tick_for_both_phases_runs_fewer_tts_rounds() -> None:
    one = run(sessions=2, ticks_per_unit=1, seconds=4.0, turn_every=2.0, tokens=12)
    two = run(sessions=2, ticks_per_unit=2, seconds=4.0, turn_every=2.0, tokens=12)
    for r in (one, two):
        assert r["replies"] >= 2 and r["first_speech_in_turn_tick"] == r["replies"], r
        assert r["decode_steps_per_s"] > 0 and r["vocoder_calls_per_s"] > 0, r
    assert two["tts_rounds_per_s"] > one["tts_rounds_per_s"] > 0, (one, two)
