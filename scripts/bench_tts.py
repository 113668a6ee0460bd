"""Time batched duplex TTS units (26 draws, 25 codes each) at the real TTS size with random weights.

    python scripts/bench_tts.py --device cuda --dtype bfloat16 --batch 1 8 32 80

The sizes come from a config.json (default: the full-size config beside the parity fixtures). Each session
runs `--units` consecutive units of one turn, so later units attend over a growing cache.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from MiniCPMO45.config import MiniCPMOConfig  # noqa: E402
from MiniCPMO45.modules.tts import MiniCPMTTS  # noqa: E402


def default_config() -> Path:
    root = Path(os.environ.get("MINICPMO45_FIXTURES", REPO_ROOT / "tests" / "fixtures"))
    return root / "minicpmo45-fullsize-config.json"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=default_config())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--units", type=int, default=4)
    parser.add_argument("--condition-len", type=int, default=10)
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    config = MiniCPMOConfig.from_file(args.config).tts
    torch.manual_seed(0)
    tts = MiniCPMTTS(config).to(device=args.device, dtype=dtype).eval()
    capacity = args.units * (args.condition_len + 25) + 8
    for batch in args.batch:
        cache = tts.new_cache(num_slots=batch, capacity=capacity)
        sessions = [tts.new_session(cache, seed=i) for i in range(batch)]
        conditions = [
            torch.randn(args.condition_len, config.hidden_size, device=args.device, dtype=dtype) * 0.1
            for _ in range(batch)
        ]
        times = []
        for _ in range(args.units):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            tts.generate_chunks(sessions, conditions, min_new=26, max_new=26)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        per_unit = ", ".join(f"{t * 1000:.0f}" for t in times)
        print(f"batch {batch:3d}: ms per batched unit [{per_unit}]  ({args.device}, {args.dtype})")
        for s in sessions:
            s.close()


if __name__ == "__main__":
    main()
