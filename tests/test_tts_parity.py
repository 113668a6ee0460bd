"""MiniCPMTTS against the official implementation's recorded outputs (tiny checkpoint, CPU float32).

The official draws use torch.multinomial and are not reproduced: the recorded codes are teacher-forced and the
distributions our sampler would have drawn from are compared with the recorded ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from MiniCPMO45.modules.tts import TURN_SAMPLING, MiniCPMTTS

PROB_ATOL = 1e-5


@pytest.fixture(scope="module")
def tts(tiny_model_dir: Path) -> MiniCPMTTS:
    return MiniCPMTTS.from_checkpoint(tiny_model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def manifest(tiny_fixture_dir: Path) -> dict:
    return json.loads((tiny_fixture_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def f_tts(tiny_fixture_dir: Path) -> dict[str, np.ndarray]:
    return dict(np.load(tiny_fixture_dir / "expected" / "f_tts.npz"))


def test_sampling_params_match_manifest(manifest: dict) -> None:
    recorded = manifest["tts_sampling_params"]
    assert TURN_SAMPLING.temperature == recorded["temperature"]
    assert TURN_SAMPLING.top_p == recorded["top_p"]
    assert TURN_SAMPLING.top_k == recorded["top_k"]
    assert TURN_SAMPLING.repetition_penalty == recorded["repetition_penalty"]
    assert TURN_SAMPLING.window == recorded["win_size"]


def test_f_tts_teacher_forced_distributions(tts: MiniCPMTTS, f_tts: dict[str, np.ndarray]) -> None:
    """Non-streaming `generate` (min 50, max 2048, top-p/top-k from the second draw) at every one of 2048 steps."""
    condition = torch.from_numpy(f_tts["tts_inputs_embeds"])
    chosen = f_tts["mn_chosen"].tolist()
    cache = tts.new_cache(num_slots=1, capacity=4096)
    session = tts.new_session(cache, seed=0)

    result = tts.generate(
        session, condition, min_new=50, max_new=2048, sampling=TURN_SAMPLING, forced=chosen, record_probs=True
    )

    assert result.probs is not None
    assert result.probs.shape == (len(chosen), tts.config.num_audio_tokens)
    np.testing.assert_allclose(result.probs[0].numpy(), f_tts["mn_probs_step0"], atol=PROB_ATOL, rtol=0)
    p_chosen = result.probs[torch.arange(len(chosen)), torch.tensor(chosen)]
    np.testing.assert_allclose(p_chosen.numpy(), f_tts["mn_p_chosen"], atol=PROB_ATOL, rtol=0)
    # the last draw is not returned: 2048 draws -> the 2047 codes the official generate returned
    np.testing.assert_array_equal(result.codes.numpy(), f_tts["tts_new_ids"])
    assert not result.hit_eos
    # EOS is forbidden for the first 50 draws
    assert float(result.probs[:50, tts.eos_id].max()) == 0.0
    session.close()


def test_f_tts_condition_tail_uses_config_ids(tts: MiniCPMTTS, f_tts: dict[str, np.ndarray]) -> None:
    """The recorded condition ends with emb_text(text_eos), emb_text(audio_bos) for the ids in config.json."""
    condition = torch.from_numpy(f_tts["tts_inputs_embeds"])
    table = tts.emb_text.weight.detach()
    np.testing.assert_array_equal(condition[-1].numpy(), table[tts.config.audio_bos_token_id].numpy())
    np.testing.assert_array_equal(condition[-2].numpy(), table[tts.config.text_eos_token_id].numpy())
