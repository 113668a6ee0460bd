"""Flow (token -> mel) parity with the token2wav-tiny fixture: whole utterance and streaming."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from MiniCPMO45.loader import load_weights
from MiniCPMO45.token2wav.flow import Flow, trim_flow_cache
from MiniCPMO45.token2wav.hparams import flow_params_from_yaml

TOL = {"atol": 1e-4, "rtol": 1e-4}


@pytest.fixture(scope="module")
def flow(token2wav_fixture_dir: Path) -> Flow:
    torch.set_num_threads(1)
    params = flow_params_from_yaml(token2wav_fixture_dir / "hparams" / "flow.yaml")
    noise = np.load(token2wav_fixture_dir / "inputs" / "inputs.npz")["rand_noise_prefix"]
    model = Flow(params, torch.from_numpy(noise)).eval()
    load_weights(model, load_file(str(token2wav_fixture_dir / "weights" / "flow.safetensors")))
    return model


@pytest.fixture(scope="module")
def inputs(token2wav_fixture_dir: Path) -> dict[str, np.ndarray]:
    return dict(np.load(token2wav_fixture_dir / "inputs" / "inputs.npz"))


def _close(actual: torch.Tensor, expected: np.ndarray) -> None:
    assert tuple(actual.shape) == expected.shape
    np.testing.assert_allclose(actual.detach().numpy(), expected, **TOL)


def test_hparams_read_from_yaml(flow: Flow) -> None:
    p = flow.p
    assert (p.input_size, p.vocab_size, p.spk_embed_dim, p.inference_cfg_rate) == (32, 6561, 192, 0.7)
    assert (p.encoder.num_blocks, p.encoder.num_up_blocks, p.encoder.attention_heads) == (2, 2, 2)
    assert (p.estimator.depth, p.estimator.num_heads, p.estimator.head_dim, p.estimator.hidden_size) == (
        2,
        2,
        16,
        32,
    )


def test_whole_utterance(flow: Flow, inputs: dict[str, np.ndarray], token2wav_fixture_dir: Path) -> None:
    ns = np.load(token2wav_fixture_dir / "expected" / "nonstream.npz")
    tokens = torch.from_numpy(ns["gen_tokens"]).long()[None]
    prompt = torch.from_numpy(inputs["prompt_tokens"]).long()
    _close(flow.encode(torch.cat([prompt, tokens], dim=1)), ns["mu"])
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []
    mel = flow.inference(
        tokens,
        prompt,
        torch.from_numpy(inputs["prompt_mel"]),
        torch.from_numpy(inputs["spk_embedding"]),
        5,
        on_step=lambda i, x, v: steps.append((x.clone(), v.clone())),
    )
    assert len(steps) == 5
    for i, (x_in, v) in enumerate(steps):
        _close(x_in, ns["estimator_x_in"][i])
        _close(v, ns["estimator_out"][i])
    _close(mel, ns["mel"])


def test_streaming_flow(flow: Flow, inputs: dict[str, np.ndarray], token2wav_fixture_dir: Path) -> None:
    st = np.load(token2wav_fixture_dir / "expected" / "stream.npz")
    spk = torch.from_numpy(inputs["spk_embedding"])
    cache = flow.setup_cache(
        torch.from_numpy(st["prompt_tokens_with_lookahead"]).long(),
        torch.from_numpy(inputs["prompt_mel"]),
        spk,
        5,
    )
    _close(cache.conformer_cnn, st["setup_conformer_cnn_cache"])
    _close(cache.conformer_att, st["setup_conformer_att_cache"])
    # The official scratch buffers hold 16 step slots; only the first n_timesteps are ever written.
    _close(cache.estimator_conv, st["setup_estimator_cnn_cache"][:5])
    _close(cache.estimator_kv, st["setup_estimator_att_cache"][:5])
    assert not st["setup_estimator_att_cache"][5:].any()
    for i, att_len in enumerate((100, 150, 150)):
        tokens = torch.from_numpy(st[f"call{i}_tokens"]).long()[None]
        before = cache.clone()
        mel, cache = flow.inference_chunk(tokens, spk, cache, last_chunk=i == 2, n_steps=5)
        cache = trim_flow_cache(cache, prompt_frames=50, history_frames=100, low_layers=2)
        _close(mel, st[f"call{i}_mel"])
        assert cache.estimator_kv.shape[4] == att_len and cache.conformer_att.shape[3] == att_len
        assert cache.estimator_kv.data_ptr() != before.estimator_kv.data_ptr()


def test_rejects_bad_input(flow: Flow, inputs: dict[str, np.ndarray]) -> None:
    spk = torch.from_numpy(inputs["spk_embedding"])
    with pytest.raises(ValueError, match="frames"):
        flow.setup_cache(torch.zeros(1, 10, dtype=torch.long), torch.from_numpy(inputs["prompt_mel"]), spk, 5)
    with pytest.raises(ValueError, match="vocabulary"):
        flow.encode(torch.tensor([[7000]]))


def test_batched_chunks_match_single(
    flow: Flow, inputs: dict[str, np.ndarray], token2wav_fixture_dir: Path
) -> None:
    st = np.load(token2wav_fixture_dir / "expected" / "stream.npz")
    spk = torch.from_numpy(inputs["spk_embedding"])
    base = flow.setup_cache(
        torch.from_numpy(st["prompt_tokens_with_lookahead"]).long(),
        torch.from_numpy(inputs["prompt_mel"]),
        spk,
        5,
    )
    rng = np.random.default_rng(4)
    tokens = torch.from_numpy(rng.integers(0, 6561, (3, 28)))
    spks = torch.cat([spk, -spk, spk * 2], dim=0)
    mel, caches = flow.inference_chunk_batch(tokens, spks, [base.clone() for _ in range(3)], False, 5)
    for i in range(3):
        one_mel, one_cache = flow.inference_chunk(tokens[i : i + 1], spks[i : i + 1], base, False, 5)
        np.testing.assert_allclose(mel[i : i + 1].numpy(), one_mel.numpy(), atol=1e-5, rtol=0)
        for name in ("conformer_cnn", "conformer_att", "estimator_conv", "estimator_kv"):
            np.testing.assert_allclose(
                getattr(caches[i], name).numpy(), getattr(one_cache, name).numpy(), atol=1e-5, rtol=0
            )
    with pytest.raises(ValueError, match="equal shapes"):
        flow.inference_chunk_batch(tokens[:2], spks[:2], [base, caches[0]], False, 5)
