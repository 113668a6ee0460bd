"""MiniCPMTTS generation behaviour on the tiny checkpoint: unit lengths, EOS rules, streaming, sampling, errors."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from MiniCPMO45.loader import CheckpointError, read_checkpoint
from MiniCPMO45.modules.tts import (
    DUPLEX_SAMPLING,
    TURN_SAMPLING,
    CacheFullError,
    MiniCPMTTS,
)
from MiniCPMO45.modules.tts_sampling import code_distribution, keep_top_k, keep_top_p, penalize_repeats
from MiniCPMO45.modules.tts_streamer import TTSStreamer
from tests.reference_tts import generate, generate_chunk, speak_units, teacher_force_chunk


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """The TTS loop runs thousands of tiny ops; extra intra-op threads only add waiting on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tts(tiny_model_dir: Path) -> MiniCPMTTS:
    return MiniCPMTTS.from_checkpoint(tiny_model_dir)


@pytest.fixture(scope="module")
def eos_biased(tts: MiniCPMTTS) -> MiniCPMTTS:
    """The tiny TTS with +40 on the EOS logit, so EOS is drawn whenever it is allowed."""
    biased = copy.deepcopy(tts)
    old = biased.head_code[0]
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[tts.eos_id] = 40.0
    biased.head_code[0] = head
    return biased


@pytest.fixture(scope="module")
def e_duplex(tiny_fixture_dir: Path) -> dict[str, np.ndarray]:
    return dict(np.load(tiny_fixture_dir / "expected" / "e_duplex.npz"))


def cond(e_duplex: dict[str, np.ndarray], k: int) -> torch.Tensor:
    return torch.from_numpy(e_duplex[f"tts{k}_condition"])


# ---- duplex units -----------------------------------------------------------------------------------------------


def test_mid_turn_unit_returns_exactly_25_codes(tts: MiniCPMTTS, e_duplex) -> None:
    cache = tts.new_cache(num_slots=1, capacity=256)
    session = tts.new_session(cache, seed=7)
    first = generate_chunk(tts, session, cond(e_duplex, 0), min_new=0)
    start = session.length
    assert start == cond(e_duplex, 0).shape[0] + first.numel()
    codes = generate_chunk(tts, session, cond(e_duplex, 1))
    assert codes.shape == (25,)
    assert int(codes.max()) < tts.eos_id
    assert session.length == start + cond(e_duplex, 1).shape[0] + 25
    session.close()


def test_sampling_is_reproducible_per_session_seed(tts: MiniCPMTTS, e_duplex) -> None:
    cache = tts.new_cache(num_slots=3, capacity=64)
    runs = []
    for seed in (11, 11, 12):
        session = tts.new_session(cache, seed=seed)
        runs.append(generate_chunk(tts, session, cond(e_duplex, 0), min_new=26))
        session.close()
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_batched_draws_equal_single_session_draws(tts: MiniCPMTTS, e_duplex) -> None:
    cache = tts.new_cache(num_slots=4, capacity=128)
    alone = []
    for k, seed in ((0, 5), (2, 6)):
        s = tts.new_session(cache, seed=seed)
        alone.append(generate_chunk(tts, s, cond(e_duplex, k), min_new=26))
        s.close()
    a, b = tts.new_session(cache, seed=5), tts.new_session(cache, seed=6)
    batched = tts.generate_chunks([a, b], [cond(e_duplex, 0), cond(e_duplex, 2)], min_new=26, max_new=26)
    assert torch.equal(batched[0].codes, alone[0])
    assert torch.equal(batched[1].codes, alone[1])


def test_first_unit_of_turn_may_stop_at_eos(eos_biased: MiniCPMTTS, e_duplex) -> None:
    cache = eos_biased.new_cache(num_slots=1, capacity=256)
    session = eos_biased.new_session(cache, seed=0)
    condition = cond(e_duplex, 0)
    result = eos_biased.generate_chunks([session], [condition], min_new=0, max_new=26)[0]
    assert result.hit_eos
    assert result.codes.numel() == 0
    assert result.draws == [eos_biased.eos_id]
    assert session.length == condition.shape[0]  # the EOS draw is not fed


def test_min_new_forbids_eos_until_reached(eos_biased: MiniCPMTTS, e_duplex) -> None:
    cache = eos_biased.new_cache(num_slots=1, capacity=256)
    session = eos_biased.new_session(cache, seed=0)
    mid_turn = eos_biased.generate_chunks([session], [cond(e_duplex, 0)], min_new=26, max_new=26)[0]
    assert not mid_turn.hit_eos and mid_turn.codes.numel() == 25
    eos_biased.end_turn(session)
    early = eos_biased.generate_chunks([session], [cond(e_duplex, 0)], min_new=5, max_new=26)[0]
    assert early.hit_eos and early.codes.numel() == 5
    assert eos_biased.eos_id not in early.codes.tolist()


def test_end_turn_resets_position(tts: MiniCPMTTS, e_duplex) -> None:
    cache = tts.new_cache(num_slots=1, capacity=256)
    session = tts.new_session(cache, seed=0)
    generate_chunk(tts, session, cond(e_duplex, 0))
    assert session.text_start_pos > 0
    tts.end_turn(session)
    assert session.text_start_pos == 0


def test_repetition_penalty_sees_only_this_calls_codes(tts: MiniCPMTTS, e_duplex) -> None:
    """Force one code repeatedly: it is penalised within the call, and the next unit starts unpenalised."""
    cache = tts.new_cache(num_slots=2, capacity=256)
    plain = dataclasses.replace(DUPLEX_SAMPLING, repetition_penalty=1.0)
    code = 123
    probs = {}
    for name, sampling in (("pen", DUPLEX_SAMPLING), ("plain", plain)):
        s = tts.new_session(cache, seed=0)
        first = teacher_force_chunk(
            tts, s, cond(e_duplex, 0), [code] * 20, min_new=20, max_new=20, sampling=sampling
        )
        second = teacher_force_chunk(
            tts, s, cond(e_duplex, 1), [code] * 2, min_new=2, max_new=2, sampling=sampling
        )
        probs[name] = (first, second)
        s.close()
    (pen_first, pen_second), (plain_first, plain_second) = probs["pen"], probs["plain"]
    torch.testing.assert_close(pen_first[0], plain_first[0])  # nothing drawn yet
    assert float(pen_first[19, code]) < float(plain_first[19, code])
    torch.testing.assert_close(pen_second[0], plain_second[0])  # new call, empty window
    assert float(pen_second[1, code]) < float(plain_second[1, code])


# ---- logit processors -------------------------------------------------------------------------------------------


def test_penalize_repeats_counts_within_window_and_respects_sign() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5]])
    out = penalize_repeats(logits, [[0, 1, 0], [1, 0], []], penalty=2.0, window=16)
    torch.testing.assert_close(out[0], torch.tensor([2.0 / 4, -2.0 * 2, 1.0, 0.5]))
    torch.testing.assert_close(out[1], torch.tensor([2.0 / 2, -2.0 * 2, 1.0, 0.5]))
    torch.testing.assert_close(out[2], logits[2])
    windowed = penalize_repeats(logits[:1], [[0, 0, 0, 1]], penalty=2.0, window=2)
    torch.testing.assert_close(windowed[0], torch.tensor([2.0 / 2, -2.0 * 2, 1.0, 0.5]))


def test_top_p_and_top_k_keep_at_least_three() -> None:
    probs = torch.tensor([[0.70, 0.20, 0.05, 0.03, 0.02]])
    logits = probs.log()
    kept_p = torch.isfinite(keep_top_p(logits, top_p=0.5, min_keep=3))
    assert kept_p.tolist() == [[True, True, True, False, False]]
    kept_p = torch.isfinite(keep_top_p(logits, top_p=0.96, min_keep=1))
    assert kept_p.tolist() == [[True, True, True, True, False]]
    kept_k = torch.isfinite(keep_top_k(logits, top_k=1, min_keep=3))
    assert kept_k.tolist() == [[True, True, True, False, False]]
    kept_k = torch.isfinite(keep_top_k(logits, top_k=4, min_keep=3))
    assert kept_k.tolist() == [[True, True, True, True, False]]


# ---- turn-based streaming ---------------------------------------------------------------------------------------


def test_streamer_yields_25_code_pieces_and_recomputes(tts: MiniCPMTTS, e_duplex) -> None:
    """The tiny TTS never draws EOS, so each text chunk runs to its draw limit (60 here)."""
    cache = tts.new_cache(num_slots=1, capacity=512)
    session = tts.new_session(cache, seed=3)
    streamer = TTSStreamer(tts, session, TURN_SAMPLING, chunk_size=25, max_new_per_text_chunk=60)
    c0, c1 = cond(e_duplex, 0), cond(e_duplex, 1)
    pieces0 = list(streamer.feed(c0, text_finished=False))
    assert [(p.numel(), last) for p, last in pieces0] == [(25, False), (25, False)]
    assert session.length == c0.shape[0] + 59  # the 60th code is drawn but not fed
    pieces1 = list(streamer.feed(c1, text_finished=True))
    assert [(p.numel(), last) for p, last in pieces1] == [(25, False), (25, False)]
    # recomputed from position 0 over [c0 + its 60 codes + c1], then 59 fed codes
    assert session.length == c0.shape[0] + 60 + c1.shape[0] + 59
    rest = streamer.finish()
    assert rest.numel() == 120 - 100
    all_codes = torch.cat([p for p, _ in pieces0 + pieces1] + [rest])
    assert all_codes.tolist() == streamer.turn_codes
    with pytest.raises(RuntimeError):
        next(iter(streamer.feed(c1, text_finished=True)))


def test_streamer_last_piece_and_immediate_eos(eos_biased: MiniCPMTTS, e_duplex) -> None:
    cache = eos_biased.new_cache(num_slots=1, capacity=512)
    session = eos_biased.new_session(cache, seed=0)
    streamer = TTSStreamer(eos_biased, session)
    assert [(p.numel(), last) for p, last in streamer.feed(cond(e_duplex, 0), text_finished=True)] == [
        (0, True)
    ]
    streamer = TTSStreamer(eos_biased, session)
    assert list(streamer.feed(cond(e_duplex, 0), text_finished=False)) == []
    assert streamer.finish().numel() == 0


# ---- condition ---------------------------------------------------------------------------------------------------


def test_condition_rows(tts: MiniCPMTTS) -> None:
    cfg = tts.config
    ids = torch.tensor([11, 151000, 42])
    hidden = torch.randn(3, cfg.llm_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = tts.condition(ids, hidden, text_finished=True)
        mid = torch.relu(
            hidden @ tts.projector_semantic.linear1.weight.T + tts.projector_semantic.linear1.bias
        )
        proj = mid @ tts.projector_semantic.linear2.weight.T + tts.projector_semantic.linear2.bias
        want = tts.emb_text.weight[ids] + proj / proj.norm(dim=-1, keepdim=True)
        table = tts.emb_text.weight
        torch.testing.assert_close(out[:3], want)
        torch.testing.assert_close(out[3], table[cfg.text_eos_token_id])
        torch.testing.assert_close(out[4], table[cfg.audio_bos_token_id])
        open_text = tts.condition(ids, hidden, text_finished=False)
        assert open_text.shape == (4, cfg.hidden_size)
        torch.testing.assert_close(open_text[3], table[cfg.audio_bos_token_id])
        empty = tts.condition(torch.empty(0, dtype=torch.long), torch.empty(0, cfg.llm_dim), False)
        assert empty.shape == (1, cfg.hidden_size)


def test_condition_rejects_bad_input(tts: MiniCPMTTS) -> None:
    cfg = tts.config
    with pytest.raises(ValueError, match="hidden"):
        tts.condition(torch.tensor([1, 2]), torch.zeros(3, cfg.llm_dim), False)
    with pytest.raises(ValueError, match="token ids"):
        tts.condition(torch.tensor([cfg.num_text_tokens]), torch.zeros(1, cfg.llm_dim), False)


# ---- loading and resources ----------------------------------------------------------------------------------------


def test_loading_names_missing_and_unexpected_tensors(tts: MiniCPMTTS, tiny_model_dir: Path) -> None:
    tensors = read_checkpoint(tiny_model_dir, prefixes=["tts."])
    assert "tts.model.embed_tokens.weight" in tensors and "tts.projector_spk.linear1.weight" in tensors
    broken = dict(tensors)
    del broken["tts.model.layers.1.mlp.up_proj.weight"]
    broken["tts.surprise.weight"] = torch.zeros(1)
    fresh = MiniCPMTTS(tts.config)
    with pytest.raises(CheckpointError, match=r"tts\.model\.layers\.1\.mlp\.up_proj\.weight") as err:
        fresh.load_tensors(broken)
    assert "tts.surprise.weight" in str(err.value)
    no_head = {k: v for k, v in tensors.items() if "head_code" not in k}
    with pytest.raises(CheckpointError, match="head_code"):
        fresh.load_tensors(no_head)


def test_head_weight_is_folded_weight_norm(tts: MiniCPMTTS, tiny_model_dir: Path) -> None:
    tensors = read_checkpoint(tiny_model_dir, prefixes=["tts.head_code."], dtype=torch.float32)
    g = tensors["tts.head_code.0.parametrizations.weight.original0"]
    v = tensors["tts.head_code.0.parametrizations.weight.original1"]
    row_norms = tts.head_code[0].weight.detach().norm(dim=1, keepdim=True)
    torch.testing.assert_close(row_norms, g.abs())
    torch.testing.assert_close(tts.head_code[0].weight.detach() / g, v / v.norm(dim=1, keepdim=True))


def test_cache_limits(tts: MiniCPMTTS, e_duplex) -> None:
    cache = tts.new_cache(num_slots=1, capacity=20)
    session = tts.new_session(cache, seed=0)
    with pytest.raises(CacheFullError):
        tts.new_session(cache)
    with pytest.raises(CacheFullError, match="capacity is 20"):
        generate_chunk(tts, session, cond(e_duplex, 0))  # 5 + 25 positions > 20
    assert session.length == 0  # refused before any work
    codes = generate_chunk(tts, session, cond(e_duplex, 0), max_new=16)  # 5 + 15 positions fit exactly
    assert codes.numel() == 15 and session.length == 20
    session.close()
    assert cache.free_slots == 1
    with pytest.raises(ValueError):
        tts.generate_chunks([session], [cond(e_duplex, 0)], min_new=0, max_new=26)


def test_streamer_recompute_warps_first_draw_of_later_chunks(tts: MiniCPMTTS, e_duplex) -> None:
    """The second text chunk starts from an empty cache over [c0 + codes0 + c1]; as the turn already has codes,
    top-p/top-k apply to its very first draw. Checked against a fresh non-streaming run over the same inputs
    (no repetition penalty here: log-probabilities recover the logits only up to a constant)."""
    sampling = dataclasses.replace(TURN_SAMPLING, repetition_penalty=1.0)
    cache = tts.new_cache(num_slots=2, capacity=512)
    session = tts.new_session(cache, seed=4)
    streamer = TTSStreamer(tts, session, sampling, max_new_per_text_chunk=30)
    c0, c1 = cond(e_duplex, 0), cond(e_duplex, 1)
    list(streamer.feed(c0, text_finished=False))
    codes0 = list(streamer.turn_codes)
    list(streamer.feed(c1, text_finished=True, forced=[codes0[-1]] * 30, record_probs=True))
    assert streamer.chunk_probs is not None
    assert streamer.chunk_probs.shape == (30, tts.config.num_audio_tokens)
    first = streamer.chunk_probs[0]
    assert int((first > 0).sum()) == sampling.top_k

    reference = tts.new_session(cache, seed=0)
    with torch.inference_mode():
        full = torch.cat([c0, tts.emb_code[0](torch.tensor(codes0)), c1])
    plain = generate(
        tts, reference, full, min_new=0, max_new=1, sampling=sampling, forced=[0], record_probs=True
    )
    assert plain.probs is not None
    assert (
        int((plain.probs[0] > 0).sum()) == tts.config.num_audio_tokens
    )  # a first draw of a turn: no warping
    logits = plain.probs[0].log() * sampling.temperature
    redone = code_distribution(logits[None], [codes0], sampling, [True], [False], tts.eos_id)[0]
    torch.testing.assert_close(redone, first, atol=1e-7, rtol=1e-4)


def test_speak_units_applies_duplex_rules(eos_biased: MiniCPMTTS, e_duplex) -> None:
    """With EOS always winning when allowed: a turn's first unit stops at once, a mid-turn unit gives 25 codes,
    the turn's last unit stops at once and resets the session."""
    cache = eos_biased.new_cache(num_slots=2, capacity=256)
    a, b = eos_biased.new_session(cache, seed=0), eos_biased.new_session(cache, seed=1)
    first = speak_units(eos_biased, [a], [cond(e_duplex, 0)], end_of_turn=[False])[0]
    assert first.codes.numel() == 0 and first.hit_eos and a.length == cond(e_duplex, 0).shape[0]
    mid, start = speak_units(eos_biased, [a, b], [cond(e_duplex, 1), cond(e_duplex, 0)], [False, False])
    assert mid.codes.numel() == 25 and not mid.hit_eos
    assert start.codes.numel() == 0  # b is at the start of its turn
    last = speak_units(eos_biased, [a], [cond(e_duplex, 2)], end_of_turn=[True])[0]
    assert last.codes.numel() == 0 and last.hit_eos
    assert a.length == 0


def test_code_distribution_rows_keep_their_own_warp_and_eos_ban() -> None:
    """A batch of rows with different warp and EOS-ban flags gives each row what it would get alone (the
    flags go to the device as masks, without a read back to the host)."""
    from MiniCPMO45.modules.tts_sampling import TURN_SAMPLING

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 40, generator=g)
    history = [[1, 2, 2], [], [5]]
    warp, forbid = [False, True, True], [False, True, False]
    batch = code_distribution(logits, history, TURN_SAMPLING, warp, forbid, eos_id=39)
    for row in range(3):
        alone = code_distribution(
            logits[row : row + 1], [history[row]], TURN_SAMPLING, [warp[row]], [forbid[row]], eos_id=39
        )
        torch.testing.assert_close(batch[row : row + 1], alone)
    assert batch[1, 39] == 0 and batch[0, 39] > 0  # row 0: neither warped nor banned
