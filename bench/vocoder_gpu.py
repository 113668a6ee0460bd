"""Vocoder (token2wav) ticks at real size, random weights: `push_codes_batch` with CUDA graphs off and on.

    python3 bench/vocoder_gpu.py [--batches 1 8 32] [--rounds 5] [--warmup 2] [--graph-gib 48]

Each round starts B duplex turns of two units, like the duplex batcher: tick "open" pushes 25 codes to every
turn (3 silence + 25 = one 28-token window), tick "end" pushes 25 more with end of turn (one window + the
final flush). Every tick is timed with CUDA syncs around it. The graph-on run must give the graph-off audio:
the table shows the max abs difference over all measured turns (the vocoder integrates F0 into a phase, so
float rounding in the mel grows along the stream; ~1e-4 is rounding, ~1e-1 would be a bug).
Rounds before `--warmup` are not timed (with graphs on, a shape is captured the second time it is seen).

`--mixed` instead times one duplex tick of B sessions at mixed points of their turns (the worker's steady
load): session s is at unit (tick + s) mod 6 of a 6-unit turn (opening, four mid-turn units, end of turn
with 25 codes), every fourth session flushes short units (9 codes, duplex flush), and odd sessions use a
second voice with a shorter prompt. Each tick pushes the units of all B sessions through one
`push_codes_batch`; the table shows the median ms per tick and the flow batches per tick, for the plain
path (graphs off: windows grouped by equal shapes) and the padded path (graphs on: one batch per round;
CUDA graphs on a GPU, the same padded code eagerly on the CPU). On the CPU with tiny weights:

    python3 bench/vocoder_gpu.py --mixed --size tiny --device cpu --batches 1 8 16 32 64
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


def graph_info(model: Token2Wav, device: torch.device) -> dict[str, object]:
    """The flow graphs' shapes and static buffers, and the peak memory of the run."""
    info: dict[str, object] = {}
    if model.flow_graphs is not None:
        info = {
            "captured_shapes": len(model.flow_graphs.chunks),
            "seen_shapes": len(model.flow_graphs.seen),
            "static_buffer_gib": round(model.flow_graphs.bytes_used / 2**30, 2),
        }
    if device.type == "cuda":
        info["max_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return info


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


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
    info = graph_info(model, device)
    del model, voice
    release(device)
    return times, audio, info


MIXED_UNITS = 6  # units per turn in --mixed


def mixed_tick(
    model: Token2Wav, voices: list[object], turns: list[object | None], tick: int
) -> list[PushRequest]:
    """The requests of one --mixed tick (starting new turns where a session's unit index wraps)."""
    requests = []
    for s in range(len(turns)):
        unit = (tick + s) % MIXED_UNITS
        if unit == 0 or turns[s] is None:
            turns[s] = model.start_turn(voices[s % 2], rule="duplex")  # type: ignore[arg-type]
        flush = s % 4 == 3 and unit != MIXED_UNITS - 1
        n = 9 if flush else 25
        rng = np.random.default_rng([tick, s])
        requests.append(
            PushRequest(
                turns[s],  # type: ignore[arg-type]
                rng.integers(0, VOCAB, n).tolist(),
                end_of_turn=unit == MIXED_UNITS - 1,
                flush=flush,
            )
        )
    return requests


def run_mixed(
    folder: Path,
    device: torch.device,
    graphs: bool,
    batches: list[int],
    ticks: int,
    warmup: int,
    graph_gib: float,
    fuse: str = "none",
) -> tuple[dict[int, dict[str, float]], dict[str, object]]:
    model = Token2Wav.from_assets(folder, n_timesteps=5, device=device, use_graphs=graphs or None)
    if model.flow_graphs is not None:
        model.flow_graphs.max_bytes = int(graph_gib * 2**30)
    if fuse == "estimator":  # what the worker fused before the Snakes were
        model.flow.decoder.estimator.fuse_blocks()
    elif fuse == "all":  # what the worker fuses (`Token2Wav.fuse_kernels`)
        model.fuse_kernels()
    rng = np.random.default_rng(0)
    voices: list[object] = [
        model.prepare_prompt(
            rng.integers(0, VOCAB, size=n),
            rng.standard_normal((1, 2 * n, 80)).astype(np.float32) * 0.5,
            rng.standard_normal((1, 192)).astype(np.float32),
        )
        for n in (150, 100)
    ]
    times: dict[int, dict[str, float]] = {}
    for batch in batches:
        turns: list[object | None] = [None] * batch
        spent, flow_batches = [], []
        for tick in range(warmup + ticks):
            requests = mixed_tick(model, voices, turns, tick)
            before = model.flow_batches
            sync(device)
            t0 = time.perf_counter()
            model.push_codes_batch(requests)
            sync(device)
            if tick >= warmup:
                spent.append((time.perf_counter() - t0) * 1000)
                flow_batches.append(model.flow_batches - before)
        times[batch] = {"tick_ms": statistics.median(spent), "flow_batches": statistics.mean(flow_batches)}
        print(f"  graphs={'on' if graphs else 'off'} B={batch}: {json.dumps(times[batch])}", flush=True)
    info = graph_info(model, device)
    del model, voices
    release(device)
    return times, info


def main_mixed(
    args: argparse.Namespace, folder: Path, device: torch.device, results: dict[str, object]
) -> None:
    common = (args.batches, args.rounds, args.warmup, args.graph_gib)
    if args.fuse_ab:  # graphs on both times: the estimator's blocks fused, then the Snakes too
        off, info_off = run_mixed(folder, device, True, *common, fuse="estimator")
        on, info_on = run_mixed(folder, device, True, *common, fuse="all")
        labels = ("estimator fused ('off')", "estimator and Snakes fused ('on')")
    else:
        off, info_off = run_mixed(folder, device, False, *common)
        on, info_on = run_mixed(folder, device, True, *common)
        labels = ("graphs off", "graphs on")
    print(f"\ndevice: {results['device']}   {labels[0]}: {info_off}   {labels[1]}: {info_on}")
    print(f"{'B':>4} | {'tick off':>9} {'tick on':>9} | {'batches off':>11} {'batches on':>10}")
    for batch in args.batches:
        print(
            f"{batch:>4} | {off[batch]['tick_ms']:>9.1f} {on[batch]['tick_ms']:>9.1f} | "
            f"{off[batch]['flow_batches']:>11.2f} {on[batch]['flow_batches']:>10.2f}"
        )
    results.update({"mode": "mixed", "off": off, "on": on, "info_off": info_off, "info_on": info_on})
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))


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
    parser.add_argument("--mixed", action="store_true", help="sessions at mixed points of their turns")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument(
        "--fuse-ab",
        action="store_true",
        help="with --mixed: graphs on, estimator fused, without / with the Snakes",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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
    if args.mixed:
        main_mixed(args, folder, device, results)
        return
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
