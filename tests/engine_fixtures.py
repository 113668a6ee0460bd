"""Helpers shared by the engine parity tests: load the tiny model once, read the expected arrays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from MiniCPMO45.engine.duplex import DuplexConfig


def load_npz(fixture_dir: Path, name: str) -> dict[str, np.ndarray]:
    path = fixture_dir / "expected" / f"{name}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"missing fixture {path}")
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def load_manifest(fixture_dir: Path) -> dict:
    return json.loads((fixture_dir / "manifest.json").read_text())


def assert_close(actual: torch.Tensor, expected: np.ndarray, tol: float = 1e-4, what: str = "") -> None:
    exp = torch.as_tensor(np.asarray(expected), dtype=torch.float32)
    act = actual.detach().float().cpu()
    assert act.shape == exp.shape, f"{what}: shape {tuple(act.shape)} != {tuple(exp.shape)}"
    diff = (act - exp).abs().max().item() if act.numel() else 0.0
    assert torch.allclose(act, exp, atol=tol, rtol=tol), f"{what}: max abs diff {diff:.3g}"


def fixture_duplex_config(manifest: dict, **overrides: object) -> DuplexConfig:
    """The duplex settings the e_duplex fixture was recorded with (greedy decisions), plus `overrides`."""
    dc = manifest["duplex_config"]
    fields: dict[str, object] = dict(
        decode_mode="greedy",
        temperature=dc["temperature"],
        top_k=dc["top_k"],
        top_p=dc["top_p"],
        text_repetition_penalty=dc["text_repetition_penalty"],
        text_repetition_window=dc["text_repetition_window_size"],
        listen_prob_scale=dc["listen_prob_scale"],
        force_listen_count=dc["force_listen_count"],
        max_new_speak_tokens_per_chunk=dc["max_new_speak_tokens_per_chunk"],
        length_penalty=1.1,
    )
    fields.update(overrides)
    return DuplexConfig(**fields)
