"""b_forward parity: vision, audio, merged embeddings, hidden states and logits of the official forward."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from MiniCPMO45.model import MiniCPMO
from tests.engine_fixtures import assert_close, load_npz


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> MiniCPMO:
    return MiniCPMO.from_pretrained(tiny_model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def proc(tiny_fixture_dir: Path) -> dict[str, np.ndarray]:
    return load_npz(tiny_fixture_dir, "a_processor")


@pytest.fixture(scope="module")
def expected(tiny_fixture_dir: Path) -> dict[str, np.ndarray]:
    return load_npz(tiny_fixture_dir, "b_forward")


def _vision(model: MiniCPMO, proc: dict[str, np.ndarray]) -> torch.Tensor:
    n = len(proc["tgt_sizes"])
    slices = [torch.from_numpy(proc[f"pixel_values_{i}"]) for i in range(n)]
    return model.vision_embeds(slices, torch.from_numpy(proc["tgt_sizes"]))


def _audio(model: MiniCPMO, proc: dict[str, np.ndarray]) -> list[torch.Tensor]:
    return model.audio_embeds(
        torch.from_numpy(proc["audio_features"]),
        torch.from_numpy(proc["audio_feature_lens"]),
        chunk_seconds=1.0,
    )


@torch.no_grad()
def test_weights_are_float32_and_shared(model: MiniCPMO) -> None:
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.vpm is not None and len(model.vpm.encoder.layers) == model.config.vision_layers_kept


@torch.no_grad()
def test_vision_embeds(model: MiniCPMO, proc, expected) -> None:
    assert_close(_vision(model, proc), expected["vision_embeds"], what="vision_embeds")


@torch.no_grad()
def test_audio_embeds(model: MiniCPMO, proc, expected) -> None:
    assert_close(torch.cat(_audio(model, proc)), expected["audio_embeds"], what="audio_embeds")


@torch.no_grad()
def test_forward_hidden_and_logits(model: MiniCPMO, proc, expected) -> None:
    emb = model.merge_embeddings(
        torch.from_numpy(proc["input_ids"][0]).long(),
        _vision(model, proc),
        proc["image_bound"],
        _audio(model, proc),
        proc["audio_bounds"],
    )
    assert_close(emb, expected["inputs_embeds"], what="inputs_embeds")
    hidden = model.llm(emb[None])[0]
    assert_close(hidden, expected["last_hidden"], what="last_hidden")
    logits = model.llm.logits(hidden)
    assert_close(logits[-1], expected["last_logits"], what="last_logits")
    top = logits.topk(5, dim=-1)
    assert top.indices.tolist() == expected["top5_ids"].tolist()
    assert_close(top.values, expected["top5_logits"], what="top5_logits")


@torch.no_grad()
def test_cached_prefill_matches_uncached(model: MiniCPMO, proc) -> None:
    """Feeding the prompt in pieces through a KV slot gives the same hidden states as one pass."""
    ids = torch.from_numpy(proc["input_ids"][0]).long()
    emb = model.embed_ids(ids)
    full = model.llm(emb[None])[0]
    cache = model.llm.new_cache(num_slots=2, max_len=128)
    slot = cache.allocate()
    parts = [model.llm(emb[None, a:b], cache, torch.tensor([slot])) for a, b in [(0, 25), (25, 26), (26, 60)]]
    assert cache.length(slot) == 60
    assert_close(torch.cat(parts, dim=1)[0], full.numpy(), what="cached vs full")


@torch.no_grad()
def test_ragged_batch_matches_single_sessions(model: MiniCPMO, proc) -> None:
    """Two sessions with different cache lengths and different new-token counts share one forward."""
    ids = torch.from_numpy(proc["input_ids"][0]).long()
    emb = model.embed_ids(ids)
    cache = model.llm.new_cache(num_slots=3, max_len=128)
    a, b = cache.allocate(), cache.allocate()
    model.llm(emb[None, :30], cache, torch.tensor([a]))
    model.llm(emb[None, :7], cache, torch.tensor([b]))
    # Row a adds 5 tokens, row b adds 2 (padded to 5).
    batch = torch.stack([emb[30:35], torch.cat([emb[7:9], torch.zeros(3, emb.shape[1])])])
    out = model.llm(batch, cache, torch.tensor([a, b]), num_new=torch.tensor([5, 2]))
    assert (cache.length(a), cache.length(b)) == (35, 9)
    ref_a = model.llm(emb[None, :35])[0, 30:35]
    ref_b = model.llm(emb[None, :9])[0, 7:9]
    assert_close(out[0], ref_a.numpy(), what="row a")
    assert_close(out[1, :2], ref_b.numpy(), what="row b")


@torch.no_grad()
def test_streaming_audio_cache_resets_before_the_position_table_ends(model: MiniCPMO) -> None:
    from MiniCPMO45.modules.whisper import WhisperStreamCache

    cache = WhisperStreamCache()
    mel = torch.randn(1, 80, 100, generator=torch.Generator().manual_seed(0))
    first = model.audio_embeds_stream(mel, cache)
    assert first.shape == (10, model.config.llm.hidden_size) and cache.length == 50
    for _ in range(28):
        model.audio_embeds_stream(mel, cache)
    assert cache.length == 1450 and cache.resets == 0
    again = model.audio_embeds_stream(mel, cache)  # 1450 + 50 reaches 1500: start over
    assert cache.resets == 1 and cache.length == 50
    assert_close(again, first.numpy(), what="after reset")
    # Redundancy frames around a chunk are trimmed after conv2: 2 mel frames each side -> 1 frame each side.
    padded = torch.randn(1, 80, 104, generator=torch.Generator().manual_seed(1))
    cache.clear()
    out = model.audio_embeds_stream(padded, cache, prefix_extra_frames=2, suffix_extra_frames=2)
    assert out.shape[0] == 10 and cache.length == 50


def test_checkpoint_with_unknown_tensors_is_rejected(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from MiniCPMO45.loader import CheckpointError

    for f in tiny_model_dir.iterdir():
        if f.suffix == ".json":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    save_file({"mystery.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="mystery.weight"):
        MiniCPMO.from_pretrained(tmp_path, dtype=torch.float32)


@torch.no_grad()
def test_bfloat16_load_runs(tiny_model_dir: Path) -> None:
    m = MiniCPMO.from_pretrained(tiny_model_dir)  # the default dtype, as on a GPU
    assert m.dtype == torch.bfloat16 and m.tts is not None
    h = m.llm(m.embed_ids([151644, 872, 198])[None])
    assert h.dtype == torch.bfloat16 and torch.isfinite(h.float()).all()
