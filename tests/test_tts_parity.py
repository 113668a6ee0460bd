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
from tests.reference_tts import generate

PROB_ATOL = 1e-5
# The tiny model's code distributions are nearly uniform (most probabilities ~1e-4), where 1e-5 absolute cannot
# see a missing repetition penalty or a cache not carried across units. Our float32 path matches the recorded
# probabilities to ~1e-6 relative, so a relative bound is checked as well.
PROB_RTOL = 1e-4


def assert_probs_close(actual: torch.Tensor, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual.numpy(), expected, atol=PROB_ATOL, rtol=0)
    np.testing.assert_allclose(actual.numpy(), expected, atol=1e-9, rtol=PROB_RTOL)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """The TTS loop runs thousands of tiny ops; extra intra-op threads only add waiting on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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

    result = generate(
        tts,
        session,
        condition,
        min_new=50,
        max_new=2048,
        sampling=TURN_SAMPLING,
        forced=chosen,
        record_probs=True,
    )

    assert result.probs is not None
    assert result.probs.shape == (len(chosen), tts.config.num_audio_tokens)
    assert_probs_close(result.probs[0], f_tts["mn_probs_step0"])
    p_chosen = result.probs[torch.arange(len(chosen)), torch.tensor(chosen)]
    assert_probs_close(p_chosen, f_tts["mn_p_chosen"])
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


# ---- e_duplex ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def e_duplex(tiny_fixture_dir: Path) -> dict[str, np.ndarray]:
    return dict(np.load(tiny_fixture_dir / "expected" / "e_duplex.npz"))


def speaking_units(manifest: dict, e_duplex: dict[str, np.ndarray]) -> list[dict]:
    """One record per speaking unit k: its duplex step, condition, returned codes, every draw, start position."""
    steps = [s for s in manifest["duplex_steps"] if not s["is_listen"]]
    arrays = manifest["groups"]["e_duplex"]["arrays"]
    units = []
    for k, step in enumerate(steps):
        draws = e_duplex["tts_mn_step"] == step["step"]
        units.append(
            {
                "step": step["step"],
                "end_of_turn": step["end_of_turn"],
                "spoken_ids": step["decoded_ids"][1 : 1 + step["n_tokens"]],
                "condition": torch.from_numpy(e_duplex[f"tts{k}_condition"]),
                "codes": e_duplex[f"tts{k}_tokens"],
                "chosen": e_duplex["tts_mn_chosen"][draws],
                "p_chosen": e_duplex["tts_mn_p_chosen"][draws],
                "top5_ids": e_duplex["tts_mn_top5_ids"][draws],
                "top5_probs": e_duplex["tts_mn_top5_probs"][draws],
                "text_start_pos": arrays[f"tts{k}_tokens"]["args"]["text_start_pos"],
            }
        )
    return units


def duplex_min_new(session_length: int, end_of_turn: bool) -> int:
    """§3.3.3: EOS may end the unit early at the first unit of a turn or when the turn ends."""
    return 0 if session_length == 0 or end_of_turn else 26


def check_unit_distributions(probs: torch.Tensor, unit: dict) -> None:
    n = len(unit["chosen"])
    assert probs.shape[0] == n
    p_chosen = probs[torch.arange(n), torch.from_numpy(unit["chosen"])]
    assert_probs_close(p_chosen, unit["p_chosen"])
    at_top5 = torch.gather(probs, 1, torch.from_numpy(unit["top5_ids"]))
    assert_probs_close(at_top5, unit["top5_probs"])
    assert_probs_close(torch.topk(probs, 5).values, unit["top5_probs"])


def test_duplex_fixture_layout(manifest: dict, e_duplex: dict[str, np.ndarray]) -> None:
    units = speaking_units(manifest, e_duplex)
    assert len(units) == 5
    assert sum(len(u["chosen"]) for u in units) == len(e_duplex["tts_mn_chosen"]) == 130
    for u in units:
        # 26 draws per unit; the returned 25 codes are the first 25 draws
        assert len(u["chosen"]) == 26
        np.testing.assert_array_equal(u["chosen"][:25], u["codes"])


def test_duplex_condition_structure(tts: MiniCPMTTS, manifest: dict, e_duplex: dict[str, np.ndarray]) -> None:
    """Each recorded condition row is emb_text(spoken token) + a unit vector; the last row is emb_text(audio_bos)
    (no text_eos in duplex)."""
    table = tts.emb_text.weight.detach()
    for u in speaking_units(manifest, e_duplex):
        cond = u["condition"]
        assert cond.shape[0] == len(u["spoken_ids"]) + 1
        residual = cond[:-1] - table[torch.tensor(u["spoken_ids"])]
        np.testing.assert_allclose(residual.norm(dim=-1).numpy(), 1.0, atol=1e-5)
        np.testing.assert_array_equal(cond[-1].numpy(), table[tts.config.audio_bos_token_id].numpy())


def test_duplex_teacher_forced_units(
    tts: MiniCPMTTS, manifest: dict, e_duplex: dict[str, np.ndarray]
) -> None:
    """All five speaking units of one turn, cache and position carried across units (also across the
    force-listen unit, which the official does not reset), 26 draws each."""
    units = speaking_units(manifest, e_duplex)
    cache = tts.new_cache(num_slots=1, capacity=512)
    session = tts.new_session(cache, seed=0)
    for k, u in enumerate(units):
        assert session.text_start_pos == u["text_start_pos"], f"unit {k}"
        min_new = duplex_min_new(session.length, u["end_of_turn"])
        result = tts.generate_chunks(
            [session],
            [u["condition"]],
            min_new=min_new,
            max_new=26,
            forced=[u["chosen"].tolist()],
            record_probs=True,
        )[0]
        assert result.probs is not None
        if k == 0:
            # first unit of a turn: EOS allowed, no repetition penalty on the first draw
            assert_probs_close(result.probs[0], e_duplex["tts_mn_probs_step0"])
            assert float(result.probs[0, tts.eos_id]) > 0.0
        else:
            assert float(result.probs[:, tts.eos_id].max()) == 0.0
        check_unit_distributions(result.probs, u)
        np.testing.assert_array_equal(result.codes.numpy(), u["codes"])
        assert not result.hit_eos
        # the cache grows by the condition and the 25 fed codes, not by the 26th draw
        assert session.length == u["text_start_pos"] + u["condition"].shape[0] + 25
    tts.end_turn(session)
    assert session.text_start_pos == 0
    session.close()


def test_duplex_batched_sessions_match_fixture(
    tts: MiniCPMTTS, manifest: dict, e_duplex: dict[str, np.ndarray]
) -> None:
    """Two sessions one unit apart share every step: rows of different condition lengths and cache offsets."""
    units = speaking_units(manifest, e_duplex)
    cache = tts.new_cache(num_slots=3, capacity=512)
    decoy = tts.new_session(cache, seed=1)  # occupies slot 0 so the sessions below are not on slot 0
    a, b = tts.new_session(cache, seed=2), tts.new_session(cache, seed=3)
    # rows alternate order, so the batch's slots are sometimes consecutive (cache views), sometimes not (gathers)
    pairs = [[(a, k), (b, k - 1)] if k % 2 else [(b, k - 1), (a, k)] for k in range(1, len(units))]
    schedule = [[(a, 0)], *pairs, [(b, len(units) - 1)]]
    for batch in schedule:
        sessions = [s for s, _ in batch]
        chosen = [units[k] for _, k in batch]
        results = tts.generate_chunks(
            sessions,
            [u["condition"] for u in chosen],
            min_new=[
                duplex_min_new(s.length, u["end_of_turn"]) for s, u in zip(sessions, chosen, strict=True)
            ],
            max_new=26,
            forced=[u["chosen"].tolist() for u in chosen],
            record_probs=True,
        )
        for result, u in zip(results, chosen, strict=True):
            assert result.probs is not None
            check_unit_distributions(result.probs, u)
    for s in (a, b):
        assert s.length == units[-1]["text_start_pos"] + units[-1]["condition"].shape[0] + 25
    for s in (decoy, a, b):
        s.close()
    assert cache.free_slots == 3
