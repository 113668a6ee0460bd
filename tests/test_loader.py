"""Checkpoint loader: official names, sharded layout, and errors that name the bad tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from MiniCPMO45.loader import CheckpointError, checkpoint_files, load_weights, read_checkpoint


def test_reads_tiny_checkpoint_with_official_names(tiny_model_dir: Path) -> None:
    tensors = read_checkpoint(tiny_model_dir, prefixes=["llm.model.norm", "apm.conv1"], dtype=torch.float32)
    assert set(tensors) == {"llm.model.norm.weight", "apm.conv1.weight", "apm.conv1.bias"}
    assert all(t.dtype == torch.float32 for t in tensors.values())
    index = json.loads((tiny_model_dir / "weights_index.json").read_text())["tensors"]
    assert list(tensors["apm.conv1.weight"].shape) == index["apm.conv1.weight"]["shape"]
    assert set(checkpoint_files(tiny_model_dir)) == set(index)


def test_sharded_layout(tmp_path: Path) -> None:
    save_file({"a.weight": torch.ones(2, 3)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b.weight": torch.zeros(4)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {
        "weight_map": {
            "a.weight": "model-00001-of-00002.safetensors",
            "b.weight": "model-00002-of-00002.safetensors",
        }
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    tensors = read_checkpoint(tmp_path, dtype=torch.bfloat16)
    assert tensors["a.weight"].dtype == torch.bfloat16 and tensors["b.weight"].shape == (4,)


def test_missing_shard_is_named(tmp_path: Path) -> None:
    index = {"weight_map": {"a.weight": "gone.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        checkpoint_files(tmp_path)


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        read_checkpoint(tmp_path)


def test_missing_and_unexpected_tensors_are_named() -> None:
    module = torch.nn.Linear(3, 2)
    tensors = {"x.weight": torch.zeros(2, 3), "x.extra": torch.zeros(1)}
    with pytest.raises(CheckpointError) as info:
        load_weights(module, tensors, prefix="x.")
    assert "x.bias" in str(info.value) and "x.extra" in str(info.value)


def test_shape_mismatch_and_success() -> None:
    module = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match="shape"):
        load_weights(module, {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)})
    load_weights(module, {"weight": torch.full((2, 3), 2.0), "bias": torch.ones(2)})
    assert torch.equal(module.weight, torch.full((2, 3), 2.0))
