"""SigLIP vision encoder with NaViT-style variable-size inputs (`vpm.*`).

Slices of different patch grids are packed into one padded batch; each slice's patch positions are mapped
onto the fixed `image_size // patch_size` grid by bucketizing fractional coordinates, and padding patches are
masked out of attention. The checkpoint already lacks the dropped last layer, so `num_layers` is the number
of layers that run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig


def navit_position_ids(tgt_sizes: torch.Tensor, grid: int, max_patches: int) -> torch.Tensor:
    """Position ids `[B, max_patches]` for slices of `tgt_sizes[b] = (rows, cols)` patches on a grid×grid table."""
    boundaries = torch.arange(1 / grid, 1.0, 1 / grid)
    out = torch.zeros(len(tgt_sizes), max_patches, dtype=torch.long)
    for b, (rows, cols) in enumerate(tgt_sizes.tolist()):
        # Same float32 arithmetic as the reference so edge buckets agree.
        frac_h = torch.arange(0, 1 - 1e-6, 1 / rows)
        frac_w = torch.arange(0, 1 - 1e-6, 1 / cols)
        bucket_h = torch.bucketize(frac_h, boundaries, right=True)
        bucket_w = torch.bucketize(frac_w, boundaries, right=True)
        out[b, : rows * cols] = (bucket_h[:, None] * grid + bucket_w[None, :]).flatten()
    return out


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.grid = cfg.image_size // cfg.patch_size
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size
        )
        self.position_embedding = nn.Embedding(self.grid * self.grid, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """pixels `[B, C, patch, L*patch]` (patches laid out in one row) → `[B, L, D]`."""
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        pos = navit_position_ids(tgt_sizes.cpu(), self.grid, x.shape[1]).to(x.device)
        return x + self.position_embedding(pos)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.head_dim = d // self.n_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        scores = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.float().softmax(-1).to(q.dtype)
        return self.out_proj((probs @ v).transpose(1, 2).reshape(b, n, d))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, layers: list[VisionLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, num_layers: int) -> None:
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder([VisionLayer(cfg) for _ in range(num_layers)])
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """pixels `[B, C, patch, Lmax*patch]`, tgt_sizes `[B, 2]` → `[B, Lmax, D]` (padding rows are junk)."""
        n_patches = tgt_sizes[:, 0] * tgt_sizes[:, 1]
        lmax = pixels.shape[-1] // self.embeddings.patch_size
        valid = torch.arange(lmax, device=pixels.device)[None, :] < n_patches.to(pixels.device)[:, None]
        mask = None if bool(valid.all()) else valid[:, None, None, :]
        x = self.embeddings(pixels, tgt_sizes)
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return self.post_layernorm(x)


def pack_slices(slices: list[torch.Tensor]) -> torch.Tensor:
    """Pad per-slice pixel tensors `[C, patch, L_i*patch]` to one batch `[B, C, patch, Lmax*patch]`."""
    width = max(s.shape[-1] for s in slices)
    return torch.stack([F.pad(s, (0, width - s.shape[-1])) for s in slices])
