"""Benchmark the streaming vocoder: first-PCM latency, per-window latency (flow / HiFT split) and RTF.

    python scripts/bench_token2wav.py --device cuda                 # real sizes, random weights
    python scripts/bench_token2wav.py --assets <model>/assets/token2wav --device cuda
    python scripts/bench_token2wav.py --size tiny --windows 4 --threads 1   # quick CPU smoke run

Prints one JSON object. Random-weight folders are written once under .cache/token2wav-random-<size>.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from MiniCPMO45.token2wav import Token2Wav  # noqa: E402
from MiniCPMO45.token2wav.random_assets import write_random_assets  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer:
    """Wraps a callable and accumulates its wall time (synchronising CUDA around it)."""

    def __init__(self, fn, device: torch.device) -> None:  # type: ignore[no-untyped-def]
        self.fn = fn
        self.device = device
        self.total = 0.0

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        _sync(self.device)
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        _sync(self.device)
        self.total += time.perf_counter() - start
        return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--assets", type=Path, help="token2wav folder (default: random weights)")
    parser.add_argument("--size", choices=["tiny", "real"], default="real")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--windows", type=int, default=12, help="25-token windows per turn")
    parser.add_argument("--rule", choices=["turn", "duplex"], default="duplex")
    parser.add_argument("--prompt-tokens", type=int, default=150)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="turns run before measuring")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    folder = args.assets
    if folder is None:
        folder = Path(__file__).resolve().parent.parent / ".cache" / f"token2wav-random-{args.size}"
        if not (folder / "flow.pt").is_file():
            write_random_assets(folder, size=args.size)
    load_start = time.perf_counter()
    model = Token2Wav.from_assets(folder, n_timesteps=args.steps, device=device)
    load_s = time.perf_counter() - load_start

    rng = np.random.default_rng(0)
    prompt_tokens = rng.integers(0, 6561, args.prompt_tokens)
    prompt_mel = rng.standard_normal((1, 2 * args.prompt_tokens, 80)).astype(np.float32) - 5
    voice = model.prepare_prompt(prompt_tokens, prompt_mel, rng.standard_normal((1, 192)).astype(np.float32))
    codes = rng.integers(0, 6561, 25 * args.windows).tolist()

    flow_timer = _Timer(model.flow.inference_chunk_batch, device)
    hift_timer = _Timer(model.streaming.stream_batch, device)
    model.flow.inference_chunk_batch = flow_timer  # type: ignore[method-assign]
    model.streaming.stream_batch = hift_timer  # type: ignore[method-assign]

    for _ in range(args.warmup):
        turn = model.start_turn(voice, rule=args.rule)
        for i in range(args.windows):
            model.push_codes(turn, codes[25 * i : 25 * (i + 1)])
        model.push_codes(turn, [], end_of_turn=True)

    flow_timer.total = hift_timer.total = 0.0
    turn = model.start_turn(voice, rule=args.rule)
    window_ms, samples, first_pcm_ms = [], 0, None
    turn_start = time.perf_counter()
    for i in range(args.windows):
        start = time.perf_counter()
        for piece in model.iter_push_codes(turn, codes[25 * i : 25 * (i + 1)], end_of_turn=False):
            if first_pcm_ms is None:
                first_pcm_ms = (time.perf_counter() - start) * 1000
            samples += piece.size
        window_ms.append((time.perf_counter() - start) * 1000)
    samples += sum(p.size for p in model.push_codes(turn, [], end_of_turn=True))
    compute_s = time.perf_counter() - turn_start

    print(
        json.dumps(
            {
                "device": str(device),
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                "assets": str(folder),
                "layout": model.layout,
                "n_timesteps": args.steps,
                "rule": args.rule,
                "load_s": round(load_s, 3),
                "first_pcm_ms": None if first_pcm_ms is None else round(first_pcm_ms, 2),
                "window_ms_p50": round(statistics.median(window_ms), 2),
                "window_ms_max": round(max(window_ms), 2),
                "flow_ms_per_window": round(flow_timer.total * 1000 / (args.windows + 1), 2),
                "hift_ms_per_window": round(hift_timer.total * 1000 / (args.windows + 1), 2),
                "audio_s": round(samples / 24000, 3),
                "rtf": round(compute_s / (samples / 24000), 4),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
