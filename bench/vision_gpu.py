"""Real-size vision cost on a GPU: SigLIP (26 layers, 1152 wide) + resampler (64 queries, 4096 wide), random
bf16 weights built on the device, for 1, 16 and 64 camera frames of 448×448 (one 32×32-patch slice each).

    python3 bench/vision_gpu.py --config CONFIG.json [--frames 1,16,64] [--chunks 16,64] [--iters 10]

Times `MiniCPMO.vision_embeds` (host-to-device copy included, as the duplex batcher calls it) for each chunk
size (`vision_batch_size`), next to the previous implementation (dense float32 attention scores, padded batch,
host-built position ids: tests/vision_reference.py) on the same weights and inputs, and
the CPU preprocessing per frame (fused patch-row normalisation vs the previous broadcast form, one thread and
a 4-thread pool like the batcher's). Prints a table; --out writes it as JSON too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.realsize import build_random_model, encoder_only_config, param_count, time_ms  # noqa: E402
from MiniCPMO45.config import PreprocessorConfig  # noqa: E402
from MiniCPMO45.model import MiniCPMO  # noqa: E402
from MiniCPMO45.processor.image import ImageProcessor, slice_image, to_patch_rows  # noqa: E402
from tests.vision_reference import ref_vision_embeds  # noqa: E402

FRAME = (448, 448)


def random_frame(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    # smooth content (a blurred noise field) so resizing does realistic work
    small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)


def legacy_preprocess(proc: ImageProcessor, image: Image.Image) -> list[np.ndarray]:
    """The previous per-view pixel path: float32 HWC broadcast normalisation, then the patch layout."""
    cfg = proc.config
    views = slice_image(image.convert("RGB"), 1, cfg.scale_resolution, cfg.patch_size, cfg.slice_mode).views
    out = []
    for view in views:
        pixels = np.asarray(view, dtype=np.float32) / 255.0
        pixels = (pixels - np.asarray(cfg.norm_mean, dtype=np.float32)) / np.asarray(
            cfg.norm_std, dtype=np.float32
        )
        out.append(to_patch_rows(np.ascontiguousarray(pixels.transpose(2, 0, 1)), cfg.patch_size))
    return out


def bench_preprocess(iters: int) -> list[dict]:
    proc = ImageProcessor(PreprocessorConfig(max_slice_nums=1))
    rng = np.random.default_rng(0)
    rows = []
    for size in (FRAME, (640, 480), (1280, 720)):
        frames = [random_frame(rng, size) for _ in range(64)]
        one = frames[0]
        new1 = statistics.median(time_ms(lambda im=one: proc.preprocess(im, 1), iters * 5))
        old1 = statistics.median(time_ms(lambda im=one: legacy_preprocess(proc, im), iters * 5))
        with ThreadPoolExecutor(max_workers=4) as pool:
            new64 = statistics.median(
                time_ms(lambda fr=frames: list(pool.map(lambda im: proc.preprocess(im, 1), fr)), iters)
            )
            old64 = statistics.median(
                time_ms(lambda fr=frames: list(pool.map(lambda im: legacy_preprocess(proc, im), fr)), iters)
            )
        rows.append(
            {
                "frame": f"{size[0]}x{size[1]}",
                "new_1": new1,
                "old_1": old1,
                "new_64x4t": new64,
                "old_64x4t": old64,
            }
        )
    return rows


@torch.no_grad()
def bench_vision(model: MiniCPMO, frames: list[int], chunks: list[int], iters: int) -> list[dict]:
    proc = ImageProcessor(PreprocessorConfig(max_slice_nums=1))
    rng = np.random.default_rng(1)
    images = [random_frame(rng, FRAME) for _ in range(max(frames))]
    inputs = [proc.preprocess(im, 1) for im in images]
    slices = [torch.from_numpy(v) for x in inputs for v in x.pixel_values]
    sizes = np.concatenate([x.tgt_sizes for x in inputs])
    assert sizes.tolist() == [[32, 32]] * len(slices), sizes[:3]
    rows = []
    for n in frames:
        s, t = slices[:n], torch.from_numpy(sizes[:n])
        row: dict = {"frames": n}
        for chunk in chunks:
            model.config.vision_batch_size = chunk
            got = model.vision_embeds(s, t)
            row[f"new_b{chunk}_ms"] = statistics.median(
                time_ms(lambda s=s, t=t: model.vision_embeds(s, t), iters)
            )
        model.config.vision_batch_size = 16

        def legacy(s: list[torch.Tensor] = s) -> torch.Tensor:
            sz = [(32, 32)] * len(s)
            return torch.cat(
                [ref_vision_embeds(model, s[i : i + 16], sz[i : i + 16]) for i in range(0, len(s), 16)]
            )

        want = legacy()
        row["old_b16_ms"] = statistics.median(time_ms(legacy, max(2, iters // 2), warmup=1))
        row["max_abs_diff"] = float((got.float() - want.float()).abs().max())
        row["ref_abs_max"] = float(want.float().abs().max())
        rows.append(row)
    return rows


@torch.no_grad()
def bench_layer_compile(model: MiniCPMO, views: int, grid: tuple[int, int], iters: int) -> list[dict]:
    """The encoder's layers (what a duplex tick's vision graph runs) for `views` camera views of one patch
    grid: the eager layer function, its compile with dynamic shapes (what `fuse_layers` shipped with) and a
    static compile. GPU-bound at 4 views, so host overhead hardly counts."""
    from MiniCPMO45.modules.siglip import encoder_layer

    vpm = model.vpm
    assert vpm is not None
    patch = vpm.embeddings.patch_size
    rows, cols = grid
    gen = torch.Generator(device=model.device).manual_seed(0)
    pixels = torch.randn(views, 3, patch, rows * cols * patch, device=model.device, generator=gen).to(
        model.dtype
    )
    sizes = [grid] * views
    out = []
    want = None
    for name, fn in (
        ("eager", encoder_layer),
        ("compiled, dynamic shapes", torch.compile(encoder_layer, dynamic=True, fullgraph=True)),
        ("compiled, static shapes", torch.compile(encoder_layer, dynamic=False, fullgraph=True)),
        (
            "compiled, sizes dynamic once changed (weights static)",
            torch.compile(encoder_layer, fullgraph=True),
        ),
    ):
        vpm.layer_fn = fn
        if "once changed" in name:  # as a worker's warm-up would: other view counts and grids first
            for n, g in ((1, (4, 4)), (2, (4, 6))):
                vpm(
                    torch.zeros(n, 3, patch, g[0] * g[1] * patch, device=model.device, dtype=model.dtype),
                    [g] * n,
                )
        got = vpm(pixels, sizes)
        want = got if want is None else want
        ms = statistics.median(time_ms(lambda: vpm(pixels, sizes), iters))
        diff = float((got.float() - want.float()).abs().max())
        out.append(
            {"layers": name, "views": views, "grid": list(grid), "ms": ms, "max_abs_diff_vs_eager": diff}
        )
    vpm.layer_fn = encoder_layer
    return out


def flash_check(model: MiniCPMO) -> str:
    """Whether the unmasked vision attention can run on the flash kernel alone (the fast path's intent)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    assert model.vpm is not None
    layer = model.vpm.encoder.layers[0]
    x = torch.randn(2, 1024, layer.layer_norm1.normalized_shape[0], device=model.device, dtype=model.dtype)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.no_grad():
            layer(x, None)
        return "flash kernel OK"
    except RuntimeError as err:
        return f"flash kernel unavailable: {str(err).splitlines()[0][:120]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--frames", default="1,16,64")
    ap.add_argument("--chunks", default="16,64", help="vision_batch_size values to time")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=None, help="optional JSON output path")
    ap.add_argument("--skip-preprocess", action="store_true")
    ap.add_argument(
        "--layer-compile",
        action="store_true",
        help="only: the encoder layers eager / dynamic / static compile",
    )
    ap.add_argument("--device", default="cuda", help="cpu only for a smoke run on a tiny config")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench/vision_gpu.py needs a CUDA device (or --device cpu with a tiny config)")
    frames = [int(x) for x in args.frames.split(",")]
    chunks = [int(x) for x in args.chunks.split(",")]

    t0 = time.perf_counter()
    model = build_random_model(encoder_only_config(args.config, "vision"), args.device, torch.bfloat16)
    assert model.vpm is not None and model.resampler is not None
    with torch.no_grad():  # zero-initialised queries would make every query attend alike
        model.resampler.query.normal_(0.0, 0.02)
    n_params = param_count(model.vpm) + param_count(model.resampler)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"{device_name}  torch {torch.__version__}")
    print(
        f"vision built in {time.perf_counter() - t0:.1f}s: {len(model.vpm.encoder.layers)} SigLIP layers, "
        f"{n_params / 1e6:.0f} M params (vpm + resampler), {flash_check(model)}"
    )

    report: dict = {"device": device_name}
    if args.layer_compile:
        report["layer_compile"] = bench_layer_compile(model, 4, (28, 37), args.iters)
        print("\nencoder layers, 4 views of a 640x480 camera frame (28x37 patches), bf16; median ms")
        for r in report["layer_compile"]:
            print(f"  {r['ms']:8.2f}  {r['layers']}  (max|diff| vs eager {r['max_abs_diff_vs_eager']:.3g})")
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))
        return
    report["vision"] = bench_vision(model, frames, chunks, args.iters)
    print("\nvision_embeds, 448x448 frames (32x32 patches), bf16; median ms")
    cols = [f"new_b{c}_ms" for c in chunks] + ["old_b16_ms"]
    print(f"{'frames':>6} " + " ".join(f"{c:>12}" for c in cols) + f" {'new ms/frame':>12} {'max|diff|':>10}")
    for r in report["vision"]:
        best = min(r[c] for c in cols[:-1])
        print(
            f"{r['frames']:>6} "
            + " ".join(f"{r[c]:>12.2f}" for c in cols)
            + f" {best / r['frames']:>12.2f} {r['max_abs_diff']:>10.3g}"
        )
    print(
        "(max|diff| new vs old in bf16; ref values reach",
        f"{max(r['ref_abs_max'] for r in report['vision']):.3g})",
    )

    if not args.skip_preprocess:
        report["preprocess"] = bench_preprocess(args.iters)
        print("\nCPU preprocessing (slice + resize + normalise + patch layout), median ms")
        print(f"{'frame':>10} {'new 1':>8} {'old 1':>8} {'new 64@4thr':>12} {'old 64@4thr':>12}")
        for r in report["preprocess"]:
            print(
                f"{r['frame']:>10} {r['new_1']:>8.2f} {r['old_1']:>8.2f} {r['new_64x4t']:>12.1f} {r['old_64x4t']:>12.1f}"
            )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
