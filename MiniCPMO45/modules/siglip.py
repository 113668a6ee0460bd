"""SigLIP vision encoder with NaViT-style variable-size inputs (`vpm.*`).

Slices of different patch grids are packed into one padded batch; each slice's patch positions are mapped
onto the fixed `image_size // patch_size` grid by bucketizing fractional coordinates, and padding patches are
masked out of attention. The checkpoint already lacks the dropped last layer, so `num_layers` is the number
of layers that run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from .compiled import fallback_on_error


def navit_position_ids(tgt_sizes: torch.Tensor, grid: int, max_patches: int) -> torch.Tensor:
    """Position ids `[B, max_patches]` for slices of `tgt_sizes[b] = (rows, cols)` patches on a grid×grid table.

    Padding positions get id 0 (their rows are junk and masked out of attention).
    """
    out = torch.zeros(len(tgt_sizes), max_patches, dtype=torch.long)
    for b, (rows, cols) in enumerate(tgt_sizes.tolist()):
        out[b, : rows * cols] = grid_position_ids(rows, cols, grid)
    return out


@functools.lru_cache(maxsize=256)
def grid_position_ids(rows: int, cols: int, grid: int) -> torch.Tensor:
    """Position ids `[rows*cols]` (CPU) of one rows×cols slice bucketized onto the grid×grid table."""
    if rows < 1 or cols < 1:
        raise ValueError(f"a slice needs at least one patch row and column, got {rows}x{cols}")
    boundaries = torch.arange(1 / grid, 1.0, 1 / grid)
    # Same float32 arithmetic as the reference so edge buckets agree.
    frac_h = torch.arange(0, 1 - 1e-6, 1 / rows)
    frac_w = torch.arange(0, 1 - 1e-6, 1 / cols)
    bucket_h = torch.bucketize(frac_h, boundaries, right=True)
    bucket_w = torch.bucketize(frac_w, boundaries, right=True)
    return (bucket_h[:, None] * grid + bucket_w[None, :]).flatten()


def uniform_patch_count(sizes: list[tuple[int, int]], width: int) -> bool:
    """True when every slice fills all `width` patch positions (no padding, so no attention mask needed)."""
    return all(rows * cols == width for rows, cols in sizes)


def size_list(tgt_sizes: torch.Tensor | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """`tgt_sizes` as host (rows, cols) tuples; a tensor on an accelerator costs one sync here."""
    if isinstance(tgt_sizes, torch.Tensor):
        tgt_sizes = tgt_sizes.tolist()
    return [(int(r), int(c)) for r, c in tgt_sizes]


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.grid = cfg.image_size // cfg.patch_size
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size
        )
        self.position_embedding = nn.Embedding(self.grid * self.grid, cfg.hidden_size)
        self._ids_on_device: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def position_ids(self, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        """Cached `[rows*cols]` position ids of one slice size, resident on `device`."""
        key = (rows, cols, device)
        ids = self._ids_on_device.get(key)
        if ids is None:
            ids = grid_position_ids(rows, cols, self.grid).to(device)
            self._ids_on_device[key] = ids
        return ids

    def forward(
        self, pixels: torch.Tensor, tgt_sizes: torch.Tensor | Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """pixels `[B, C, patch, L*patch]` (patches laid out in one row) → `[B, L, D]`."""
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        sizes = size_list(tgt_sizes)
        width = x.shape[1]
        if len(set(sizes)) == 1 and uniform_patch_count(sizes, width):
            # One size for the whole batch: a single [L, D] row block broadcast over the batch.
            return x + self.position_embedding(self.position_ids(*sizes[0], x.device))[None]
        ids = torch.zeros(len(sizes), width, dtype=torch.long, device=x.device)
        for b, (rows, cols) in enumerate(sizes):
            ids[b, : rows * cols] = self.position_ids(rows, cols, x.device)
        return x + self.position_embedding(ids)


class VisionAttention(nn.Module):
    """The attention's projections; `encoder_layer` runs them (fused SDPA: flash without a mask, the
    memory-efficient kernel with a key mask; neither materialises the [B, heads, L, L] scores)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.head_dim = d // self.n_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def encoder_layer(
    x: torch.Tensor,
    mask: torch.Tensor | None,
    tensors: tuple[torch.Tensor, ...],
    eps: float,
    heads: int,
) -> torch.Tensor:
    """One encoder layer as a plain function of its tensors (`VisionLayer.tensors()`), so that one
    `torch.compile` of it serves every layer (`SiglipVisionTransformer.fuse_layers`)."""
    ln1_w, ln1_b, wq, bq, wk, bk, wv, bv, wo, bo, ln2_w, ln2_b, w1, b1, w2, b2 = tensors
    b, n, d = x.shape

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, n, heads, d // heads).transpose(1, 2)

    h = F.layer_norm(x, (d,), ln1_w, ln1_b, eps)
    q, k, v = split(F.linear(h, wq, bq)), split(F.linear(h, wk, bk)), split(F.linear(h, wv, bv))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    x = x + F.linear(out.transpose(1, 2).reshape(b, n, d), wo, bo)
    h = F.layer_norm(x, (d,), ln2_w, ln2_b, eps)
    return x + F.linear(F.gelu(F.linear(h, w1, b1), approximate="tanh"), w2, b2)


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        a, m = self.self_attn, self.mlp
        return (
            self.layer_norm1.weight,
            self.layer_norm1.bias,
            a.q_proj.weight,
            a.q_proj.bias,
            a.k_proj.weight,
            a.k_proj.bias,
            a.v_proj.weight,
            a.v_proj.bias,
            a.out_proj.weight,
            a.out_proj.bias,
            self.layer_norm2.weight,
            self.layer_norm2.bias,
            m.fc1.weight,
            m.fc1.bias,
            m.fc2.weight,
            m.fc2.bias,
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return encoder_layer(x, mask, self.tensors(), self.layer_norm1.eps, self.self_attn.n_heads)


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
        self.layer_fn: Callable[..., torch.Tensor] = encoder_layer

    def fuse_layers(self, backend: Any = "inductor") -> None:
        """Run the layers through one `torch.compile` of `encoder_layer` (dynamic shapes: one compile for
        every layer and batch; the element-wise work around the matmuls fused). Falls back to the eager
        function, for good, if the compiled one fails."""
        compiled = torch.compile(encoder_layer, dynamic=True, fullgraph=True, backend=backend)
        self.layer_fn = fallback_on_error(compiled, encoder_layer, "the vision encoder's compiled layer")
        # compile now, not in the first live unit: one slice (a size Dynamo specialises), a batch of two, and
        # two slices of different sizes (the masked path of HD slices and chat images)
        w = self.embeddings.patch_embedding.weight
        patch = self.embeddings.patch_size
        with torch.no_grad():
            for sizes in ([(4, 4)], [(4, 4)] * 2, [(4, 4), (2, 4)]):
                pixels = torch.zeros(
                    len(sizes), w.shape[1], patch, 16 * patch, dtype=w.dtype, device=w.device
                )
                self(pixels, sizes)

    def forward(
        self, pixels: torch.Tensor, tgt_sizes: torch.Tensor | Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """pixels `[B, C, patch, Lmax*patch]`, tgt_sizes `[B, 2]` → `[B, Lmax, D]` (padding rows are junk)."""
        sizes = size_list(tgt_sizes)
        lmax = pixels.shape[-1] // self.embeddings.patch_size
        mask = None
        if not uniform_patch_count(sizes, lmax):
            n_patches = torch.tensor([r * c for r, c in sizes])
            valid = torch.arange(lmax)[None, :] < n_patches[:, None]
            mask = valid[:, None, None, :].to(pixels.device, non_blocking=True)
        x = self.embeddings(pixels, sizes)
        for layer in self.encoder.layers:
            x = self.layer_fn(x, mask, layer.tensors(), layer.layer_norm1.eps, layer.self_attn.n_heads)
        return self.post_layernorm(x)


def pack_slices(slices: list[torch.Tensor]) -> torch.Tensor:
    """Pad per-slice pixel tensors `[C, patch, L_i*patch]` to one batch `[B, C, patch, Lmax*patch]`."""
    width = max(s.shape[-1] for s in slices)
    return torch.stack([F.pad(s, (0, width - s.shape[-1])) for s in slices])
