"""The vectorized top-k/top-p filter of the batched decision equals the per-session one, row by row; the
device-side repetition windows equal the sessions' decoded lists."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from MiniCPMO45.engine.batched_decision import RecentIds, top_k_top_p_rows
from MiniCPMO45.engine.sampling import top_k_top_p


def test_rowwise_filter_matches_per_row() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 300, generator=g) * 2
    logits[2, :10] = 5.0  # ties at the k-th value are kept
    ks = [20, 0, 5, 300, 1]
    ps = [0.8, 0.5, 1.0, 0.95, 0.3]
    got = top_k_top_p_rows(logits, torch.tensor(ks), torch.tensor(ps))
    for i in range(5):
        want = top_k_top_p(logits[i], ks[i], ps[i])
        assert torch.equal(torch.isinf(got[i]), torch.isinf(want)), i
        assert torch.equal(got[i][~torch.isinf(got[i])], want[~torch.isinf(want)]), i


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
