"""The LLM static steps' attention at the real size on a GPU: FlexAttention's kernel options swept.

    python3 bench/attention_gpu.py [--rows 32] [--active 24] [--window 4096] [--out FILE.json]

Qwen3-8B's attention shapes (32 query heads, 8 kv heads, head dim 128, bf16) over a slot cache of `window`
positions, `active` of `rows` rows taking tokens (the others idle, as in a tick phase's row window), for two
cache fills (rows' lengths drawn from a short and a long range). Two steps, as the duplex tick runs them:

- decode: one new token per row (`static_decode`'s decoding-kernel path), SPLIT_KV and the tile config swept;
- prefill: ~96 new tokens per row, query heads folded into the query rows (the main kernel), with and without
  the block mask's full blocks, static or dynamic compile, tile configs swept.

Each variant's output is checked against float32 attention over the same keys (max abs difference over the
active rows' real tokens) and timed with CUDA events (median of repeats). Prints a table; --out writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from functools import partial
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from MiniCPMO45.engine import flex_decode  # noqa: E402
from MiniCPMO45.engine.flex_decode import step_block_mask  # noqa: E402

HQ, HKV, HD = 32, 8, 128
FILLS = {"short": (300, 1200), "long": (2500, 3900)}


def timed(fn, iters: int = 20, repeats: int = 5) -> float:  # noqa: ANN001 (bench helper)
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / iters)
    return statistics.median(times)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, t: int
) -> torch.Tensor:
    """float32 causal attention with a KV offset per row: [b, HQ, t, HD]."""
    b = q.shape[0]
    pos = lengths[:, None] + torch.arange(t, device=q.device)[None, :]  # [b, t]
    keys = torch.arange(k.shape[2], device=q.device)
    allowed = keys[None, None, :] <= pos[:, :, None]  # [b, t, window]
    kf = k.float().repeat_interleave(HQ // HKV, dim=1)
    vf = v.float().repeat_interleave(HQ // HKV, dim=1)
    scores = (q.float() @ kf.transpose(-1, -2)) / HD**0.5
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return (scores.softmax(-1) @ vf).view(b, HQ, t, HD)


def case(rows: int, active: int, window: int, t: int, fill: tuple[int, int], seed: int = 0) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    lengths = torch.randint(fill[0], fill[1], (rows,), device="cuda", generator=g)
    num_new = torch.zeros(rows, dtype=torch.long, device="cuda")
    num_new[:active] = t
    lengths[active:] = 0
    # the cache holds one spare position past the window, as the slot cache does; the step reads a slice
    cache_k = torch.randn(rows, HKV, window + 1, HD, device="cuda", dtype=torch.bfloat16, generator=g)
    cache_v = torch.randn(rows, HKV, window + 1, HD, device="cuda", dtype=torch.bfloat16, generator=g)
    q = torch.randn(rows, HQ, t, HD, device="cuda", dtype=torch.bfloat16, generator=g)
    return {
        "lengths": lengths,
        "num_new": num_new,
        "k": cache_k[:, :, :window],
        "v": cache_v[:, :, :window],
        "q": q,
    }


def run_decode(c: dict, window: int, active: int, variants: list[dict]) -> list[dict]:
    ref = reference(c["q"][:active], c["k"][:active], c["v"][:active], c["lengths"][:active], 1)
    mask = step_block_mask(c["lengths"], c["num_new"], 1, window)
    out = []
    for opts in variants:
        fn = torch.compile(flex_attention, dynamic=False)
        kw = {"kernel_options": dict(opts)} if opts else {}
        call = partial(fn, c["q"], c["k"], c["v"], block_mask=mask, enable_gqa=True, **kw)

        try:
            got = call()
            err = (got[:active].float() - ref).abs().max().item()
            us = timed(call)
        except Exception as exc:  # noqa: BLE001 (a config Triton refuses is a row of the table)
            out.append({"options": opts, "error": f"{type(exc).__name__}: {str(exc)[:160]}"})
            continue
        out.append({"options": opts, "us": round(us, 1), "max_err": err})
    return out


def run_prefill(
    c: dict, window: int, active: int, t: int, variants: list[tuple[str, bool, bool, dict]]
) -> list[dict]:
    group = HQ // HKV
    ref = reference(c["q"][:active], c["k"][:active], c["v"][:active], c["lengths"][:active], t)
    qf = c["q"].reshape(c["q"].shape[0], HKV, group * t, HD)
    out = []
    for name, full, dynamic, opts in variants:
        mask = step_block_mask(c["lengths"], c["num_new"], t, window, group, full_blocks=full)
        fn = torch.compile(flex_attention, dynamic=dynamic)
        kernel_options = {"FORCE_USE_FLEX_ATTENTION": True, **opts}
        call = partial(fn, qf, c["k"], c["v"], block_mask=mask, kernel_options=kernel_options)

        try:
            got = call().reshape(c["q"].shape[0], HQ, t, HD)
            err = (got[:active].float() - ref).abs().max().item()
            us = timed(call, iters=10)
        except Exception as exc:  # noqa: BLE001
            out.append({"variant": name, "error": f"{type(exc).__name__}: {str(exc)[:160]}"})
            continue
        out.append(
            {
                "variant": name,
                "full_blocks": full,
                "dynamic": dynamic,
                "options": opts,
                "us": round(us, 1),
                "max_err": err,
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--active", type=int, default=24)
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=96, help="new tokens per row in the prefill step")
    ap.add_argument("--quick", action="store_true", help="fewer variants")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    flex_decode._allow_a_compile_per_bucket()
    torch.backends.cuda.matmul.allow_tf32 = True
    decode_variants: list[dict] = [{}]
    for split in (2, 4, 8, 16):
        for block_n, warps, stages in ((64, 2, 3), (64, 4, 3), (128, 4, 2), (128, 8, 2)):
            decode_variants.append(
                {"SPLIT_KV": split, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}
            )
    prefill_variants: list[tuple[str, bool, bool, dict]] = [
        ("current: dynamic, no full blocks", False, True, {}),
        ("static", False, False, {}),
        ("static + full blocks", True, False, {}),
    ]
    for bm, bn, warps, stages in (
        (128, 64, 8, 3),
        (128, 128, 8, 2),
        (64, 64, 4, 3),
        (128, 64, 4, 3),
        (64, 128, 4, 3),
    ):
        prefill_variants.append(
            (
                f"static + full, {bm}x{bn} w{warps} s{stages}",
                True,
                False,
                {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages},
            )
        )
    if args.quick:
        decode_variants = decode_variants[:1] + decode_variants[5:9]
        prefill_variants = prefill_variants[:4]
    results: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "rows": args.rows,
        "active": args.active,
        "window": args.window,
        "tokens": args.tokens,
        "fills": {},
    }
    for fill_name, fill in FILLS.items():
        entry: dict = {}
        c1 = case(args.rows, args.active, args.window, 1, fill)
        entry["decode"] = run_decode(c1, args.window, args.active, decode_variants)
        ct = case(args.rows, args.active, args.window, args.tokens, fill, seed=1)
        entry["prefill"] = run_prefill(ct, args.window, args.active, args.tokens, prefill_variants)
        results["fills"][fill_name] = entry
        print(f"== {fill_name} fill {fill}: decode (one token per row)")
        for r in entry["decode"]:
            print(
                f"  {r.get('us', '-'):>8} us  err {r.get('max_err', r.get('error'))}  {r['options'] or 'default'}"
            )
        print(f"== {fill_name} fill {fill}: prefill ({args.tokens} tokens per row, heads folded)")
        for r in entry["prefill"]:
            print(f"  {r.get('us', '-'):>8} us  err {r.get('max_err', r.get('error'))}  {r['variant']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
