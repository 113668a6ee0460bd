"""The vectorized top-k/top-p filter of the batched decision equals the per-session one, row by row."""

from __future__ import annotations

import torch

from MiniCPMO45.engine.batched_decision import top_k_top_p_rows
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
