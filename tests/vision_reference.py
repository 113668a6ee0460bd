"""The previous vision implementation, kept as the reference for the fast path: dense float32 attention
scores with an explicit [B, 1, 1, L] key mask, one padded batch, position ids and sin-cos key codes built
slice by slice on the host. Used by tests/test_vision_fast_path.py and bench/vision_gpu.py (no pytest here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from MiniCPMO45.model import MiniCPMO
from MiniCPMO45.modules.resampler import Resampler, _sincos_2d_cpu
from MiniCPMO45.modules.siglip import SiglipVisionTransformer, VisionAttention, VisionLayer, pack_slices


def ref_position_ids(tgt_sizes: list[tuple[int, int]], grid: int, width: int) -> torch.Tensor:
    boundaries = torch.arange(1 / grid, 1.0, 1 / grid)
    out = torch.zeros(len(tgt_sizes), width, dtype=torch.long)
    for b, (rows, cols) in enumerate(tgt_sizes):
        bh = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / rows), boundaries, right=True)
        bw = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / cols), boundaries, right=True)
        out[b, : rows * cols] = (bh[:, None] * grid + bw[None, :]).flatten()
    return out


def _valid(sizes: list[tuple[int, int]], width: int, device: torch.device) -> torch.Tensor:
    n_patches = torch.tensor([r * c for r, c in sizes])
    return (torch.arange(width)[None, :] < n_patches[:, None]).to(device)


def _ref_attention(attn: VisionAttention, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    b, n, d = x.shape

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, n, attn.n_heads, attn.head_dim).transpose(1, 2)

    q, k, v = heads(attn.q_proj(x)), heads(attn.k_proj(x)), heads(attn.v_proj(x))
    scores = (q @ k.transpose(-1, -2)).float() * attn.head_dim**-0.5
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1).to(q.dtype)
    return attn.out_proj((probs @ v).transpose(1, 2).reshape(b, n, d))


def _ref_layer(layer: VisionLayer, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    x = x + _ref_attention(layer.self_attn, layer.layer_norm1(x), valid)
    return x + layer.mlp(layer.layer_norm2(x))


def ref_vpm(vpm: SiglipVisionTransformer, pixels: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
    emb = vpm.embeddings
    x = emb.patch_embedding(pixels).flatten(2).transpose(1, 2)
    width = x.shape[1]
    x = x + emb.position_embedding(ref_position_ids(sizes, emb.grid, width).to(x.device))
    valid = _valid(sizes, width, x.device)
    for layer in vpm.encoder.layers:
        x = _ref_layer(layer, x, valid)
    return vpm.post_layernorm(x)


def ref_resampler(res: Resampler, patches: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
    b, width, _ = patches.shape
    x = res.ln_kv(res.kv_proj(patches))
    dim = x.shape[-1]
    pos = torch.zeros_like(x)
    for i, (rows, cols) in enumerate(sizes):
        pos[i, : rows * cols] = _sincos_2d_cpu(rows, cols, dim).to(x.device, x.dtype)
    valid = _valid(sizes, width, x.device)
    q = res.ln_q(res.query)[None].expand(b, -1, -1)
    out = _ref_attention_packed(res, q, x + pos, x, valid)
    return res.ln_post(out) @ res.proj


def _ref_attention_packed(
    res: Resampler, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    attn = res.attn
    wq, wk, wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    b, nq, d = q.shape
    hd = d // attn.heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, -1, attn.heads, hd).transpose(1, 2)

    qh, kh, vh = split(F.linear(q, wq, bq)), split(F.linear(k, wk, bk)), split(F.linear(v, wv, bv))
    scores = (qh @ kh.transpose(-1, -2)).float() * hd**-0.5
    probs = scores.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1).to(qh.dtype)
    return attn.out_proj((probs @ vh).transpose(1, 2).reshape(b, nq, d))


def ref_vision_embeds(
    model: MiniCPMO, slices: list[torch.Tensor], sizes: list[tuple[int, int]]
) -> torch.Tensor:
    """One padded batch of every slice, whatever the sizes (the way the engine ran before the fast path)."""
    assert model.vpm is not None and model.resampler is not None
    pixels = pack_slices([s.to(model.device, model.dtype) for s in slices])
    patches = ref_vpm(model.vpm, pixels, sizes)
    return ref_resampler(model.resampler, patches, sizes)
