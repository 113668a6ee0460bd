"""The static steps' block masks against plain causal attention with a KV offset per row (eager FlexAttention
on the CPU: the same masks the compiled GPU kernels read)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

from MiniCPMO45.engine.flex_decode import BLOCK, step_block_mask

HQ, HKV, HD = 8, 2, 16


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    t = q.shape[2]
    pos = lengths[:, None] + torch.arange(t)[None, :]
    allowed = torch.arange(k.shape[2])[None, None, :] <= pos[:, :, None]
    kf = k.repeat_interleave(HQ // HKV, dim=1)
    vf = v.repeat_interleave(HQ // HKV, dim=1)
    scores = (q @ kf.transpose(-1, -2)) / HD**0.5
    return scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1) @ vf


@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("full_blocks", [False, True])
def test_step_masks_match_causal_attention_with_offsets(tokens: int, full_blocks: bool) -> None:
    window = 4 * BLOCK
    gen = torch.Generator().manual_seed(0)
    # row 0 idle; the others end inside the first, second and fourth blocks and exactly on a block boundary
    lengths = torch.tensor([0, 100, 2 * BLOCK - 3, 3 * BLOCK + 40, 2 * BLOCK])
    num_new = torch.tensor([0, tokens, tokens, tokens, tokens])
    rows = lengths.shape[0]
    q = torch.randn(rows, HQ, tokens, HD, generator=gen)
    k = torch.randn(rows, HKV, window, HD, generator=gen)
    v = torch.randn(rows, HKV, window, HD, generator=gen)
    want = reference(q, k, v, lengths)
    if tokens == 1:
        mask = step_block_mask(lengths, num_new, tokens, window, full_blocks=full_blocks)
        got = flex_attention(q, k, v, block_mask=mask, enable_gqa=True)
    else:
        group = HQ // HKV
        mask = step_block_mask(lengths, num_new, tokens, window, group, full_blocks=full_blocks)
        folded = flex_attention(q.reshape(rows, HKV, group * tokens, HD), k, v, block_mask=mask)
        got = folded.reshape(rows, HQ, tokens, HD)
    torch.testing.assert_close(got[1:], want[1:], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got[0]).all()  # an idle row sees block 0 only and stays finite
    if full_blocks:
        assert mask.full_kv_num_blocks is not None
        # the blocks wholly below each row's length are full; the partial ones follow them
        assert mask.full_kv_num_blocks[:, 0, 0].tolist() == [0, 0, 1, 3, 2]
        assert (mask.kv_num_blocks[:, 0, 0] >= 1).all()
    else:
        assert mask.full_kv_num_blocks is None
