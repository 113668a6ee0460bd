"""The static TTS step (the CUDA-graph path, run eagerly here) against `MiniCPMTTS.generate_chunks`: same
cache contents and codes under teacher forcing, and the same code distribution."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from MiniCPMO45.engine import static_tts
from MiniCPMO45.engine.static_tts import StaticTTS, duplex_scores, gumbel
from MiniCPMO45.model import MiniCPMO
from MiniCPMO45.modules.tts import MiniCPMTTS
from MiniCPMO45.modules.tts_sampling import DUPLEX_SAMPLING, TURN_SAMPLING, CodeSampling, code_distribution
from MiniCPMO45.modules.tts_streamer import TTSStreamer, next_pieces


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> MiniCPMO:
    return MiniCPMO.from_pretrained(tiny_model_dir, dtype=torch.float32)


# flex: the draws attend through FlexAttention's block mask (the GPU path; eager FlexAttention on the CPU)
@pytest.mark.parametrize("flex", [False, True], ids=["dense-mask", "flex"])
def test_static_tts_matches_generate_chunks(model: MiniCPMO, flex: bool, monkeypatch) -> None:
    masks = []
    block_mask = static_tts.step_block_mask
    monkeypatch.setattr(static_tts, "step_block_mask", lambda *a: masks.append(a) or block_mask(*a))
    tts = model.tts
    assert tts is not None
    g = torch.Generator().manual_seed(1)
    h = tts.config.hidden_size
    vocab = tts.config.num_audio_tokens
    conds = [torch.randn(n, h, generator=g) for n in (3, 7, 1)]
    forced = [torch.randint(0, vocab - 1, (26,), generator=g).tolist() for _ in range(3)]
    forced = [[0 if c == tts.eos_id else c for c in f] for f in forced]
    forced[1][5] = tts.eos_id  # row 1 may stop (min_new 0) and does at draw 6
    ref_cache = tts.new_cache(4, 128)
    ref_sessions = [tts.new_session(ref_cache) for _ in range(3)]
    for _ in range(2):  # two units of one turn: positions carry over
        want = tts.generate_chunks(ref_sessions, conds, min_new=[26, 0, 26], max_new=26, forced=forced)
        if _ == 0:
            fast = StaticTTS(tts, 4, window=128, use_graphs=False)
            fast.flex = flex
        got = fast.generate_codes([0, 1, 2], conds, [26, 0, 26], forced=forced)
        assert got == [w.codes.tolist() for w in want]
    assert len(got[1]) == 5 and len(got[0]) == 25
    assert fast.last_hit_eos == [w.hit_eos for w in want] == [False, True, False]
    assert fast.lengths[:3].tolist() == [s.length for s in ref_sessions]
    for layer in range(len(ref_cache.keys)):
        for s in ref_sessions:
            n = s.length
            k_ref, k_got = ref_cache.keys[layer][s.slot, :, :n], fast.cache.keys[layer][s.slot, :, :n]
            assert torch.allclose(k_ref, k_got, atol=2e-5, rtol=1e-4), (k_ref - k_got).abs().max()
    assert fast.lengths[3] == 0
    assert len(masks) == (2 * 25 if flex else 0)  # one block mask per fed draw


def test_duplex_scores_match_code_distribution() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 50, generator=g) * 3
    history = [[4, 4, 7], [], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 1]]
    padded = torch.full((3, 18), -1, dtype=torch.long)
    for i, hrow in enumerate(history):
        if hrow:
            padded[i, -len(hrow) :] = torch.tensor(hrow)
    forbid = [True, False, True]
    want = code_distribution(logits, history, DUPLEX_SAMPLING, [False] * 3, forbid, eos_id=9)
    got = torch.softmax(duplex_scores(logits, padded, torch.tensor(forbid), DUPLEX_SAMPLING, 9), -1)
    assert torch.allclose(got, want, atol=1e-6)
    assert got[0, 9] == 0 and got[1, 9] > 0


def test_gumbel_max_draws_follow_the_softmax() -> None:
    """The draw loop's Gumbel-max draw picks code c with probability softmax(scores)[c]."""
    g = torch.Generator().manual_seed(0)
    scores = torch.tensor([2.0, 1.0, 0.0, -1.0, float("-inf")])
    noise = torch.rand(200_000, 5, generator=g)
    picks = (scores + gumbel(noise)).argmax(-1)
    freq = torch.bincount(picks, minlength=5).float() / picks.numel()
    assert torch.allclose(freq, torch.softmax(scores, -1), atol=0.005)
    assert freq[4] == 0  # a banned code is never drawn


def test_a_tick_runs_on_a_captured_window_that_holds_its_slots(model: MiniCPMO) -> None:
    """Slots 6 and 7 alone would make a new 2-row loop (`row_window`); after the warm-up's 4-row windows
    they run on the top one (no capture in a live tick), with the same codes and cache."""
    tts = model.tts
    assert tts is not None
    g = torch.Generator().manual_seed(3)
    h, vocab = tts.config.hidden_size, tts.config.num_audio_tokens
    conds = [torch.randn(n, h, generator=g) for n in (4, 9)]
    forced = [
        [c % (vocab - 1) for c in torch.randint(0, vocab, (26,), generator=g).tolist()] for _ in range(2)
    ]
    forced = [[0 if c == tts.eos_id else c for c in f] for f in forced]
    fresh = StaticTTS(tts, 8, window=128, row_buckets=(1, 2, 4, 8), use_graphs=False)
    want = fresh.generate_codes([6, 7], conds, [26, 26], forced=forced)
    assert [(f, r) for f, r, _, _ in fresh.loops] == [(6, 2)]
    warm = StaticTTS(tts, 8, window=128, row_buckets=(1, 2, 4, 8), use_graphs=False)
    warm.warm_up(4)
    warm.warm_up(4, top=True)
    built = set(warm.loops)
    assert {(f, r) for f, r, _, _ in built} == {(0, 4), (4, 4)}
    assert len(warm.steps) == 2 * len(warm.token_buckets)  # every condition bucket at both ends
    got = warm.generate_codes([6, 7], conds, [26, 26], forced=forced)
    assert set(warm.loops) == built and got == want
    assert warm.lengths.tolist() == fresh.lengths.tolist()
    for layer in range(len(fresh.cache.keys)):
        assert torch.allclose(fresh.cache.keys[layer][6:8], warm.cache.keys[layer][6:8], atol=2e-5)


# ---- turn-based pieces (chat) ----------------------------------------------------------------------------------
def _turn_conditions(tiny_fixture_dir: Path) -> list[torch.Tensor]:
    import numpy as np

    e = dict(np.load(tiny_fixture_dir / "expected" / "e_duplex.npz"))
    return [torch.from_numpy(e[f"tts{k}_condition"]) for k in range(3)]


def _run_turns(
    tts: MiniCPMTTS, plans: dict[int, list[torch.Tensor]], sampling: CodeSampling, record: bool = False
) -> dict[int, list[list[int]]]:
    """Each slot's text chunks through `next_pieces` together, one piece per call per streamer, as the chat tick
    draws them; `record` keeps the chunks on the per-draw path (the piece loop does not record)."""
    streamers = {
        slot: TTSStreamer(
            tts,
            tts.new_session(tts.static.cache, seed=11 + slot, slot=slot),
            sampling,
            max_new_per_text_chunk=40 + 9 * slot,
        )
        for slot in plans
    }
    at = dict.fromkeys(plans, 0)
    out: dict[int, list[list[int]]] = {slot: [] for slot in plans}
    while any(at[s] < len(plans[s]) or streamers[s].feeding for s in plans):
        for s, streamer in streamers.items():
            if not streamer.feeding and at[s] < len(plans[s]):
                streamer.begin(plans[s][at[s]], text_finished=at[s] == len(plans[s]) - 1, record_probs=record)
                at[s] += 1
        live = [s for s in plans if streamers[s].feeding]
        for s, piece in zip(live, next_pieces([streamers[s] for s in live]), strict=True):
            if piece is not None:
                out[s].append(piece[0].tolist())
    for s, streamer in streamers.items():
        out[s].append(streamer.finish().tolist())
        assert streamer.session.length == int(tts.static.lengths[s])  # the host's count matches the device's
    return out


def test_the_piece_loop_draws_what_the_per_draw_path_draws(
    tiny_model_dir: Path, tiny_fixture_dir: Path
) -> None:
    """At a near-zero temperature both paths take each draw's most likely code, so the static piece loop (feeding,
    positions, the repetition penalty over the turn, the sliding recompute of the next chunk, codes carried past
    a piece) must give the per-draw path's codes exactly; a strong penalty makes the history matter."""
    tts = MiniCPMTTS.from_checkpoint(tiny_model_dir)
    tts.static = StaticTTS(tts, num_slots=4, window=512, use_graphs=False)
    tts.static.piece_loop = True  # as on a GPU (the CPU draws one at a time)
    conds = _turn_conditions(tiny_fixture_dir)
    sampling = CodeSampling(temperature=1e-6, repetition_penalty=1.5, window=16, top_p=0.85, top_k=25)
    plans = {1: [conds[0], conds[1]], 2: [conds[2], conds[0], conds[1]]}
    looped = _run_turns(tts, plans, sampling)
    assert tts.static.piece_loops, "the chunks did not go through the piece loop"
    reference = _run_turns(tts, plans, sampling, record=True)
    assert looped == reference
    assert all(len(p) == 25 for s in plans for p in looped[s][:-1] if p)


def test_piece_loop_rows_draw_the_same_codes_alone_or_together(
    tiny_model_dir: Path, tiny_fixture_dir: Path
) -> None:
    """Each row's noise comes from its own session's generator, so a reply's speech does not depend on which
    other replies share its ticks (the per-draw path's property, kept)."""
    tts = MiniCPMTTS.from_checkpoint(tiny_model_dir)
    tts.static = StaticTTS(tts, num_slots=4, window=512, use_graphs=False)
    tts.static.piece_loop = True  # as on a GPU (the CPU draws one at a time)
    conds = _turn_conditions(tiny_fixture_dir)
    plans = {0: [conds[0], conds[1]], 3: [conds[2], conds[0]]}
    together = _run_turns(tts, plans, TURN_SAMPLING)
    assert together[0] == _run_turns(tts, {0: plans[0]}, TURN_SAMPLING)[0]
    assert together[3] == _run_turns(tts, {3: plans[3]}, TURN_SAMPLING)[3]
    assert together[0] != together[3]


def test_a_piece_loop_that_cannot_be_built_turns_itself_off(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The piece loop is new on the GPU path: if its capture fails at warm-up the worker still starts, and chat
    draws one code at a time (an out-of-memory error still goes up, for the warm-up's smaller retry)."""
    tts = MiniCPMTTS.from_checkpoint(tiny_model_dir)
    static = StaticTTS(tts, num_slots=4, window=512, use_graphs=False)
    static.piece_loop = True

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("capture failed (simulated)")

    monkeypatch.setattr(static, "_build_loop", broken)
    static.warm_up_pieces(4)
    assert static.piece_loop is False and not static.piece_loops

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    static.piece_loop = True
    monkeypatch.setattr(static, "_build_loop", out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        static.warm_up_pieces(4)
