"""Helpers shared by the engine parity tests: load the tiny model once, read the expected arrays."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from MiniCPMO45.audio.load import load_audio
from MiniCPMO45.audio.rates import MODEL_INPUT_RATE
from MiniCPMO45.engine.duplex import DuplexConfig, UnitInput


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


@dataclass
class DuplexFixture:
    """The recorded e_duplex session: its system prompt and reference audio, its omni units (1 s of audio and one
    frame each) and, per unit, the recorded step (`force_listen_override`, `is_listen`, `text`, ...)."""

    manifest: dict
    prompt: str
    ref_audio: np.ndarray
    units: list[UnitInput]
    steps: list[dict]


def duplex_fixture(fixture_dir: Path) -> DuplexFixture:
    manifest = load_manifest(fixture_dir)
    inputs = fixture_dir / "inputs"
    audio = load_audio(inputs / "duplex_audio.wav")
    steps = manifest["duplex_steps"]
    units = [
        UnitInput(
            audio=audio[k * MODEL_INPUT_RATE : (k + 1) * MODEL_INPUT_RATE],
            frames=[Image.open(inputs / f"frame_{k}.png").convert("RGB")],
        )
        for k in range(len(steps))
    ]
    prompt = manifest["duplex_prepare_prompt"].split("\n")[1]
    return DuplexFixture(manifest, prompt, load_audio(inputs / "ref_audio.wav"), units, steps)
