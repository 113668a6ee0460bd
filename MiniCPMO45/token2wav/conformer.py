"""The flow's token encoder: a causal Conformer-style stack with 2x upsampling (UpsampleConformerEncoderV2).

Token embeddings (25 Hz) -> linear input layer -> pre-lookahead conv (3 future tokens) -> `num_blocks`
self-attention/FFN layers -> nearest 2x upsample + causal conv -> second linear input layer ->
`num_up_blocks` layers -> LayerNorm. Attention is ESPnet relative-position self-attention (Transformer-XL
style biases u/v, key bias). Parameter names follow the official state dict.

Streaming (`forward_chunk`) keeps two caches:
* cnn cache (b, c, 2 + 2*stride): the last 2 conv1 outputs of the lookahead layer and the last 2*stride
  upsampled frames;
* attention cache (layers, b, heads, 2*t_tokens, 2*d_k), keys and values concatenated on the last axis.
  The token-rate layers' caches are tiled twice along time so both rates share one tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .hparams import ConformerParams


def relative_position_table(size: int, d_model: int, device: torch.device | None = None) -> torch.Tensor:
    """Sinusoidal table for relative distances size-1 ... -(size-1): shape (1, 2*size-1, d_model).

    Row k encodes the distance (size - 1 - k), i.e. the query position minus the key position.
    """
    distance = torch.arange(size - 1, -size, -1, dtype=torch.float32, device=device).unsqueeze(1)
    inv_freq = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / d_model)
    )
    angles = distance * inv_freq
    table = torch.empty(2 * size - 1, d_model, device=device)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table.unsqueeze(0)


class LinearInput(nn.Module):
    """Linear + LayerNorm input layer, scaled by sqrt(d) as the ESPnet relative encoding expects."""

    def __init__(self, in_dim: int, d_model: int) -> None:
        super().__init__()
        self.out = nn.Sequential(nn.Linear(in_dim, d_model), nn.LayerNorm(d_model, eps=1e-5))
        self.scale = math.sqrt(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x) * self.scale


class RelPositionSelfAttention(nn.Module):
    """Multi-head self-attention with relative positions (content bias u, position bias v)."""

    def __init__(self, d_model: int, heads: int, key_bias: bool) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by {heads} heads")
        self.heads = heads
        self.d_k = d_model // heads
        self.linear_q = nn.Linear(d_model, d_model)
        self.linear_k = nn.Linear(d_model, d_model, bias=key_bias)
        self.linear_v = nn.Linear(d_model, d_model)
        self.linear_out = nn.Linear(d_model, d_model)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(heads, self.d_k))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.d_k)

    def forward(
        self,
        x: torch.Tensor,
        pos_table: torch.Tensor,
        cache: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        new_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (b, t, d); pos_table (1, 2*L-1, d) with L = cached + t; cache (b, h, cached, 2*d_k).

        key_mask (b, L) bool, True for valid keys. Returns the output and the new cache (b, h, L, 2*d_k),
        or with `new_only` just this chunk's keys and values (b, h, t, 2*d_k).
        """
        b, t, _ = x.shape
        q = self._split(self.linear_q(x))  # (b, t, h, d_k)
        k = self._split(self.linear_k(x)).transpose(1, 2)  # (b, h, t, d_k)
        v = self._split(self.linear_v(x)).transpose(1, 2)
        chunk_kv = torch.cat([k, v], dim=-1) if new_only else None
        if cache is not None and cache.shape[2] > 0:
            k = torch.cat([cache[..., : self.d_k], k], dim=2)
            v = torch.cat([cache[..., self.d_k :], v], dim=2)
        new_cache = chunk_kv if chunk_kv is not None else torch.cat([k, v], dim=-1)
        total = k.shape[2]

        p = (
            self.linear_pos(pos_table.to(x.dtype))
            .view(pos_table.shape[0], -1, self.heads, self.d_k)
            .transpose(1, 2)
        )
        content = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))  # (b, h, t, L)
        by_distance = torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))  # (b,h,t,2L-1)
        # Query i sits at absolute position (total - t + i); key j at j. Their distance lives in table
        # column (t - 1 + j - i) of the table built for `total` positions.
        rows = torch.arange(t, device=x.device).unsqueeze(1)
        cols = torch.arange(total, device=x.device).unsqueeze(0)
        index = (t - 1 + cols - rows).expand(b, self.heads, t, total)
        position = torch.gather(by_distance, 3, index)
        scores = (content + position) / math.sqrt(self.d_k)

        if key_mask is not None:
            blocked = ~key_mask[:, None, None, :]
            attn = torch.softmax(scores.masked_fill(blocked, -float("inf")), dim=-1).masked_fill(blocked, 0.0)
        else:
            attn = torch.softmax(scores, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, t, self.heads * self.d_k)
        return self.linear_out(out), new_cache


class FeedForward(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d_model, hidden)
        self.w_2 = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerLayer(nn.Module):
    """Pre-norm self-attention + FFN layer (the Conformer layer without its conv/macaron parts)."""

    def __init__(self, d_model: int, heads: int, hidden: int, key_bias: bool) -> None:
        super().__init__()
        self.self_attn = RelPositionSelfAttention(d_model, heads, key_bias)
        self.feed_forward = FeedForward(d_model, hidden)
        self.norm_mha = nn.LayerNorm(d_model, eps=1e-12)
        self.norm_ff = nn.LayerNorm(d_model, eps=1e-12)

    def forward(
        self,
        x: torch.Tensor,
        pos_table: torch.Tensor,
        cache: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        new_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        attended, new_cache = self.self_attn(self.norm_mha(x), pos_table, cache, key_mask, new_only)
        x = x + attended
        x = x + self.feed_forward(self.norm_ff(x))
        return x, new_cache


class PreLookahead(nn.Module):
    """conv1 sees `lookahead` future tokens, conv2 (k=3) is left-causal; residual around both."""

    def __init__(self, channels: int, lookahead: int) -> None:
        super().__init__()
        self.lookahead = lookahead
        self.conv1 = nn.Conv1d(channels, channels, kernel_size=lookahead + 1)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Whole sequence, x (b, t, c): future tokens past the end are zeros."""
        h = F.pad(x.transpose(1, 2), (0, self.lookahead))
        h = F.leaky_relu(self.conv1(h))
        h = self.conv2(F.pad(h, (2, 0)))
        return h.transpose(1, 2) + x

    def forward_chunk(self, x: torch.Tensor, cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (b, t, c) whose last `lookahead` frames are lookahead only; returns t - lookahead frames."""
        h = F.leaky_relu(self.conv1(x.transpose(1, 2)))
        if cache is None:
            cache = h.new_zeros(h.shape[0], h.shape[1], 2)
        h = torch.cat([cache, h], dim=2)
        # The last two conv1 outputs (taken after the join, so a 1-frame chunk still leaves 2 frames).
        new_cache = h[..., h.shape[2] - 2 :]
        h = self.conv2(h)
        return h.transpose(1, 2) + x[:, : x.shape[1] - self.lookahead], new_cache

    def forward_ragged(
        self, x: torch.Tensor, cache: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward_chunk` for padded rows: row b's outputs 0..valid[b]-1 are real (the rest padding), and
        its new cache holds the last two conv1 outputs before that end."""
        h = F.leaky_relu(self.conv1(x.transpose(1, 2)))
        h = torch.cat([cache, h], dim=2)
        new_cache = take_frames(h, valid, 2)
        h = self.conv2(h)
        return h.transpose(1, 2) + x[:, : x.shape[1] - self.lookahead], new_cache


def take_frames(x: torch.Tensor, start: torch.Tensor, count: int) -> torch.Tensor:
    """Frames start[b] .. start[b]+count-1 of each row of x (b, c, t) -> (b, c, count)."""
    index = start[:, None, None] + torch.arange(count, device=x.device)
    return torch.gather(x, 2, index.expand(x.shape[0], x.shape[1], count))


def left_padded_mask(lengths: torch.Tensor, slots: int) -> torch.Tensor:
    """(b, slots) bool: the last lengths[b] slots of each row are valid."""
    return torch.arange(slots, device=lengths.device)[None, :] >= slots - lengths[:, None]


def right_padded_mask(lengths: torch.Tensor, slots: int) -> torch.Tensor:
    """(b, slots) bool: the first lengths[b] slots of each row are valid."""
    return torch.arange(slots, device=lengths.device)[None, :] < lengths[:, None]


class CausalUpsample(nn.Module):
    """Nearest-neighbour upsampling by `stride`, then a left-causal conv of kernel 2*stride+1."""

    def __init__(self, channels: int, stride: int, scale_factor: float) -> None:
        super().__init__()
        if float(scale_factor) != float(stride):
            raise ValueError("up_scale_factor must equal up_stride")
        self.stride = stride
        self.conv = nn.Conv1d(channels, channels, kernel_size=2 * stride + 1)

    def forward(
        self, x: torch.Tensor, cache: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (b, c, t) -> (b, c, stride*t) and the new cache (last 2*stride upsampled frames)."""
        up = torch.repeat_interleave(x, self.stride, dim=2)
        if cache is None:
            cache = up.new_zeros(up.shape[0], up.shape[1], 2 * self.stride)
        up = torch.cat([cache, up], dim=2)
        return self.conv(up), up[..., -2 * self.stride :]

    def forward_ragged(
        self, x: torch.Tensor, cache: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded rows with valid[b] real input frames: the new cache ends at row b's last real frame."""
        up = torch.cat([cache, torch.repeat_interleave(x, self.stride, dim=2)], dim=2)
        return self.conv(up), take_frames(up, valid * self.stride, 2 * self.stride)


class UpsampleConformerEncoder(nn.Module):
    def __init__(self, p: ConformerParams) -> None:
        super().__init__()
        if p.up_stride != 2:
            raise ValueError("the packed streaming cache layout assumes up_stride 2")
        self.p = p
        d = p.output_size
        self.embed = LinearInput(p.input_size, d)
        self.pre_lookahead_layer = PreLookahead(d, p.pre_lookahead_len)
        self.encoders = nn.ModuleList(
            ConformerLayer(d, p.attention_heads, p.linear_units, p.key_bias) for _ in range(p.num_blocks)
        )
        self.up_layer = CausalUpsample(d, p.up_stride, p.up_scale_factor)
        self.up_embed = LinearInput(d, d)
        self.up_encoders = nn.ModuleList(
            ConformerLayer(d, p.attention_heads, p.linear_units, p.key_bias) for _ in range(p.num_up_blocks)
        )
        self.after_norm = nn.LayerNorm(d, eps=1e-5)

    @property
    def lookahead(self) -> int:
        return self.p.pre_lookahead_len

    @property
    def up_rate(self) -> int:
        return self.p.up_stride

    def forward(self, xs: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Whole utterance: xs (b, t, input_size) -> (b, up_rate*t, output_size)."""
        d = self.p.output_size
        t = xs.shape[1]
        mask = None
        if lengths is not None:
            mask = torch.arange(t, device=xs.device)[None, :] < lengths[:, None]
        x = self.pre_lookahead_layer(self.embed(xs))
        table = relative_position_table(t, d, xs.device)
        for layer in self.encoders:
            x, _ = layer(x, table, key_mask=mask)
        x, _ = self.up_layer(x.transpose(1, 2))
        x = self.up_embed(x.transpose(1, 2))
        table = relative_position_table(x.shape[1], d, xs.device)
        up_mask = None if mask is None else torch.repeat_interleave(mask, self.up_rate, dim=1)
        for layer in self.up_encoders:
            x, _ = layer(x, table, key_mask=up_mask)
        return self.after_norm(x)

    def forward_chunk(
        self,
        xs: torch.Tensor,
        last_chunk: bool,
        cnn_cache: torch.Tensor | None,
        att_cache: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One streaming chunk of token embeddings (b, t, input_size), the last `lookahead` being lookahead.

        On the last chunk the lookahead is zero padding, so every input token is emitted.
        Returns (hidden (b, up_rate*t_out, d), new cnn cache, new packed attention cache).
        """
        d = self.p.output_size
        n_low = len(self.encoders)
        cached_tokens = 0 if att_cache is None else att_cache.shape[3] // 2
        if att_cache is not None and att_cache.shape[3] % 2:
            raise ValueError(f"packed conformer cache must have an even time length, got {att_cache.shape}")
        x = self.embed(xs)
        if last_chunk:
            x = F.pad(x, (0, 0, 0, self.lookahead))
        lookahead_cache = None if cnn_cache is None else cnn_cache[:, :, :2]
        upsample_cache = None if cnn_cache is None else cnn_cache[:, :, 2:]
        x, new_lookahead_cache = self.pre_lookahead_layer.forward_chunk(x, lookahead_cache)

        table = relative_position_table(cached_tokens + x.shape[1], d, xs.device)
        low_caches = []
        for idx, layer in enumerate(self.encoders):
            cache = None if att_cache is None else att_cache[idx, :, :, :cached_tokens]
            x, new = layer(x, table, cache)
            low_caches.append(new)

        x, new_upsample_cache = self.up_layer(x.transpose(1, 2), upsample_cache)
        x = self.up_embed(x.transpose(1, 2))
        table = relative_position_table(cached_tokens * self.up_rate + x.shape[1], d, xs.device)
        high_caches = []
        for idx, layer in enumerate(self.up_encoders):
            cache = None if att_cache is None else att_cache[n_low + idx]
            x, new = layer(x, table, cache)
            high_caches.append(new)
        x = self.after_norm(x)

        low = torch.stack(low_caches, dim=0)
        packed = torch.cat([low.repeat(1, 1, 1, self.up_rate, 1), torch.stack(high_caches, dim=0)], dim=0)
        new_cnn = torch.cat([new_lookahead_cache, new_upsample_cache], dim=2)
        return x, new_cnn, packed

    def forward_ragged(
        self,
        xs: torch.Tensor,
        n_tokens: torch.Tensor,
        valid: torch.Tensor,
        cnn_cache: torch.Tensor,
        low_cache: torch.Tensor,
        up_cache: torch.Tensor,
        cached_frames: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward_chunk` for B streams at different points of their turns, padded to common shapes.

        xs (B, U + lookahead, input_size): row b's first n_tokens[b] embeddings are real; the rest are
        zeroed after the input layer, which is exactly the last chunk's zero look-ahead. valid[b] is the
        number of real outputs (n - lookahead, or n on a last chunk), at most U.
        low_cache (low layers, B, h, S, 2*d_k) and up_cache (up layers, B, h, 2*S, 2*d_k) hold each row's
        cached keys left-padded (the last cached_frames[b] / 2 and cached_frames[b] slots are real), so
        every real query/key pair keeps its relative distance; padded keys are masked out.

        Returns (hidden (B, 2U, d), new cnn cache (B, d, 2 + 2*stride), this chunk's keys/values of the
        low layers (low, B, h, U, 2*d_k) and of the up layers (up, B, h, 2U, 2*d_k)).
        """
        d = self.p.output_size
        slots = xs.shape[1] - self.lookahead
        x = self.embed(xs)
        x = x * right_padded_mask(n_tokens, xs.shape[1]).unsqueeze(-1).to(x.dtype)
        x, new_lookahead_cache = self.pre_lookahead_layer.forward_ragged(x, cnn_cache[:, :, :2], valid)

        cached = low_cache.shape[3]
        mask = torch.cat(
            [left_padded_mask(cached_frames // 2, cached), right_padded_mask(valid, slots)], dim=1
        )
        table = relative_position_table(cached + slots, d, xs.device)
        low = []
        for idx, layer in enumerate(self.encoders):
            x, new = layer(x, table, low_cache[idx], mask, new_only=True)
            low.append(new)

        x, new_upsample_cache = self.up_layer.forward_ragged(x.transpose(1, 2), cnn_cache[:, :, 2:], valid)
        x = self.up_embed(x.transpose(1, 2))
        cached = up_cache.shape[3]
        frames = x.shape[1]
        mask = torch.cat(
            [left_padded_mask(cached_frames, cached), right_padded_mask(valid * self.up_rate, frames)], dim=1
        )
        table = relative_position_table(cached + frames, d, xs.device)
        high = []
        for idx, layer in enumerate(self.up_encoders):
            x, new = layer(x, table, up_cache[idx], mask, new_only=True)
            high.append(new)
        x = self.after_norm(x)
        new_cnn = torch.cat([new_lookahead_cache, new_upsample_cache], dim=2)
        return x, new_cnn, torch.stack(low, dim=0), torch.stack(high, dim=0)
