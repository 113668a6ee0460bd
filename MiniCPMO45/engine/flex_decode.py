"""Decode-step attention that reads only the cache blocks a row owns: FlexAttention with a block mask.

The static decode step runs every slot up to its row bucket, and PyTorch's SDPA with a dense mask reads each
row's whole attention window whatever its length, including the rows that take no token this step (sessions
that already ended their unit). Here the block mask is built on the device from the rows' positions: row b
visits the key blocks up to its new token's position (and an idle row only block 0, so its output stays
finite; it is dropped), and the partial last block is masked per key. Fixed shapes, no host value: it is
captured in the step's CUDA graph like the rest.

On CUDA the kernel is `torch.compile`d (Triton; one compile per row bucket); elsewhere the eager reference
runs (tests compare it with the SDPA path).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

BLOCK = 128
_compiled: Callable[..., torch.Tensor] | None = None


def _allow_a_compile_per_bucket() -> None:
    """One specialised kernel per row bucket (up to 12) exceeds dynamo's default of 8 recompiles per function,
    past which it would silently fall back to the unfused implementation (the whole score matrix)."""
    import torch._dynamo.config as dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(int(getattr(dynamo, name)), 64))


def flex_available(device: torch.device) -> bool:
    """Whether the compiled kernel can run here (CUDA with Triton)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def decode_block_mask(positions: torch.Tensor, active: torch.Tensor, window: int) -> BlockMask:
    """positions [b]: each row's new key position; active [b]: rows that take a token this step."""
    b = positions.shape[0]
    blocks = -(-window // BLOCK)
    needed = torch.where(active, positions // BLOCK + 1, torch.ones_like(positions)).clamp(max=blocks)
    kv_num_blocks = needed.to(torch.int32).view(b, 1, 1)
    kv_indices = torch.arange(blocks, dtype=torch.int32, device=positions.device).expand(b, 1, 1, blocks)

    def mask_mod(
        batch: torch.Tensor, head: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        return kv_idx <= positions[batch]

    return BlockMask.from_kv_blocks(
        kv_num_blocks,
        kv_indices.contiguous(),
        BLOCK_SIZE=BLOCK,
        mask_mod=mask_mod,
        seq_lengths=(1, window),
        compute_q_blocks=False,
    )


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask
) -> torch.Tensor:
    """q [b, heads, 1, hd]; k, v [b, kv_heads, window, hd] (grouped-query) -> [b, heads, 1, hd]."""
    global _compiled
    if q.is_cuda:
        if _compiled is None:
            _allow_a_compile_per_bucket()
            _compiled = torch.compile(flex_attention, dynamic=False)
        fn = _compiled
    else:
        fn = flex_attention
    out = fn(q, k, v, block_mask=block_mask, enable_gqa=True)
    assert isinstance(out, torch.Tensor)
    return out
