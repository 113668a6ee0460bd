"""The `assets/token2wav/` folder: which checkpoint layout it is, and reading its weight files.

Two layouts exist (spec/token2wav.md §2, "version caveat"):

* ``new`` (minicpmo-utils >= 1.0.7): flow.yaml + flow.pt, config.yaml + hift.pt (CosyVoice3 causal HiFT,
  used for streaming) and hift_original.pt (original HiFT for whole utterances, keys prefixed
  "generator.").
* ``old`` (earlier Step-Audio2 / vLLM-Omni ports): flow.yaml + flow.pt and hift.pt holding the original
  HiFT; no config.yaml, no hift_original.pt.

Every weight file may also be a `.safetensors` file with the same stem (the fixtures use those).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file

from ..loader import CheckpointError

WEIGHT_SUFFIXES = (".safetensors", ".pt")
TOKENIZER_ONNX = "speech_tokenizer_v2_25hz.onnx"
SPEAKER_ONNX = "campplus.onnx"


class AssetLayoutError(CheckpointError):
    """The token2wav folder matches neither known layout; the message lists what is there and missing."""


@dataclass(frozen=True)
class AssetLayout:
    kind: Literal["new", "old"]
    folder: Path
    flow_yaml: Path
    flow_weights: Path
    hift_weights: Path  # causal HiFT in the new layout, original HiFT in the old one
    config_yaml: Path | None = None
    hift_original_weights: Path | None = None
    tokenizer_onnx: Path | None = None
    speaker_onnx: Path | None = None


def find_weights(folder: Path, stem: str) -> Path | None:
    """`stem.safetensors` if present, else `stem.pt`, else None."""
    for suffix in WEIGHT_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def detect_layout(folder: str | Path) -> AssetLayout:
    folder = Path(folder)
    if not folder.is_dir():
        raise AssetLayoutError(f"token2wav asset folder {folder} does not exist")
    flow_yaml = folder / "flow.yaml"
    flow_weights = find_weights(folder, "flow")
    hift = find_weights(folder, "hift")
    hift_original = find_weights(folder, "hift_original")
    config_yaml = folder / "config.yaml"
    has_config = config_yaml.is_file()
    present = sorted(p.name for p in folder.iterdir())

    missing = []
    if not flow_yaml.is_file():
        missing.append("flow.yaml")
    if flow_weights is None:
        missing.append("flow.pt (or flow.safetensors)")
    if hift is None:
        missing.append("hift.pt (or hift.safetensors)")
    if missing:
        raise AssetLayoutError(
            f"{folder} is not a token2wav folder: missing {', '.join(missing)}; it holds {present}"
        )
    assert flow_weights is not None and hift is not None

    onnx = {
        "tokenizer_onnx": folder / TOKENIZER_ONNX if (folder / TOKENIZER_ONNX).is_file() else None,
        "speaker_onnx": folder / SPEAKER_ONNX if (folder / SPEAKER_ONNX).is_file() else None,
    }
    if has_config and hift_original is not None:
        return AssetLayout("new", folder, flow_yaml, flow_weights, hift, config_yaml, hift_original, **onnx)
    if not has_config and hift_original is None:
        return AssetLayout("old", folder, flow_yaml, flow_weights, hift, **onnx)
    have, lack = ("config.yaml", "hift_original.pt") if has_config else ("hift_original.pt", "config.yaml")
    raise AssetLayoutError(
        f"{folder} mixes the two token2wav layouts: it has {have} but no {lack}. The new layout "
        "(minicpmo-utils 1.0.7) needs config.yaml + hift.pt (causal) + hift_original.pt; the old one has "
        f"neither config.yaml nor hift_original.pt. Folder holds {present}"
    )


def read_weights(path: str | Path, strip_prefix: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors` or `.pt` (torch.load with weights_only=True), on the CPU.

    `strip_prefix` is removed from every key that carries it (hift_original.pt uses "generator.").
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    elif path.suffix in (".pt", ".pth", ".bin"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors, refused globals, truncated files
            raise CheckpointError(f"cannot read {path} as a torch state dict: {exc}") from exc
    else:
        raise CheckpointError(f"unsupported weight file type {path.suffix!r} ({path})")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors")
    if strip_prefix:
        state = {k.removeprefix(strip_prefix): v for k, v in state.items()}
    return state
