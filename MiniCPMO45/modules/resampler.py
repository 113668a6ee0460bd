"""Perceiver resampler (`resampler.*`): a fixed set of learned queries cross-attends to one slice's ViT
patches and yields `query_num` vectors of the LLM width.

Keys get a 2-D sine-cosine position code of the slice's patch grid; values get none.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


@functools.lru_cache(maxsize=64)
def _sincos_2d_cpu(rows: int, cols: int, dim: int) -> torch.Tensor:
    """`[rows*cols, dim]`: the first half encodes the column index, the second half the row index."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def code(pos: torch.Tensor) -> torch.Tensor:
        angles = pos[..., None] * omega
        return torch.cat((angles.sin(), angles.cos()), dim=-1)

    r = torch.arange(rows, dtype=torch.float64)[:, None].expand(rows, cols)
    c = torch.arange(cols, dtype=torch.float64)[None, :].expand(rows, cols)
    return torch.cat((code(c), code(r)), dim=-1).reshape(rows * cols, dim).float()


def sincos_2d(rows: int, cols: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Cached `[rows*cols, dim]` key position code, resident on `device` in `dtype`."""
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos code needs a width divisible by 4, got {dim}")
    return _sincos_2d_on(rows, cols, dim, torch.device(device), dtype)


@functools.lru_cache(maxsize=64)
def _sincos_2d_on(rows: int, cols: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return _sincos_2d_cpu(rows, cols, dim).to(device=device, dtype=dtype)


class CrossAttention(nn.Module):
    """Multi-head attention with packed q/k/v input projection (the layout of torch's MultiheadAttention)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """q `[B, Q, D]`, k/v `[B, L, D]`, key_mask `[B, L]` true for real keys, or None when all are real."""
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        b, nq, d = q.shape
        hd = d // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, self.heads, hd).transpose(1, 2)

        mask = None if key_mask is None else key_mask[:, None, None, :]
        qh, kh, vh = split(F.linear(q, wq, bq)), split(F.linear(k, wk, bk)), split(F.linear(v, wv, bv))
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, nq, d))


class Resampler(nn.Module):
    def __init__(self, num_queries: int, dim: int, kv_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(num_queries, dim))
        self.kv_proj = nn.Linear(kv_dim, dim, bias=False) if kv_dim != dim else nn.Identity()
        self.attn = CrossAttention(dim, max(dim // 128, 1))
        self.ln_q = nn.LayerNorm(dim, eps=eps)
        self.ln_kv = nn.LayerNorm(dim, eps=eps)
        self.ln_post = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Parameter(torch.empty(dim, dim))

    def forward(
        self, patches: torch.Tensor, tgt_sizes: torch.Tensor | Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """patches `[B, Lmax, kv_dim]` (padded), tgt_sizes `[B, 2]` → `[B, num_queries, dim]`."""
        b, lmax, _ = patches.shape
        x = self.ln_kv(self.kv_proj(patches))
        dim = x.shape[-1]
        sizes = [
            (int(r), int(c)) for r, c in (tgt_sizes.tolist() if torch.is_tensor(tgt_sizes) else tgt_sizes)
        ]
        if len(sizes) != b:
            raise ValueError(f"{len(sizes)} tgt_sizes for {b} slices")
        key_mask = None
        if len(set(sizes)) == 1 and sizes[0][0] * sizes[0][1] == lmax:
            # One size, no padding: one cached code broadcast over the batch and no key mask.
            keys = x + sincos_2d(*sizes[0], dim, x.device, x.dtype)[None]
        else:
            pos = torch.zeros_like(x)
            for i, (rows, cols) in enumerate(sizes):
                pos[i, : rows * cols] = sincos_2d(rows, cols, dim, x.device, x.dtype)
            n_keys = torch.tensor([r * c for r, c in sizes])
            key_mask = (torch.arange(lmax)[None, :] < n_keys[:, None]).to(x.device, non_blocking=True)
            keys = x + pos
        q = self.ln_q(self.query)[None].expand(b, -1, -1)
        out = self.attn(q, keys, x, key_mask)
        return self.ln_post(out) @ self.proj
