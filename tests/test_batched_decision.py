"""The vectorized top-k/top-p filter of the batched decision equals the per-session one, row by row; its draws
follow the distributions `torch.multinomial` draws from; the device-side repetition windows equal the sessions'
decoded lists."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from MiniCPMO45.engine.batched_decision import RecentIds, draw_rows, top_k_top_p_sorted
from MiniCPMO45.engine.sampling import top_k_top_p


def test_rowwise_filter_matches_per_row() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 300, generator=g) * 2
    logits[2, :10] = 5.0  # ties at the k-th value are kept
    ks = [20, 0, 5, 300, 1]
    ps = [0.8, 0.5, 1.0, 0.95, 0.3]
    kept, ids = top_k_top_p_sorted(logits, torch.tensor(ks), torch.tensor(ps), 300)
    got = torch.full_like(logits, float("-inf")).scatter_(1, ids, kept)
    for i in range(5):
        want = top_k_top_p(logits[i], ks[i], ps[i])
        assert torch.equal(torch.isinf(got[i]), torch.isinf(want)), i
        assert torch.equal(got[i][~torch.isinf(got[i])], want[~torch.isinf(want)]), i


def test_sorted_columns_hold_every_kept_id() -> None:
    """With every row's k at most the width, the first `width` sorted columns keep what the full filter keeps."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 500, generator=g)
    ks, ps = [20, 5, 12], [0.8, 1.0, 0.5]
    kept, ids = top_k_top_p_sorted(logits, torch.tensor(ks), torch.tensor(ps), max(ks))
    assert kept.shape == ids.shape == (3, 20)
    for i in range(3):
        want = top_k_top_p(logits[i], ks[i], ps[i])
        assert (
            sorted(ids[i][~torch.isinf(kept[i])].tolist())
            == torch.nonzero(~torch.isinf(want)).flatten().tolist()
        )


def test_draws_follow_the_softmax_and_skip_dropped_ids() -> None:
    """`draw_rows` picks column c with probability softmax(row)[c] (a chi-square bound over 40k draws per
    row), never a column at -inf, and rows draw independently."""
    g = torch.Generator().manual_seed(5)
    logits = torch.tensor(
        [[2.0, 1.0, 0.0, -1.0, float("-inf"), 0.5], [0.0, 0.0, 0.0, float("-inf"), 3.0, 0.0]]
    )
    probs = logits.softmax(-1)
    n = 40000
    draws = torch.stack([draw_rows(logits, g) for _ in range(n)])  # [n, 2]
    for row in range(2):
        counts = torch.bincount(draws[:, row], minlength=6).double()
        assert counts[probs[row] == 0].sum() == 0
        live = probs[row] > 0
        expected = probs[row][live].double() * n
        chi2 = (((counts[live] - expected) ** 2) / expected).sum().item()
        assert chi2 < 25.0, (row, chi2)  # 4-5 degrees of freedom: p < 1e-4 by chance


def test_recent_ids_follow_each_rows_window() -> None:
    """The device-side repetition windows hold, after every step, exactly the last `window` decided ids of each
    row (rows of different windows, a row with none, steps that decide for a subset and do not record)."""
    vocab = 50
    windows = [3, 0, 8, 5]
    decoded = [[1, 2, 3, 4, 5], [6, 7], [], [9, 9, 10]]
    states = [SimpleNamespace(decoded=list(d)) for d in decoded]
    recent = RecentIds(states, windows, vocab, torch.device("cpu"))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(1)
    for step in range(12):
        rows = [0, 1, 2, 3] if step % 3 else [2, 0]
        tokens = torch.randint(0, vocab, (len(rows),), generator=g)
        record = torch.rand(len(rows), generator=g) > 0.3
        recent.push(torch.tensor(rows), tokens, record)
        for r, t, keep in zip(rows, tokens.tolist(), record.tolist(), strict=True):
            if keep:
                decoded[r].append(t)
        seen = recent.seen(torch.tensor([0, 1, 2, 3]))
        assert seen is not None
        for r, w in enumerate(windows):
            want = set(decoded[r][-w:]) if w else set()
            assert set(torch.nonzero(seen[r]).flatten().tolist()) == want, (step, r)
    assert RecentIds(states, [0, 0, 0, 0], vocab, torch.device("cpu")).seen(torch.tensor([0])) is None  # type: ignore[arg-type]
