"""Random-weight MiniCPM-o 4.5 at the real size, built directly on the target device.

A CPU init of 9 B parameters wastes minutes of device time; here every module is constructed on the device in
the target dtype, so the weights are filled by the device itself. Compute cost is the same as with real weights.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from MiniCPMO45.config import MiniCPMOConfig
from MiniCPMO45.model import MiniCPMO

TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


@torch.no_grad()
def build_random_model(
    config: MiniCPMOConfig | str | Path,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> MiniCPMO:
    """A MiniCPMO with random weights, every parameter created on `device` in `dtype`."""
    if not isinstance(config, MiniCPMOConfig):
        config = MiniCPMOConfig.from_file(config)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MiniCPMO(config)
    finally:
        torch.set_default_dtype(previous)
    # Norm gains start at 1 and biases at 0 from the constructors; linear weights are kaiming-uniform and
    # embeddings unit normal. Shrink the embeddings so activations stay in a realistic range.
    for name, param in model.named_parameters():
        if "emb" in name and param.dim() == 2:
            param.mul_(0.02)
        elif name.endswith(("resampler.proj", "in_proj_weight")):
            # made with torch.empty (the checkpoint always overwrites them): uninitialised memory, maybe NaN
            param.normal_(0.0, param.shape[-1] ** -0.5)
    model.llm.model.rotary.reset_buffers(torch.device(device))
    return model.eval()


def make_model_dir(config_path: str | Path, tokenizer_dir: str | Path, dest: str | Path) -> Path:
    """A model folder (config + tokenizer files, no weights) for code that reads configs from a folder."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    data = json.loads(Path(config_path).read_text())
    data.pop("_provenance", None)
    (dest / "config.json").write_text(json.dumps(data, indent=1))
    for name in TOKENIZER_FILES + ("preprocessor_config.json", "generation_config.json"):
        src = Path(tokenizer_dir) / name
        if src.is_file():
            shutil.copy2(src, dest / name)
    return dest


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def timed(fn, *args, **kwargs):  # noqa: ANN001, ANN201 (tiny helper for benchmarks)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, (time.perf_counter() - t0) * 1000


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], iters: int, warmup: int = 2) -> list[float]:
    """Wall time of `fn` per call (synchronized), after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def encoder_only_config(path: str | Path, keep: str) -> MiniCPMOConfig:
    """The real config with the LLM cut to one layer and a small vocabulary (the projector / resampler keep
    the LLM width), no TTS, and only one encoder (`keep`: "audio" or "vision"): it builds in seconds."""
    if keep not in ("audio", "vision"):
        raise ValueError(f"keep must be 'audio' or 'vision', got {keep!r}")
    data = json.loads(Path(path).read_text())
    data.update(num_hidden_layers=1, vocab_size=1024, init_tts=False)
    data["init_vision" if keep == "audio" else "init_audio"] = False
    return MiniCPMOConfig.from_dict(data)


def build_realsize(dest: Path, gpu: int) -> None:
    """(GPU host) A real-size random-weight checkpoint in the official layout, with real-size random token2wav
    assets including the ONNX front end (the default voice needs it); kept when already there."""
    assets = dest / "assets" / "token2wav"
    if (dest / "model.safetensors.index.json").is_file() and (assets / "campplus.onnx").is_file():
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    from bench.engine_gpu import REAL_PREPROCESSOR, save_checkpoint
    from MiniCPMO45.token2wav.random_assets import write_random_assets

    fixtures = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
    make_model_dir(fixtures / "minicpmo45-fullsize-config.json", fixtures / "minicpmo45-tiny" / "model", dest)
    pre_path = dest / "preprocessor_config.json"
    pre = json.loads(pre_path.read_text()) if pre_path.is_file() else {}
    pre_path.write_text(json.dumps(pre | REAL_PREPROCESSOR))
    model = build_random_model(dest / "config.json", device="cuda")
    print(f"real-size checkpoint written in {save_checkpoint(model, dest):.0f} s", flush=True)
    del model
    write_random_assets(assets, size="real", with_onnx=True)
