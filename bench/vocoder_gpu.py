"""Vocoder (token2wav) ticks at real size, random weights: `push_codes_batch` with CUDA graphs off and on.

    python3 bench/vocoder_gpu.py [--batches 1 8 32] [--rounds 5] [--warmup 2] [--graph-gib 48]

Each round starts B duplex turns of two units, like the duplex batcher: tick "open" pushes 25 codes to every
turn (3 silence + 25 = one 28-token window), tick "end" pushes 25 more with end of turn (one window + the
final flush). Every tick is timed with CUDA syncs around it. The graph-on run must give the graph-off audio:
the table shows the max abs difference over all measured turns (the vocoder integrates F0 into a phase, so
float rounding in the mel grows along the stream; ~1e-4 is rounding, ~1e-1 would be a bug).
Rounds before `--warmup` are not timed (with graphs on, a shape is captured the second time it is seen).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from MiniCPMO45.token2wav import PushRequest, Token2Wav  # noqa: E402
from MiniCPMO45.token2wav.random_assets import write_random_assets  # noqa: E402

VOCAB = 6561


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def codes(round_: int, unit: int, row: int) -> list[int]:
    rng = np.random.default_rng([round_, unit, row])
    return rng.integers(0, VOCAB, 25).tolist()


def run_mode(
    folder: Path,
    device: torch.device,
    graphs: bool,
    batches: list[int],
    rounds: int,
    warmup: int,
    graph_gib: float,
) -> tuple[dict[int, dict[str, float]], dict[int, list[np.ndarray]], dict[str, object]]:
    model = Token2Wav.from_assets(folder, n_timesteps=5, device=device, use_graphs=graphs or None)
    if model.flow_graphs is not None:
        model.flow_graphs.max_bytes = int(graph_gib * 2**30)
    rng = np.random.default_rng(0)
    voice = model.prepare_prompt(
        rng.integers(0, VOCAB, size=150),
        rng.standard_normal((1, 300, 80)).astype(np.float32) * 0.5,
        rng.standard_normal((1, 192)).astype(np.float32),
    )
    times: dict[int, dict[str, float]] = {}
    audio: dict[int, list[np.ndarray]] = {}
    for batch in batches:
        opens, ends, pieces = [], [], []
        for r in range(rounds):
            turns = [model.start_turn(voice, rule="duplex") for _ in range(batch)]
            sync(device)
            t0 = time.perf_counter()
            out_open = model.push_codes_batch([PushRequest(t, codes(r, 0, b)) for b, t in enumerate(turns)])
            sync(device)
            t1 = time.perf_counter()
            out_end = model.push_codes_batch(
                [PushRequest(t, codes(r, 1, b), end_of_turn=True) for b, t in enumerate(turns)]
            )
            sync(device)
            t2 = time.perf_counter()
            if r >= warmup:
                opens.append((t1 - t0) * 1000)
                ends.append((t2 - t1) * 1000)
                pieces += [np.concatenate(a + b) for a, b in zip(out_open, out_end, strict=True)]
        times[batch] = {"open_ms": statistics.median(opens), "end_ms": statistics.median(ends)}
        audio[batch] = pieces
        print(f"  graphs={'on' if graphs else 'off'} B={batch}: {json.dumps(times[batch])}", flush=True)
    info: dict[str, object] = {}
    if model.flow_graphs is not None:
        info = {
            "captured_shapes": len(model.flow_graphs.chunks),
            "seen_shapes": len(model.flow_graphs.seen),
            "graph_gib_estimate": round(model.flow_graphs.bytes_used / 2**30, 2),
        }
    if device.type == "cuda":
        info["max_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    del model, voice
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return times, audio, info


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="real", choices=["real", "tiny"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--graph-gib", type=float, default=48.0, help="memory budget of captured flow shapes")
    parser.add_argument("--folder", type=Path, default=Path("/tmp") / "t2w-bench-assets")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.rounds <= args.warmup:
        parser.error("--rounds must exceed --warmup")
    device = torch.device(args.device)
    if device.type == "cuda":
        # As the engine: cuDNN stays on for convolutions; cuDNN SDPA off (per-shape planning cost).
        torch.backends.cuda.enable_cudnn_sdp(False)
    folder = args.folder.with_name(f"{args.folder.name}-{args.size}")
    if not (folder / "flow.yaml").is_file():
        write_random_assets(folder, size=args.size, with_onnx=False)

    results: dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    }
    off, audio_off, info_off = run_mode(
        folder, device, False, args.batches, args.rounds, args.warmup, args.graph_gib
    )
    on, audio_on, info_on = run_mode(
        folder, device, True, args.batches, args.rounds, args.warmup, args.graph_gib
    )
    diffs = {}
    for batch in args.batches:
        a, b = audio_off[batch], audio_on[batch]
        if [x.shape for x in a] != [x.shape for x in b]:
            raise SystemExit(f"B={batch}: graph-on audio has other lengths than graph-off audio")
        diffs[batch] = max(float(np.abs(x - y).max(initial=0.0)) for x, y in zip(a, b, strict=True))
    print(f"\ndevice: {results['device']}   graphs off: {info_off}   graphs on: {info_on}")
    print(f"{'B':>4} | {'open off':>9} {'open on':>9} | {'end off':>9} {'end on':>9} | {'max |diff|':>10}")
    for batch in args.batches:
        print(
            f"{batch:>4} | {off[batch]['open_ms']:>9.1f} {on[batch]['open_ms']:>9.1f} | "
            f"{off[batch]['end_ms']:>9.1f} {on[batch]['end_ms']:>9.1f} | {diffs[batch]:>10.2e}"
        )
    results.update({"off": off, "on": on, "max_abs_diff": diffs, "info_off": info_off, "info_on": info_on})
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
