"""Host cost of the duplex tick's streaming log-mel: N sessions each taking one 1-s unit, per-session `push`
against one `push_many` call (CPU only).

    python3 bench/mel_host.py [--sessions 64] [--warm-units 25] [--ticks 20] [--threads N] [--out FILE.json]

Two identical sets of `StreamingMel` sessions are fed the same random audio: `warm-units` units each to reach a
steady state (a buffer of about that many seconds; the 30 s slide happens during the timed ticks when
warm-units + ticks > 29), then `ticks` timed ticks, alternating which path runs first. Every tick checks that
both paths returned bit-identical units. Prints min / median / max ms per tick for each path, wall-clock and
process CPU time (all threads; steadier than wall-clock on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from MiniCPMO45.audio.mel_stream import MelUnit, StreamingMel, push_many  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def same_units(a: list[MelUnit | None], b: list[MelUnit | None]) -> bool:
    for x, y in zip(a, b, strict=True):
        if (x is None) != (y is None):
            return False
        if x is not None and y is not None:
            if (x.prefix_frames, x.suffix_frames, x.index, x.samples_consumed) != (
                y.prefix_frames,
                y.suffix_frames,
                y.index,
                y.samples_consumed,
            ) or not np.array_equal(x.features, y.features):
                return False
    return True


def summary(ms: list[float]) -> dict[str, float]:
    return {"min": min(ms), "median": statistics.median(ms), "max": max(ms)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--warm-units", type=int, default=25)
    parser.add_argument("--ticks", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    rng = np.random.default_rng(args.seed)
    single = [StreamingMel() for _ in range(args.sessions)]
    batched = [StreamingMel() for _ in range(args.sessions)]

    def unit_audio() -> list[np.ndarray]:
        return [(0.1 * rng.standard_normal(16000)).astype(np.float32) for _ in range(args.sessions)]

    for _ in range(args.warm_units):
        chunks = unit_audio()
        for mel, chunk in zip(single, chunks, strict=True):
            mel.push(chunk)
        push_many(batched, chunks)

    per_session: list[float] = []
    batch: list[float] = []
    per_session_cpu: list[float] = []
    batch_cpu: list[float] = []
    for tick in range(args.ticks):
        chunks = unit_audio()
        runs = ["single", "batch"] if tick % 2 == 0 else ["batch", "single"]
        for run in runs:
            t0, c0 = time.perf_counter(), time.process_time()
            if run == "single":
                a = [mel.push(chunk) for mel, chunk in zip(single, chunks, strict=True)]
                per_session.append((time.perf_counter() - t0) * 1000)
                per_session_cpu.append((time.process_time() - c0) * 1000)
            else:
                b = push_many(batched, chunks)
                batch.append((time.perf_counter() - t0) * 1000)
                batch_cpu.append((time.process_time() - c0) * 1000)
        if not same_units(a, b):
            raise SystemExit(f"tick {tick}: push_many differs from per-session push")

    result = {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "sessions": args.sessions,
        "warm_units": args.warm_units,
        "ticks": args.ticks,
        "buffer_seconds_at_end": round(batched[0].mel.buffered_samples / 16000, 2),
        "per_session_push_ms": summary(per_session),
        "push_many_ms": summary(batch),
        "per_session_push_cpu_ms": summary(per_session_cpu),
        "push_many_cpu_ms": summary(batch_cpu),
    }
    print(f"{result['cpu']}, {result['cpu_count']} cores, torch threads {result['torch_threads']}")
    print(
        f"{args.sessions} sessions, {args.ticks} ticks after {args.warm_units} warm units (outputs identical)"
    )
    for name in ("per_session_push_ms", "push_many_ms", "per_session_push_cpu_ms", "push_many_cpu_ms"):
        s = result[name]
        print(f"  {name:24s} min {s['min']:7.1f}  median {s['median']:7.1f}  max {s['max']:7.1f}")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
