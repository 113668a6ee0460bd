"""Helpers for token2wav tests: an `assets/token2wav`-style folder assembled from the tiny fixture."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from MiniCPMO45.token2wav import Token2Wav


def build_asset_folder(fixture: Path, dest: Path, layout: str = "new") -> Path:
    """Copy the fixture's YAML and weight files into the names the real checkpoint uses."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(fixture / "hparams" / "flow.yaml", dest / "flow.yaml")
    shutil.copy(fixture / "weights" / "flow.safetensors", dest / "flow.safetensors")
    if layout == "new":
        shutil.copy(fixture / "hparams" / "config.yaml", dest / "config.yaml")
        shutil.copy(fixture / "weights" / "hift.safetensors", dest / "hift.safetensors")
        shutil.copy(fixture / "weights" / "hift_original.safetensors", dest / "hift_original.safetensors")
    elif layout == "old":
        shutil.copy(fixture / "weights" / "hift_original.safetensors", dest / "hift.safetensors")
    else:
        raise ValueError(layout)
    return dest


def load_tiny_token2wav(fixture: Path, folder: Path, layout: str = "new", **options: object) -> Token2Wav:
    """The tiny model with the fixture's stored noise tables injected (`options`: more `from_assets` args)."""
    if not folder.exists():
        build_asset_folder(fixture, folder, layout)
    inputs = np.load(fixture / "inputs" / "inputs.npz")
    stream = np.load(fixture / "expected" / "stream.npz")
    return Token2Wav.from_assets(
        folder,
        n_timesteps=5,
        flow_noise=torch.from_numpy(inputs["rand_noise_prefix"]),
        source_noise_table=torch.from_numpy(stream["sine_noise_table_prefix"]),
        **options,  # type: ignore[arg-type]
    )
