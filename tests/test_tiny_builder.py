"""The tiny random-weight model builder: official names and shapes, determinism, loadability."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from MiniCPMO45.config import MiniCPMOConfig, PreprocessorConfig
from MiniCPMO45.loader import read_checkpoint
from MiniCPMO45.processor import MiniCPMOProcessor
from MiniCPMO45.tiny_builder import MARKER, build_tiny_model, ensure_tiny_model, official_tensor_shapes
from MiniCPMO45.tokenizer import MiniCPMOTokenizer


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def test_shapes_match_the_fixture_checkpoint(tiny_fixture_dir: Path) -> None:
    config = MiniCPMOConfig.from_file(tiny_fixture_dir / "model")
    index = json.loads((tiny_fixture_dir / "model" / "weights_index.json").read_text())
    expected = {name: tuple(t["shape"]) for name, t in index["tensors"].items()}
    assert official_tensor_shapes(config) == expected


def test_shapes_of_the_full_size_config(fixtures_dir: Path) -> None:
    """Parameter counts at the real size, as measured on the official model (spec official-baseline.md)."""
    shapes = official_tensor_shapes(
        MiniCPMOConfig.from_file(fixtures_dir / "minicpmo45-fullsize-config.json")
    )

    def billions(prefix: str) -> float:
        return round(sum(math.prod(s) for n, s in shapes.items() if n.startswith(prefix)) / 1e9, 3)

    assert billions("") == 9.357
    assert [
        billions(p) for p in ("llm.", "vpm.", "resampler.", "apm.", "audio_projection_layer.", "tts.")
    ] == [
        8.189,
        0.403,
        0.089,
        0.307,
        0.021,
        0.348,
    ]


def test_sub_modules_can_be_switched_off(tiny_fixture_dir: Path) -> None:
    raw = json.loads((tiny_fixture_dir / "model" / "config.json").read_text())
    raw.update(init_vision=False, init_tts=False)
    names = official_tensor_shapes(MiniCPMOConfig.from_dict(raw))
    assert not any(n.startswith(("vpm.", "resampler.", "tts.")) for n in names)
    assert any(n.startswith("apm.") for n in names)


def test_build_is_deterministic(built: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again", seed=0)
    files = sorted(p.name for p in built.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    for name in files:
        assert (built / name).read_bytes() == (again / name).read_bytes(), name
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (built / "model.safetensors").read_bytes()


def test_tokenizer_is_consistent_with_the_config(built: Path) -> None:
    tok = MiniCPMOTokenizer.from_dir(built)
    config = MiniCPMOConfig.from_file(built)
    sp = tok.special
    assert config.llm.vocab_size == tok.vocab_size == config.tts.num_text_tokens
    assert (config.tts.audio_bos_token_id, config.tts.text_eos_token_id) == (sp.tts_bos, sp.tts_eos)
    assert (config.llm.bos_token_id, config.llm.eos_token_id, config.llm.pad_token_id) == (
        sp.endoftext,
        sp.im_end,
        sp.endoftext,
    )
    generation = json.loads((built / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [sp.im_end, sp.endoftext]
    assert tok.bad_token_ids and all(0 <= i < tok.vocab_size for i in tok.bad_token_ids)
    text = "<|im_start|>user\n你好，今天天气很好。Hello there! 😀 ผู้น<|im_end|>\n<|tts_bos|>ok<|tts_eos|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids[0] == sp.im_start and sp.tts_bos in ids and sp.tts_eos in ids
    assert tok.decode(ids, skip_special_tokens=True) == "user\n你好，今天天气很好。Hello there! 😀 ผู้น\nok"
    assert len(tok.encode("Hello there, nice to meet you.")) < len(
        "Hello there, nice to meet you."
    )  # merges work


def test_weights_have_official_names_and_sensible_values(built: Path) -> None:
    config = MiniCPMOConfig.from_file(built)
    tensors = read_checkpoint(built)
    shapes = official_tensor_shapes(config)
    assert {n: tuple(t.shape) for n, t in tensors.items()} == shapes
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert (built / "model.safetensors").stat().st_size < 8 * 1024 * 1024
    assert torch.equal(tensors["llm.model.norm.weight"].float(), torch.ones(shapes["llm.model.norm.weight"]))
    q = tensors["llm.model.layers.0.self_attn.q_proj.weight"].float()
    assert 0.02 < q.std().item() < 0.15 and torch.isfinite(q).all()
    emb = tensors["llm.model.embed_tokens.weight"].float()
    assert 0.01 < emb.std().item() < 0.05


def test_processor_works_on_the_built_folder(built: Path) -> None:
    pre = PreprocessorConfig.from_file(built)
    assert pre.image_feature_size == MiniCPMOConfig.from_file(built).query_num
    processor = MiniCPMOProcessor.from_dir(built)
    audio = np.sin(np.arange(16000, dtype=np.float32) / 5).astype(np.float32)
    out = processor.chat_inputs([{"role": "user", "content": [Image.new("RGB", (224, 112)), audio, "hi"]}])
    assert out.image_bound.shape == (3, 2) and out.audio_bounds.tolist()
    assert [e - s for s, e in out.audio_bounds.tolist()] == [10]


def test_ensure_builds_once_and_rebuilds_on_a_stale_marker(tmp_path: Path) -> None:
    folder = ensure_tiny_model(tmp_path)
    weights = folder / "model.safetensors"
    first = weights.stat().st_mtime_ns
    assert ensure_tiny_model(tmp_path) == folder and weights.stat().st_mtime_ns == first
    (folder / MARKER).write_text("stale\n")
    rebuilt = ensure_tiny_model(tmp_path)
    assert (rebuilt / MARKER).read_text().strip() != "stale"
    assert (rebuilt / "model.safetensors").read_bytes() == weights.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no staging leftovers


def test_build_is_identical_in_another_process(built: Path, tmp_path: Path) -> None:
    """Worker processes build the cache independently; the tokenizer trainer must not depend on hash seeds."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    code = "import sys; from MiniCPMO45.tiny_builder import build_tiny_model; build_tiny_model(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "sub")], cwd=repo, check=True, timeout=120)
    for path in built.iterdir():
        assert (tmp_path / "sub" / path.name).read_bytes() == path.read_bytes(), path.name
