"""The static-shape LLM step (the CUDA-graph path, run eagerly here) computes what the engine's ragged forward
computes, for a batch of sessions of different lengths, in prefill and decode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from MiniCPMO45.engine.core import Engine
from MiniCPMO45.engine.graphs import covering_window, row_window
from MiniCPMO45.engine.static_decode import GATHER_MIN_TOKENS, GATHERED, StaticLLM
from MiniCPMO45.modules.kv_cache import CacheFullError


@pytest.fixture(scope="module")
def engines(tiny_model_dir: Path) -> tuple[Engine, Engine]:
    a = Engine.from_pretrained(tiny_model_dir, dtype=torch.float32, max_sessions=4, max_len=96)
    b = Engine.from_pretrained(tiny_model_dir, dtype=torch.float32, max_sessions=4, max_len=96)
    return a, b


def _close(x: torch.Tensor, y: torch.Tensor) -> None:
    assert x.shape == y.shape
    assert torch.allclose(x, y, atol=2e-5, rtol=1e-4), f"max diff {(x - y).abs().max().item():.3g}"


def test_static_steps_match_engine_forward(engines: tuple[Engine, Engine]) -> None:
    ref, fast = engines
    g = torch.Generator().manual_seed(0)
    d = ref.model.config.llm.hidden_size
    ref_s = [ref.open_session() for _ in range(3)]
    fast_s = [fast.open_session() for _ in range(3)]
    runner = StaticLLM(fast.model.llm, fast.cache, window=64, use_graphs=False)
    assert not runner.use_graphs
    # ragged prefill: 5, 11 and 2 tokens (bucket 16)
    pieces = [torch.randn(n, d, generator=g) for n in (5, 11, 2)]
    want = ref.feed(ref_s, pieces)
    out = runner.feed([s.slot for s in fast_s], pieces)
    for i, w in enumerate(want):
        _close(out["hidden"][i, : w.shape[0]], w)
        _close(out["logits"][i], ref.last_logits([want[i]])[0])
    assert fast.cache.lengths[:3].tolist() == [5, 11, 2]
    # decode a subset: sessions 0 and 2 only; session 1 must stay untouched
    max_len = fast.cache.max_len  # past it: the spare position padding entries are written to
    before = fast.cache.keys[0][1][:, :max_len].clone()
    for _ in range(3):
        tok = [torch.randn(1, d, generator=g) for _ in range(2)]
        want = ref.feed([ref_s[0], ref_s[2]], tok)
        out = runner.feed([fast_s[0].slot, fast_s[2].slot], tok)
        _close(out["hidden"][0, :1], want[0])
        _close(out["hidden"][1, :1], want[1])
        _close(out["logits"][1], ref.last_logits(want)[1])
    assert fast.cache.lengths[:3].tolist() == [8, 11, 5]
    assert torch.equal(fast.cache.keys[0][1][:, :max_len], before)
    for layer in range(len(fast.cache.keys)):
        for s, r in zip(fast_s, ref_s, strict=True):
            _close(fast.cache.layer_keys(layer, s.slot), ref.cache.layer_keys(layer, r.slot))
            _close(fast.cache.layer_values(layer, s.slot), ref.cache.layer_values(layer, r.slot))
    with pytest.raises(CacheFullError):
        runner.feed([fast_s[1].slot], [torch.randn(60, d)])
    for s in ref_s:
        ref.close_session(s)
    for s in fast_s:
        fast.close_session(s)


def test_slots_are_dense_after_release(engines: tuple[Engine, Engine]) -> None:
    eng = engines[0]
    s = [eng.open_session() for _ in range(3)]
    eng.close_session(s[0])
    assert eng.open_session().slot == 0


def test_flex_steps_match_the_dense_mask(tiny_model_dir: Path) -> None:
    """FlexAttention steps (block mask from each row's length; idle rows read one block) give what the
    dense-mask SDPA steps give: a 12-token prefill step and decode steps, rows spanning several 128-key
    blocks, rows that sit out (longer prefill pieces take the SDPA step in both runners)."""
    engines = [
        Engine.from_pretrained(tiny_model_dir, dtype=torch.float32, max_sessions=4, max_len=400)
        for _ in range(2)
    ]
    runners = [
        StaticLLM(e.model.llm, e.cache, window=384, use_graphs=False, flex_decode=flex)
        for e, flex in zip(engines, (False, True), strict=True)
    ]
    slots = [[e.open_session().slot for _ in range(4)] for e in engines]
    g = torch.Generator().manual_seed(1)
    d = engines[0].model.config.llm.hidden_size
    prefill = [([0, 1, 2, 3], 90), ([0, 1, 2, 3], 60), ([0, 1], 96), ([0], 30), ([3], 20), ([2], 150)]
    prefill += [([1, 3], 12)]  # a 16-token step: causal within the step, through FlexAttention too
    for rows, n in prefill:  # lengths 276, 258, 300, 182: two or three 128-key blocks each
        pieces = [torch.randn(n, d, generator=g) for _ in rows]
        for runner, ss in zip(runners, slots, strict=True):
            runner.feed([ss[r] for r in rows], pieces)
    for rows in ([0, 1, 2, 3], [0, 2], [3], [1, 2, 3]):  # the others sit out (idle rows of the bucket)
        tok = [torch.randn(1, d, generator=g) for _ in rows]
        want, got = (
            runner.feed([ss[r] for r in rows], tok) for runner, ss in zip(runners, slots, strict=True)
        )
        _close(got["hidden"], want["hidden"])
        _close(got["logits"], want["logits"])
    lengths = [e.cache.lengths[:4].tolist() for e in engines]
    assert lengths[0] == lengths[1] == [278, 260, 303, 185]


def test_compile_shape_changes_no_session_state(tiny_model_dir: Path) -> None:
    """The warm-up's compile-only run of a shape (idle rows) leaves every slot's length and keys as they were,
    and keeps no step."""
    eng = Engine.from_pretrained(tiny_model_dir, dtype=torch.float32, max_sessions=4, max_len=200)
    runner = StaticLLM(eng.model.llm, eng.cache, use_graphs=False, flex_decode=True)
    s = [eng.open_session() for _ in range(3)]
    d = eng.model.config.llm.hidden_size
    runner.feed([x.slot for x in s], [torch.randn(n, d) for n in (5, 9, 2)])
    lengths = eng.cache.lengths.clone()
    keys = [k[:, :, : eng.cache.max_len].clone() for k in eng.cache.keys]
    for rows, tokens in ((4, 16), (2, 80), (1, 1)):
        runner.compile_shape(rows, tokens)
    assert torch.equal(eng.cache.lengths, lengths)
    assert all(
        torch.equal(k[:, :, : eng.cache.max_len], before)
        for k, before in zip(eng.cache.keys, keys, strict=True)
    )
    assert runner.steps == {(0, 4, 16): runner.steps[(0, 4, 16)]}  # only the step `feed` built


def test_steps_over_the_top_slots_match_the_bottom_ones(tiny_model_dir: Path) -> None:
    """Sessions on the highest slots (the second tick phase) run a step over a bucket of slots from the top
    (`row_window`), and give what the same sessions give on the lowest slots; a step over both ends runs
    every slot."""
    engines = [
        Engine.from_pretrained(tiny_model_dir, dtype=torch.float32, max_sessions=8, max_len=200)
        for _ in range(2)
    ]
    runners = [StaticLLM(e.model.llm, e.cache, use_graphs=False, flex_decode=True) for e in engines]
    low = [engines[0].open_session().slot for _ in range(3)]
    high = [engines[1].open_session(top_slot=True).slot for _ in range(3)]
    assert (low, high) == ([0, 1, 2], [7, 6, 5])
    g = torch.Generator().manual_seed(3)
    d = engines[0].model.config.llm.hidden_size
    for counts in ((7, 12, 3), (1, 1, 1), (2, 1, 4)):
        pieces = [torch.randn(n, d, generator=g) for n in counts]
        want, got = (r.feed(ss, pieces) for r, ss in zip(runners, (low, high), strict=True))
        _close(got["hidden"], want["hidden"])
        _close(got["logits"], want["logits"])
    # a caller that needs only the logits gets no copy of the hidden states
    tok = [torch.randn(1, d, generator=g) for _ in low]
    want, got = runners[0].feed(low, tok), runners[1].feed(high, tok, hidden=False)
    assert set(got) == {"logits"}
    _close(got["logits"], want["logits"])
    assert engines[1].cache.lengths.tolist() == [0, 0, 0, 0, 0, 9, 15, 11]
    assert {k[0] for k in runners[1].steps} == {4}  # rows 4..7: a bucket of 4 from the top
    assert {k[1] for k in runners[1].steps} == {4}
    other = engines[1].open_session()  # slot 0: now the step spans every slot
    runners[1].feed([other.slot, high[0]], [torch.randn(1, d, generator=g)] * 2)
    assert (0, 8, 1) in runners[1].steps


def test_row_window_picks_the_smaller_end() -> None:
    buckets = [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert row_window(buckets, 64, [0, 5, 20]) == (0, 24)
    assert row_window(buckets, 64, [63, 50, 40]) == (40, 24)
    assert row_window(buckets, 64, [63]) == (63, 1)
    assert row_window(buckets, 64, [3, 60]) == (0, 64)
    assert row_window(buckets, 48, [47, 30]) == (24, 24)


def test_covering_window_takes_the_smallest_captured_window_that_holds_the_slots() -> None:
    captured = [(0, 24), (40, 24), (0, 64), (63, 1)]
    assert covering_window(captured, [45, 60]) == (40, 24)
    assert covering_window(captured, [3, 20]) == (0, 24)
    assert covering_window(captured, [3, 60]) == (0, 64)
    assert covering_window(captured, [63]) == (63, 1)
    assert covering_window([(0, 24)], [30]) is None


def test_a_step_runs_on_a_captured_window_that_holds_its_slots(tiny_model_dir: Path) -> None:
    """Slots 6 and 7 alone make a 2-row step (`row_window`); once the warm-up built the top 4-row step they
    run on it instead (no capture in a live tick), with the same results."""
    engines = [
        Engine.from_pretrained(tiny_model_dir, dtype=torch.float32, max_sessions=8, max_len=64)
        for _ in range(2)
    ]
    fresh, warm = (StaticLLM(e.model.llm, e.cache, use_graphs=False) for e in engines)
    warm.warm_up(4, (2,), top=True)
    built = set(warm.steps)
    assert built == {(4, 4, 2)}
    slots = [[e.open_session(top_slot=True).slot for _ in range(2)] for e in engines]
    assert slots == [[7, 6], [7, 6]]
    g = torch.Generator().manual_seed(4)
    d = engines[0].model.config.llm.hidden_size
    pieces = [torch.randn(n, d, generator=g) for n in (2, 1)]
    want, got = fresh.feed(slots[0], pieces), warm.feed(slots[1], pieces)
    assert set(fresh.steps) == {(6, 2, 2)} and set(warm.steps) == built
    _close(got["hidden"], want["hidden"])
    _close(got["logits"], want["logits"])
    assert engines[1].cache.lengths.tolist() == engines[0].cache.lengths.tolist()


@pytest.mark.parametrize("flex", [False, True])
def test_a_gathered_step_matches_the_engine_forward_on_slots_far_apart(
    tiny_model_dir: Path, flex: bool
) -> None:
    """Turns on slots 0, 7 and 3 of 8 (both tick phases' ends) prefill as one gathered step of 4 rows (a window
    step would run all 8): the same hidden states, logits, keys and lengths as the engine's ragged forward, the
    other slots untouched; decode steps after it still match."""
    engines = [
        Engine.from_pretrained(tiny_model_dir, dtype=torch.float32, max_sessions=8, max_len=200)
        for _ in range(2)
    ]
    ref, fast = engines
    runner = StaticLLM(fast.model.llm, fast.cache, use_graphs=False, flex_decode=flex)
    runner.warm_up_gathered(4, (32,))
    ref_s = [ref.open_session() for _ in range(8)]
    fast_s = [fast.open_session() for _ in range(8)]
    g = torch.Generator().manual_seed(5)
    d = ref.model.config.llm.hidden_size
    history = [torch.randn(n, d, generator=g) for n in (3, 9, 1, 30, 4, 12, 7, 20)]
    ref.feed(ref_s, history)
    runner.feed([s.slot for s in fast_s], history)
    untouched = [1, 2, 4, 5, 6]
    before = [k[untouched, :, : fast.cache.max_len].clone() for k in fast.cache.keys]
    turns = [0, 7, 3]
    pieces = [torch.randn(n, d, generator=g) for n in (20, 5, 17)]
    want = ref.feed([ref_s[i] for i in turns], pieces)
    got = runner.feed([fast_s[i].slot for i in turns], pieces)
    assert (GATHERED, 4, 32) in runner.steps
    for i, w in enumerate(want):
        _close(got["hidden"][i, : w.shape[0]], w)
    _close(got["logits"], ref.last_logits(want))
    assert fast.cache.lengths.tolist() == ref.cache.lengths.tolist() == [23, 9, 1, 47, 4, 12, 7, 25]
    for layer, old in enumerate(before):
        assert torch.equal(fast.cache.keys[layer][untouched, :, : fast.cache.max_len], old)
        for s, r in zip(fast_s, ref_s, strict=True):
            _close(fast.cache.layer_keys(layer, s.slot), ref.cache.layer_keys(layer, r.slot))
            _close(fast.cache.layer_values(layer, s.slot), ref.cache.layer_values(layer, r.slot))
    tok = [torch.randn(1, d, generator=g) for _ in turns]
    want = ref.feed([ref_s[i] for i in turns], tok)
    got = runner.feed([fast_s[i].slot for i in turns], tok)  # one token: a window step, not gathered
    assert not any(f == GATHERED and t == 1 for f, _, t in runner.steps)
    _close(got["logits"], ref.last_logits(want))


def test_feed_gathers_only_into_steps_the_warm_up_built(tiny_model_dir: Path) -> None:
    """The rule: at least `GATHER_MIN_TOKENS` tokens, the smallest gathered step built (a live tick never
    captures one) that holds the rows, and at most half the token rows of the window step it replaces."""
    eng = Engine.from_pretrained(tiny_model_dir, dtype=torch.float32, max_sessions=8, max_len=64)
    runner = StaticLLM(eng.model.llm, eng.cache, use_graphs=False)
    assert runner.gathered_shape(3, 20, 8 * 32) is None  # nothing built yet
    runner.warm_up_gathered(4, (32, 16))
    assert sorted(runner.steps) == [(GATHERED, r, t) for r in (1, 2, 4) for t in (16, 32)]
    assert runner.gathered_shape(3, 20, 8 * 32) == (4, 32)
    assert runner.gathered_shape(3, 20) == (4, 32)
    assert runner.gathered_shape(2, 16, 8 * 16) == (2, 16)
    assert runner.gathered_shape(3, GATHER_MIN_TOKENS - 1, 8 * 16) is None  # decode-sized: the copy won't pay
    assert runner.gathered_shape(3, 20, 4 * 32) is None  # a 4-row gathered step instead of a 4-row window
    assert runner.gathered_shape(5, 20, 16 * 32) is None  # 8 rows: not built
    assert runner.gathered_shape(3, 40, 8 * 64) is None  # 64 tokens: not built
