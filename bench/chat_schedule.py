"""How many sequential steps the chat tick runs per second of call time (CPU, embedded tiny model).

A chat tick's GPU cost is mostly chains of steps whose cost hardly grows with their rows: LLM decode steps, TTS
piece rounds (25 draws each) and vocoder calls. This counts them for N `ChatMode` sessions under the load
`bench/e2e.py --mode chat` puts on a server (a typed turn every --turn-every seconds per call, staggered;
replies of --tokens tokens with `force: speak`), running `ChatMode.on_units` as the worker does: one tick of all
the sessions per 320 ms unit, or with `--ticks-per-unit 2` one tick per tick phase (the fourteenth session's
worker). Units go as fast as the CPU runs them; the replies' pacing counts in units, so the schedule is the one
a GPU worker runs in real time. Price the counts with a GPU's per-step costs (docs/PERFORMANCE.md).

    python bench/chat_schedule.py --sessions 48 [--ticks-per-unit 1] [--seconds 40]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import inference.modes.chat as chat  # noqa: E402
import inference.speech as speech  # noqa: E402
from inference import protocol as p  # noqa: E402
from inference.modes import create_mode  # noqa: E402
from inference.modes.base import ModeUnit, SessionOptions  # noqa: E402
from MiniCPMO45.audio.rates import CHAT_UNIT_SAMPLES, MODEL_INPUT_RATE  # noqa: E402
from tests.worker_helpers import embedded  # noqa: E402

UNIT_S = CHAT_UNIT_SAMPLES / MODEL_INPUT_RATE
TURN_TEXT = "Tell me something about the weather today."  # what bench/e2e.py's chat callers type


def counting(counts: dict[str, int], name: str, fn: Callable[..., Any], when: Callable[..., bool]) -> Any:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if when(*args, **kwargs):
            counts[name] += 1
        return fn(*args, **kwargs)

    return wrapped


def counting_steps(counts: dict[str, int], fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    """`decode_steps` counting each step it yields."""

    def wrapped(*args: Any, **kwargs: Any) -> Iterator[Any]:
        for events in fn(*args, **kwargs):
            counts["decode_steps"] += 1
            yield events

    return wrapped


def run(sessions: int, ticks_per_unit: int, seconds: float, turn_every: float, tokens: int) -> dict[str, Any]:
    counts = {"decode_steps": 0, "tts_rounds": 0, "vocoder_calls": 0}
    real_steps, real_pieces = chat.decode_steps, speech.next_pieces
    chat.decode_steps = counting_steps(counts, real_steps)
    speech.next_pieces = counting(counts, "tts_rounds", real_pieces, lambda streamers: bool(streamers))
    modes = []
    try:
        settings = embedded(max_sessions=sessions, tick_phases=2)
        for i in range(sessions):
            mode = create_mode("chat", settings)
            options = {"force": "speak", "max_new_tokens": tokens, "seed": i}
            mode.open(SessionOptions(f"s{i}", extra=options, tick_phase=i % 2))
            modes.append(mode)
        vocoder = modes[0].host.vocoder
        real_push = vocoder.push_codes_batch
        vocoder.push_codes_batch = counting(counts, "vocoder_calls", real_push, lambda *a, **k: True)
        every = round(turn_every / UNIT_S)
        units = round(seconds / UNIT_S)
        silence = np.zeros(CHAT_UNIT_SAMPLES, dtype=np.float32)
        waiting: dict[int, int] = {}  # session -> unit of its turn, until its first speech
        first_speech: list[int] = []  # units from a turn to its first speech
        for u in range(units):
            for i, mode in enumerate(modes):
                offset = i * every // sessions
                if u >= offset and (u - offset) % every == 0:
                    mode.on_control({"type": "text", "text": TURN_TEXT})
                    waiting[i] = u
            groups = [list(range(sessions))]
            if ticks_per_unit == 2:
                groups = [[i for i in range(sessions) if i % 2 == phase] for phase in (0, 1)]
            for group in groups:
                outs = chat.ChatMode.on_units([(modes[i], ModeUnit(u, silence, 0.0), None) for i in group])
                for i, out in zip(group, outs, strict=True):
                    if i in waiting and any(isinstance(o, p.AudioOut) for o in out):
                        first_speech.append(u - waiting.pop(i))
        call_s = units * UNIT_S
        return {
            "sessions": sessions,
            "ticks_per_unit": ticks_per_unit,
            **{f"{k}_per_s": round(v / call_s, 2) for k, v in counts.items()},
            "replies": len(first_speech),
            "first_speech_in_turn_tick": sum(1 for d in first_speech if d == 0),
        }
    finally:
        chat.decode_steps, speech.next_pieces = real_steps, real_pieces
        if modes:
            modes[0].host.vocoder.__dict__.pop("push_codes_batch", None)
        for mode in modes:
            mode.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=48)
    ap.add_argument("--ticks-per-unit", type=int, choices=(1, 2), default=1)
    ap.add_argument("--seconds", type=float, default=40.0, help="call time")
    ap.add_argument("--turn-every", type=float, default=6.0)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    result = run(args.sessions, args.ticks_per_unit, args.seconds, args.turn_every, args.tokens)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
