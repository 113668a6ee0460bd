"""Static-step attention that reads only the cache blocks a row owns: FlexAttention with a block mask.

The static step runs every slot up to its row bucket, and PyTorch's SDPA with a dense mask reads each row's
whole attention window whatever its length, including the rows that take no token this step (sessions that
already ended their unit), with a kernel that is not Hopper's fastest. Here the block mask is built on the
device from the rows' lengths: row b's queries visit the key blocks up to their positions (an idle row only
block 0, so its output stays finite; it is dropped), and the partial blocks are masked per key (causal within
the step's new tokens). Fixed shapes, no host value: it is captured in the step's CUDA graph like the rest.

Longer steps (the prefill of a unit: 16 audio tokens, ~80 with a frame) fold the query heads of each kv head
into the query rows, as the SDPA path does (`[rows, kv, group*T, hd]`, row g*T + t is token t of head g): the
cache is read once per kv head, through Inductor's main FlexAttention kernel (its decoding kernel found no
configuration for 96 tokens x 4 heads).

On CUDA the kernels are `torch.compile`d (Triton) with static shapes, one compile per step shape (rows,
tokens, window), each when the worker's warm-up (`DuplexBatcher.warm_up`) captures that step; elsewhere the
eager reference runs (tests compare it with the SDPA path). The one-token step takes the decoding kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

BLOCK = 128
# Steps of up to this many new tokens per row run with one query row per head (Inductor's decoding kernel);
# longer ones, up to FOLDED_MAX_TOKENS, with the heads folded into the query rows (its main kernel).
MAX_TOKENS = 1
FOLDED_MAX_TOKENS = 128
# Kernel options of the two paths (Inductor's `kernel_options`), from `bench/attention_gpu.py` on an H100 (24 of
# 32 rows taking tokens, 8 kv heads, a 4,096-position window; docs/PERFORMANCE.md, twenty-second session).
# Decoding: Inductor picks one KV split when rows x kv heads exceed the SMs, so each program walks a row's whole
# cache: two splits took a step's attention at 2,500-3,900 cached positions from 174 to 117 us per layer (no
# change at 300-1,200).
DECODE_OPTIONS: dict[str, int | bool] = {"SPLIT_KV": 2}
# Folded (a unit's prefill, 96 tokens): the main kernel whatever the query length, in 64 x 64 tiles with 4 warps;
# with the full blocks and static shapes below it took 352 us per layer against 1,067 (long cache), 130 against 350.
FOLDED_OPTIONS: dict[str, int | bool] = {
    "FORCE_USE_FLEX_ATTENTION": True,
    "BLOCK_M": 64,
    "BLOCK_N": 64,
    "num_warps": 4,
    "num_stages": 3,
}
# Folded steps mark the blocks wholly below a row's length full (`step_block_mask(full_blocks=True)`): the kernel
# skips the mask there (429 -> 369 us per layer on its own).
FOLDED_FULL_BLOCKS = True
_compiled: Callable[..., torch.Tensor] | None = None


def _allow_a_compile_per_bucket() -> None:
    """One specialised kernel per step shape (row and token buckets, LLM and TTS: a few dozen) exceeds Dynamo's
    default of 8 recompiles per function, past which it would silently fall back to the unfused implementation
    (the whole score matrix)."""
    import torch._dynamo.config as dynamo

    for name, least in (
        ("recompile_limit", 256),
        ("cache_size_limit", 256),
        ("accumulated_recompile_limit", 1024),
        ("accumulated_cache_size_limit", 1024),
    ):
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(int(getattr(dynamo, name)), least))


def flex_available(device: torch.device) -> bool:
    """Whether the compiled kernel can run here (CUDA with Triton)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def step_block_mask(
    lengths: torch.Tensor,
    num_new: torch.Tensor,
    tokens: int,
    window: int,
    group: int = 1,
    full_blocks: bool = False,
) -> BlockMask:
    """The causal block mask of a static step: row b's query t (its new key at position lengths[b] + t) sees
    keys 0 .. lengths[b] + t. Rows with no new token (num_new = 0) visit only block 0. With `group` > 1 the
    query rows are the folded `group * tokens` rows (row q is token q % tokens). `full_blocks`: the blocks
    wholly below lengths[b] are marked full (every query sees every key: the kernel skips the mask there)."""
    b = lengths.shape[0]
    blocks = -(-window // BLOCK)
    q_len = group * tokens
    q_blocks = -(-q_len // BLOCK)
    device = lengths.device
    # the latest token among each 128-row query block bounds the key blocks it needs
    rows = torch.arange(q_blocks * BLOCK, device=device)  # built on the device: no copy in a graph capture
    last_t = torch.where(rows < q_len, rows % tokens, 0).view(q_blocks, BLOCK).amax(-1)
    needed = (lengths[:, None] + last_t[None, :]) // BLOCK + 1  # (b, q_blocks)
    needed = torch.where(num_new[:, None] > 0, needed, torch.ones_like(needed)).clamp(max=blocks)
    kv_indices = torch.arange(blocks, dtype=torch.int32, device=device).expand(b, 1, q_blocks, blocks)
    full_num: torch.Tensor | None = None
    full_indices: torch.Tensor | None = None
    if full_blocks:
        whole = torch.where(num_new > 0, lengths // BLOCK, 0)[:, None].expand(b, q_blocks).clamp(max=blocks)
        full_num = whole.to(torch.int32).view(b, 1, q_blocks).contiguous()
        full_indices = kv_indices.contiguous()
        needed = needed - whole  # the partial blocks follow the full ones
        kv_indices = (kv_indices + full_num[..., None]).clamp(max=blocks - 1)
    kv_num_blocks = needed.to(torch.int32).view(b, 1, q_blocks)

    def causal(
        batch: torch.Tensor, head: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        return kv_idx <= lengths[batch] + q_idx

    def causal_folded(
        batch: torch.Tensor, head: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        return kv_idx <= lengths[batch] + q_idx % tokens

    return BlockMask.from_kv_blocks(
        kv_num_blocks,
        kv_indices.contiguous(),
        full_num,
        full_indices,
        BLOCK_SIZE=BLOCK,
        mask_mod=causal if group == 1 else causal_folded,
        seq_lengths=(q_len, window),
        compute_q_blocks=False,
    )


def step_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, decode: bool = False
) -> torch.Tensor:
    """q [b, heads, T, hd]; k, v [b, kv_heads, window, hd] (grouped-query) -> [b, heads, T, hd]; or, folded,
    q [b, kv_heads, group*T, hd] -> [b, kv_heads, group*T, hd]. `decode`: one query per head through the
    decoding kernel even where heads and kv heads are as many (the TTS: no group to fold)."""
    global _compiled
    folded = q.shape[1] == k.shape[1] and not decode
    if not q.is_cuda:
        out = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=not folded)
    else:
        if _compiled is None:
            _allow_a_compile_per_bucket()
            # static shapes: a kernel compiled for sizes that may change (Dynamo's default after a second shape)
            # took the folded step's attention 2.5-3x as long; every step is a captured graph, so each shape
            # compiles once, when the warm-up captures it
            _compiled = torch.compile(flex_attention, dynamic=False)
        options = FOLDED_OPTIONS if folded else DECODE_OPTIONS
        out = _compiled(q, k, v, block_mask=block_mask, enable_gqa=not folded, kernel_options=dict(options))
    assert isinstance(out, torch.Tensor)
    return out
