"""Real-size, batch-1 check of our engine on a GPU (issues 3 and 4): random weights, bf16.

Measures: build time, VRAM after load, one chat turn (time to first token, decode rate), and N full-duplex
units (audio-only and omni) of one session through the server's tick (`DuplexSession.tick`, the batcher's
static steps) with the per-unit split: vision, audio encoder, LLM prefill, decision/decode, TTS (25 codes),
vocoder (token2wav, 5 flow steps, causal HiFT); plus decision-to-first-PCM. (Many sessions: `capacity.py`.)

    python bench/engine_gpu.py --config CONFIG.json --tokenizer DIR --out OUT [--units 20]

The tokenizer folder holds the official tokenizer files. Writes OUT/engine_gpu.json and prints a table.
Optionally (--save-load) writes the random model as sharded safetensors and times `MiniCPMO.from_pretrained`.
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
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.realsize import build_random_model, make_model_dir, param_count  # noqa: E402
from MiniCPMO45.config import PreprocessorConfig  # noqa: E402
from MiniCPMO45.engine.batcher import DuplexBatcher  # noqa: E402
from MiniCPMO45.engine.chat import assistant_prefix, continue_with, prefill_messages, reply  # noqa: E402
from MiniCPMO45.engine.core import Engine  # noqa: E402
from MiniCPMO45.engine.duplex import DuplexConfig, UnitInput  # noqa: E402
from MiniCPMO45.engine.duplex_session import DuplexSession  # noqa: E402
from MiniCPMO45.engine.sampling import ChatSampling  # noqa: E402
from MiniCPMO45.token2wav import Token2Wav  # noqa: E402
from MiniCPMO45.token2wav.random_assets import write_random_assets  # noqa: E402
from MiniCPMO45.tokenizer import MiniCPMOTokenizer  # noqa: E402

REAL_PREPROCESSOR = {"max_slice_nums": 9, "scale_resolution": 448, "image_feature_size": 64}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def now_ms() -> float:
    sync()
    return time.perf_counter() * 1000


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values), q))


def gib(n: int) -> float:
    return n / 2**30


def chat_turn(engine: Engine, new_tokens: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(16000 * 3)).astype(np.float32)
    msgs = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [audio, "Please describe what you hear in detail."]},
    ]
    s = engine.open_session(seed=0)
    t0 = now_ms()
    prefill_messages(engine, [s], [msgs], add_generation_prompt=False, use_tts_template=True)
    logits = continue_with(engine, [s], [assistant_prefix(engine, use_tts_template=True)])
    t1 = now_ms()
    steps = 0
    first_token_ms = None
    params = ChatSampling(do_sample=False)
    for _events in reply(engine, [s], logits, params, new_tokens):
        steps += 1
        if first_token_ms is None:
            first_token_ms = now_ms() - t0
    t2 = now_ms()
    prompt_len = engine.kv_length(s)
    engine.close_session(s)
    return {
        "prompt_positions": prompt_len,
        "prefill_ms": t1 - t0,
        "time_to_first_token_ms": first_token_ms or float("nan"),
        "decode_tokens": steps,
        "decode_ms_per_token": (t2 - t1) / max(steps, 1),
        "tokens_per_s": 1000 * steps / max(t2 - t1, 1e-9),
    }


def duplex_batcher(engine: Engine, vocoder: Token2Wav) -> DuplexBatcher:
    """The server's tick over `engine`, with a random voice."""
    rng = np.random.default_rng(1)
    voice = vocoder.prepare_prompt(
        rng.integers(0, 6561, size=150),
        rng.standard_normal((1, 300, 80)).astype(np.float32) * 0.5,
        rng.standard_normal((1, 192)).astype(np.float32),
    )
    return DuplexBatcher(engine, vocoder, voice)


def duplex_units(batcher: DuplexBatcher, units: int, omni: bool, warmup: int = 2) -> dict[str, object]:
    """Batch-1 units through the server's tick (`DuplexSession.tick` on a `DuplexBatcher`: static steps as CUDA
    graphs, TTS, vocoder), with the tick's stage split."""
    rng = np.random.default_rng(1)
    cfg = DuplexConfig(decode_mode="sampling", force_listen_count=0, seed=0)
    call = DuplexSession(batcher, unit_budget=40 + (2 * 66 if omni else 0), seed=0)
    ref = (0.1 * rng.standard_normal(16000 * 2)).astype(np.float32)
    t0 = now_ms()
    call.prepare("Streaming Omni Conversation. You are a helpful assistant.", ref, cfg)
    prepare_ms = now_ms() - t0
    frame = Image.fromarray(rng.integers(0, 255, size=(448, 448, 3), dtype=np.uint8)) if omni else None
    rows: list[dict[str, float]] = []
    for u in range(units + warmup):
        audio = (0.1 * rng.standard_normal(16000 if u else 16560)).astype(np.float32)
        unit = UnitInput(audio=audio, frames=[frame] if frame is not None else [])
        t_start = now_ms()
        [done] = DuplexSession.tick([call], [unit])
        t_end = now_ms()
        if u < warmup:
            continue
        out, res, stages = done.output, done.output.result, done.tick_ms
        speech = out.speech
        first_pcm_ms = float("nan")
        if speech is not None and speech.first_pcm_s is not None and out.decision_s is not None:
            first_pcm_ms = (speech.first_pcm_s - out.decision_s) * 1000
        tm = res.timings_ms
        rows.append(
            {
                "speak": float(not res.is_listen),
                "tokens": float(len(res.decoded_ids)),
                "codes": float(len(speech.codes) if speech is not None else 0),
                "vision_ms": tm.get("vision_ms", 0.0),
                "audio_ms": tm.get("audio_ms", 0.0),
                "llm_prefill_ms": tm.get("prefill_feed_ms", 0.0),
                "prefill_ms": stages["prefill_ms"],
                "decode_ms": stages["generate_ms"],
                "tts_ms": stages["tts_ms"] if speech is not None else 0.0,
                "vocoder_ms": stages["vocoder_ms"] if speech is not None else 0.0,
                "unit_ms": t_end - t_start,
                "decision_to_first_pcm_ms": first_pcm_ms,
                "kv_length": float(res.kv_length),
            }
        )
    call.close()
    summary: dict[str, object] = {"prepare_ms": prepare_ms, "units": len(rows)}
    for key in rows[0]:
        vals = [r[key] for r in rows if not np.isnan(r[key])]
        summary[key] = {
            "p50": pct(vals, 50),
            "p95": pct(vals, 95),
            "mean": statistics.fmean(vals) if vals else 0,
        }
    summary["rows"] = rows
    return summary


def save_checkpoint(model: torch.nn.Module, model_dir: Path) -> float:
    """Write the weights in the official layout (sharded safetensors + index); returns the seconds taken."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    # The TTS head is stored the official way: weight-normed, as gain g (rows' norms) and direction v.
    for name in [k for k in state if k.startswith("tts.head_code.") and k.endswith(".weight")]:
        w = state.pop(name)
        base = name[: -len(".weight")]
        state[f"{base}.parametrizations.weight.original0"] = w.float().norm(dim=1, keepdim=True).to(w.dtype)
        state[f"{base}.parametrizations.weight.original1"] = w
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        if size > 5 * 2**30:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.numel() * v.element_size()
    t0 = time.perf_counter()
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.cpu() for k, v in shard.items()}, str(model_dir / name))
        weight_map.update({k: name for k in shard})
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    save_s = time.perf_counter() - t0
    del state, shards
    torch.cuda.empty_cache()
    return save_s


def save_and_load(model: torch.nn.Module, model_dir: Path, device: str) -> dict[str, float]:
    from MiniCPMO45.model import MiniCPMO

    save_s = save_checkpoint(model, model_dir)
    t0 = time.perf_counter()
    loaded = MiniCPMO.from_pretrained(model_dir, dtype=torch.bfloat16, device=device)
    sync()
    load_s = time.perf_counter() - t0
    del loaded
    torch.cuda.empty_cache()
    return {"save_s": save_s, "load_s": load_s}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--units", type=int, default=20)
    ap.add_argument("--chat-tokens", type=int, default=128)
    ap.add_argument("--save-load", action="store_true")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = args.device
    results: dict[str, object] = {}
    if torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name(0)
        results["torch"] = torch.__version__

    model_dir = make_model_dir(args.config, args.tokenizer, Path("/tmp/realsize-model"))
    pre = (
        json.loads((model_dir / "preprocessor_config.json").read_text())
        if (model_dir / "preprocessor_config.json").is_file()
        else {}
    )
    pre.update(REAL_PREPROCESSOR)
    (model_dir / "preprocessor_config.json").write_text(json.dumps(pre))

    t0 = time.perf_counter()
    model = build_random_model(model_dir / "config.json", device=device)
    sync()
    results["build_random_s"] = time.perf_counter() - t0
    results["params_b"] = param_count(model) / 1e9
    results["vram_after_model_gib"] = gib(torch.cuda.memory_allocated()) if torch.cuda.is_available() else 0
    engine = Engine(
        model,
        MiniCPMOTokenizer.from_dir(model_dir),
        max_sessions=2,
        max_len=4096,
        preprocessor=PreprocessorConfig.from_file(model_dir),
    )
    results["vram_after_engine_gib"] = gib(torch.cuda.memory_allocated()) if torch.cuda.is_available() else 0

    assets = write_random_assets(Path("/tmp/t2w-real"), size="real", with_onnx=False)
    t0 = time.perf_counter()
    vocoder = Token2Wav.from_assets(assets, n_timesteps=5, device=device)
    results["vocoder_load_s"] = time.perf_counter() - t0
    results["vram_after_vocoder_gib"] = gib(torch.cuda.memory_allocated()) if torch.cuda.is_available() else 0

    chat_turn(engine, 8)  # warm-up
    results["chat"] = chat_turn(engine, args.chat_tokens)
    print("chat", json.dumps(results["chat"]), flush=True)
    batcher = duplex_batcher(engine, vocoder)
    for name, omni in (("audio_duplex", False), ("omni_duplex", True)):
        summary = duplex_units(batcher, args.units, omni)
        results[name] = summary
        print(name, json.dumps({k: v for k, v in summary.items() if k != "rows"}), flush=True)
    if torch.cuda.is_available():
        results["vram_peak_gib"] = gib(torch.cuda.max_memory_allocated())
    if args.save_load:
        del vocoder, batcher
        results["save_load"] = save_and_load(model, model_dir, device)
    (out / "engine_gpu.json").write_text(json.dumps(results, indent=1))

    print(
        f"\n{results.get('gpu', device)}  params {results['params_b']:.3f} B  build {results['build_random_s']:.1f} s"
    )
    print(
        f"VRAM: model {results['vram_after_model_gib']:.2f} GiB, +engine {results['vram_after_engine_gib']:.2f}, "
        f"+vocoder {results['vram_after_vocoder_gib']:.2f}, peak {results.get('vram_peak_gib', 0):.2f}"
    )
    c = results["chat"]
    print(
        f"chat: prompt {c['prompt_positions']} pos, TTFT {c['time_to_first_token_ms']:.1f} ms, "
        f"{c['decode_ms_per_token']:.1f} ms/token ({c['tokens_per_s']:.1f} tok/s)"
    )
    keys = [
        "unit_ms",
        "prefill_ms",
        "vision_ms",
        "audio_ms",
        "llm_prefill_ms",
        "decode_ms",
        "tts_ms",
        "vocoder_ms",
        "decision_to_first_pcm_ms",
        "tokens",
        "codes",
    ]
    print("| mode | " + " | ".join(keys) + " |")
    for name in ("audio_duplex", "omni_duplex"):
        s = results[name]
        cells = [f"{s[k]['p50']:.1f}/{s[k]['p95']:.1f}" for k in keys]  # type: ignore[index]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if "save_load" in results:
        print("save/load", results["save_load"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
