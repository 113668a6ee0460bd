"""Time the duplex unit loop of the engine: N sessions stepped together, per-phase milliseconds.

    python scripts/bench_engine.py --model-dir /path/to/MiniCPM-o-4_5 --device cuda --sessions 8 --units 10

Without --model-dir it uses the tiny parity model (decompressed into .cache/ by the tests). Audio is noise and
the frame a gradient, so the decisions are arbitrary; only the timings matter. Force-listen is off so every
unit decodes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from MiniCPMO45.engine.core import Engine  # noqa: E402
from MiniCPMO45.engine.duplex import DuplexConfig, UnitInput, finalize_units, prepare, step_units  # noqa: E402
from MiniCPMO45.engine.session import Mode  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=REPO / ".cache" / "fixtures" / "minicpmo45-tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--sessions", type=int, default=2)
    ap.add_argument("--units", type=int, default=6)
    ap.add_argument("--audio-only", action="store_true")
    args = ap.parse_args()

    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(
        args.model_dir, dtype=dtype, device=args.device, max_sessions=args.sessions
    )
    print(f"load {time.perf_counter() - t0:.1f}s on {args.device} ({args.dtype})")
    rng = np.random.default_rng(0)
    frame = Image.fromarray(np.tile((np.arange(640) % 256).astype(np.uint8)[None, :, None], (480, 1, 3)))
    sessions = [engine.open_session(Mode.DUPLEX) for _ in range(args.sessions)]
    for s in sessions:
        prepare(engine, s, "Streaming Omni Conversation.", None, DuplexConfig(force_listen_count=0, seed=0))
    step_ms, fin_ms = [], []
    for _ in range(args.units):
        inputs = [
            UnitInput(
                audio=(0.05 * rng.standard_normal(16000)).astype(np.float32),
                frames=[] if args.audio_only else [frame],
            )
            for _ in sessions
        ]
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        sync()
        t = time.perf_counter()
        results = step_units(engine, sessions, inputs)
        sync()
        step_ms.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        finalize_units(engine, sessions)
        sync()
        fin_ms.append((time.perf_counter() - t) * 1000)
        r = results[0]
        print(
            f"unit: step {step_ms[-1]:7.1f} ms  finalize {fin_ms[-1]:6.1f} ms  "
            f"listen={r.is_listen} tokens={len(r.decoded_ids)} kv={r.kv_length}  "
            + " ".join(f"{k}={v:.1f}" for k, v in r.timings_ms.items())
        )
    print(
        f"{args.sessions} sessions: step median {statistics.median(step_ms):.1f} ms, "
        f"finalize median {statistics.median(fin_ms):.1f} ms"
    )


if __name__ == "__main__":
    main()
