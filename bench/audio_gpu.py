"""Real-size streaming audio encoder for a tick of N duplex sessions at different points of their calls: random
bf16 Whisper-medium + projector built on the device, each session's stream at its own length (0..1450 frames),
one steady 1-s chunk each (104 mel frames, 2 redundancy frames each side).

    python3 bench/audio_gpu.py --config CONFIG.json [--sessions 1,8,32,64] [--iters 10]

Times, per tick: `forward_stream` once per session (what the grouped path did when every session had its own
cache length: one batch-1 encoder pass per session, caches grown by torch.cat), `BatchedAudioEncoder` eager
(one pass, keys up to the longest stream) and static (one pass over the whole 1500-position table, a CUDA
graph on a GPU). Prints a table with the max |diff| of each batched output against the per-session one, and
the slot cache's memory; --out writes it as JSON too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.realsize import build_random_model, encoder_only_config, time_ms  # noqa: E402
from MiniCPMO45.engine.batched_audio import BatchedAudioEncoder  # noqa: E402
from MiniCPMO45.model import MiniCPMO  # noqa: E402
from MiniCPMO45.modules.whisper import WhisperStreamCache  # noqa: E402
from MiniCPMO45.modules.whisper_slots import WhisperSlotCache  # noqa: E402


def random_streams(model: MiniCPMO, n: int, gen: torch.Generator) -> list[WhisperStreamCache]:
    """Session i's stream holds 50 * (i*7 % 29) frames (spread over 0..1400) of random keys/values."""
    enc = model.apm
    assert enc is not None
    attn = enc.layers[0].self_attn
    out = []
    for i in range(n):
        length = 50 * (i * 7 % 29)
        shape = (1, attn.heads, length, attn.head_dim)
        layers = [
            tuple(
                torch.randn(shape, generator=gen, device=model.device, dtype=torch.float32).to(model.dtype)
                for _ in range(2)
            )
            for _ in enc.layers
        ]
        out.append(WhisperStreamCache(layers=layers if length else []))  # type: ignore[arg-type]
    return out


@torch.no_grad()
def bench_tick(model: MiniCPMO, n: int, iters: int, gen: torch.Generator) -> dict:
    streams = random_streams(model, n, gen)
    saved = [list(s.layers) for s in streams]
    n_mels = model.config.audio.num_mel_bins
    mels = [torch.randn(n_mels, 104, generator=gen, device=model.device).cpu() for _ in range(n)]

    def per_session() -> list[torch.Tensor]:
        outs = []
        for s, layers, mel in zip(streams, saved, mels, strict=True):
            s.layers = list(layers)  # every iteration continues the same streams
            outs.append(model.audio_embeds_stream(mel[None], s, 2, 2))
        return outs

    want = per_session()
    row: dict = {"sessions": n, "per_session_ms": statistics.median(time_ms(per_session, iters))}
    for name, static, graphs in (("eager", False, False), ("static", True, torch.cuda.is_available())):
        enc = BatchedAudioEncoder(model, n, use_graphs=graphs, static=static)
        for slot, layers in enumerate(saved):
            enc.bind(slot, streams[slot], WhisperStreamCache(layers=list(layers)))
        lengths = list(enc.cache.lengths)
        enc.warm_up(n)

        def batched(enc: BatchedAudioEncoder = enc, lengths: list[int] = lengths) -> list[torch.Tensor]:
            enc.cache.lengths[:] = lengths
            return enc.encode(list(range(n)), mels, [2] * n, [2] * n)

        got = batched()
        row[f"{name}_ms"] = statistics.median(time_ms(batched, iters))
        row[f"{name}_max_abs_diff"] = max(
            float((a.float() - b.float()).abs().max()) for a, b in zip(got, want, strict=True)
        )
    row["ref_abs_max"] = max(float(w.float().abs().max()) for w in want)
    return row


def bench(model: MiniCPMO, sessions: list[int], iters: int) -> list[dict]:
    gen = torch.Generator(device=model.device).manual_seed(0)
    rows = []
    for n in sessions:
        rows.append(bench_tick(model, n, iters, gen))
        print(rows[-1], flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--sessions", default="1,8,32,64")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=None, help="optional JSON output path")
    ap.add_argument("--device", default="cuda", help="cpu only for a smoke run on a tiny config")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench/audio_gpu.py needs a CUDA device (or --device cpu with a tiny config)")
    sessions = [int(x) for x in args.sessions.split(",")]
    model = build_random_model(encoder_only_config(args.config, "audio"), args.device, torch.bfloat16)
    if args.device.startswith("cuda"):
        torch.backends.cuda.enable_cudnn_sdp(False)  # as the engine does
    acfg = model.config.audio
    per_slot = WhisperSlotCache.bytes_per_slot(acfg, model.dtype)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"{device_name}  torch {torch.__version__}")
    print(
        f"Whisper {acfg.encoder_layers} layers x {acfg.d_model}, {acfg.encoder_attention_heads} heads; "
        f"slot cache {per_slot / 2**20:.1f} MiB per session"
    )
    report = {
        "device": device_name,
        "slot_cache_bytes_per_session": per_slot,
        "rows": bench(model, sessions, args.iters),
    }
    print("\none tick, one 1-s chunk per session, bf16; median ms")
    cols = ("per_session_ms", "eager_ms", "static_ms")
    print(
        f"{'sessions':>8} " + " ".join(f"{c:>15}" for c in cols) + f" {'max|diff| e/s':>16} {'|ref|max':>9}"
    )
    for r in report["rows"]:
        print(
            f"{r['sessions']:>8} "
            + " ".join(f"{r[c]:>15.2f}" for c in cols)
            + f" {r['eager_max_abs_diff']:>7.3g}/{r['static_max_abs_diff']:<8.3g} {r['ref_abs_max']:>9.3g}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
