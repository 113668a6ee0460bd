"""The flow-matching estimator: a DiT over mel frames with adaLN-zero conditioning on the ODE time.

Input per frame: [x ; mu ; speaker ; cond] (4 x 80 = 320 channels) -> in_proj -> `depth` blocks -> final
adaLN layer -> 80 channels. Each block modulates three branches (attention with q/k LayerNorm, a causal
conv block, a tanh-GELU MLP) with shift/scale/gate vectors predicted from the time embedding.

Streaming (`forward_chunk`) keeps per block a conv cache (b, 2*hidden, 2) (the last two inputs of both
causal convs) and a KV cache (b, heads, t, 2*head_dim). New keys are placed *before* the cached ones (the
official layout; attention has no positions or mask, so the order only matters for cache trimming).

The padded batch path (`forward_ragged`) instead reads and writes a KV store in place (b, heads, C, 2*head_dim):
each row writes its new keys at the positions it is given and attends over the store positions its mask marks
(see `kv_store.py`); since order does not matter, no cache is ever joined or copied.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..modules.compiled import fallback_on_error
from .conformer import take_frames
from .hparams import DiTParams

TIME_SCALE = 1000.0
TIME_FREQ_DIM = 256


def timestep_frequencies(dim: int = TIME_FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)


def timestep_features(
    t: torch.Tensor, dim: int = TIME_FREQ_DIM, max_period: float = 10000.0, freqs: torch.Tensor | None = None
) -> torch.Tensor:
    """Sinusoidal features of (already scaled) times t (n,) -> (n, dim): [cos | sin].

    `freqs` (dim/2,) is `timestep_frequencies(dim, max_period)` already on t's device (no host copy)."""
    if freqs is None:
        freqs = timestep_frequencies(dim, max_period)
    # float32 whatever t's dtype: the scaled times reach ~1000, past what float16 resolves
    args = t.float()[:, None] * freqs.float()[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype)


class TimeEmbedding(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIME_FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        # Computed on the host once (as before, per call) and moved with .to(): no copy inside a CUDA graph.
        self.register_buffer("freqs", timestep_frequencies(TIME_FREQ_DIM), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t * TIME_SCALE, freqs=self.freqs))


class QKNormAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(hidden, inner)
        self.to_k = nn.Linear(hidden, inner)
        self.to_v = nn.Linear(hidden, inner)
        self.q_norm = nn.LayerNorm(head_dim)
        self.k_norm = nn.LayerNorm(head_dim)
        self.proj = nn.Linear(inner, hidden)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        write_pos: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k, v (b, heads, t, head_dim); cache (b, h, t_cache, 2*head_dim); key_mask (b, t [+ t_cache]) bool,
        True for valid keys (new keys first, then the cached ones). Returns the attention output (b, t,
        heads*head_dim), before `proj`, and the new cache.

        With `write_pos` (b, t) the cache is a store (b, h, C, 2*head_dim): this chunk's keys and values are
        written into it in place at those positions, and the attention runs over the store with key_mask
        (b, C). Returns the output and the store."""
        b, _, t, _ = q.shape
        if write_pos is not None:
            if cache is None or key_mask is None:
                raise ValueError("a store write needs the store and its key mask")
            idx = write_pos[:, None, :, None].expand(b, self.heads, t, 2 * self.head_dim)
            cache.scatter_(2, idx, torch.cat([k, v], dim=3).to(cache.dtype))
            # Padding frames all landed on the last (scratch) position. Masked keys still enter the kernel's
            # arithmetic (0 * inf is NaN), so the scratch is zeroed: a padding row's float16 junk there
            # would otherwise poison every row that later reuses this store row.
            cache[:, :, -1].zero_()
            k, v = cache[..., : self.head_dim], cache[..., self.head_dim :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
            return out.transpose(1, 2).reshape(b, t, -1), cache
        if cache is not None:
            k = torch.cat([k, cache[..., : self.head_dim]], dim=2)
            v = torch.cat([v, cache[..., self.head_dim :]], dim=2)
        new_cache = torch.cat([k, v], dim=3)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(b, t, -1), new_cache


class CausalConvBlock(nn.Module):
    """conv(k=3, left-causal) -> LayerNorm -> Mish -> conv(k=3, left-causal), over (b, t, c).

    The module keys (`block.1`, `block.3`, `block.6`) are those of the official checkpoint. Its work runs in
    `block_output` (`causal_conv`).
    """

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.channels = channels
        self.context = kernel_size - 1
        self.block = nn.ModuleDict(
            {
                "1": nn.Conv1d(channels, channels, kernel_size),
                "3": nn.LayerNorm(channels),
                "6": nn.Conv1d(channels, channels, kernel_size),
            }
        )


class DiTMLP(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, inner)
        self.fc2 = nn.Linear(inner, hidden)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def _norm(x: torch.Tensor) -> torch.Tensor:
    """The blocks' LayerNorm without affine parameters (eps 1e-6)."""
    return F.layer_norm(x, (x.shape[-1],), None, None, 1e-6)


def _left_context(
    x: torch.Tensor, cache: torch.Tensor | None, valid: torch.Tensor | None, context: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (b, c, t) with its cached left context prepended, and the new cache: the context frames before
    the end (or before row b's first padding frame, with `valid`)."""
    if cache is None:
        cache = x.new_zeros(x.shape[0], x.shape[1], context)
    x = torch.cat([cache, x], dim=2)
    if valid is None:
        return x, x[..., x.shape[2] - context :]
    return x, take_frames(x, valid, context)


def causal_conv(
    x: torch.Tensor,
    cache: torch.Tensor | None,
    valid: torch.Tensor | None,
    w1: torch.Tensor,
    b1: torch.Tensor,
    ln_w: torch.Tensor,
    ln_b: torch.Tensor,
    ln_eps: float,
    w6: torch.Tensor,
    b6: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`CausalConvBlock` on x (b, t, c); cache (b, 2c, k-1) holds both convs' left context. Returns (y, new
    cache). valid (b,): row b's first valid[b] frames are real (the rest right padding); its new cache then
    ends at its last real frame."""
    channels, context = x.shape[2], w1.shape[2] - 1
    first = second = None
    if cache is not None:
        first, second = cache[:, :channels], cache[:, channels:]
    h, new_first = _left_context(x.transpose(1, 2), first, valid, context)
    h = F.conv1d(h, w1, b1)
    h = F.mish(F.layer_norm(h.transpose(1, 2), (channels,), ln_w, ln_b, ln_eps))
    h, new_second = _left_context(h.transpose(1, 2), second, valid, context)
    h = F.conv1d(h, w6, b6)
    return h.transpose(1, 2), torch.cat([new_first, new_second], dim=1)


def block_attention_inputs(
    x: torch.Tensor, c: torch.Tensor, tensors: tuple[torch.Tensor, ...], heads: int, qk_eps: float
) -> tuple[torch.Tensor, ...]:
    """A block's adaLN vectors from the time embedding c, and its attention inputs from x (b, t, hidden):
    returns (q, k, v (b, heads, t, head_dim), then the nine shift/scale/gate vectors)."""
    ada_w, ada_b, wq, bq, wk, bk, wv, bv, qn_w, qn_b, kn_w, kn_b = tensors
    mods = F.linear(F.silu(c), ada_w, ada_b).chunk(9, dim=-1)
    h = _modulate(_norm(x), mods[0], mods[1])
    b, t, _ = h.shape

    def heads_of(y: torch.Tensor) -> torch.Tensor:
        return y.view(b, t, heads, -1).transpose(1, 2)

    head_dim = qn_w.shape[0]
    q = F.layer_norm(heads_of(F.linear(h, wq, bq)), (head_dim,), qn_w, qn_b, qk_eps)
    k = F.layer_norm(heads_of(F.linear(h, wk, bk)), (head_dim,), kn_w, kn_b, qk_eps)
    v = heads_of(F.linear(h, wv, bv))
    return (q, k, v, *mods)


def block_output(
    x: torch.Tensor,
    attn: torch.Tensor,
    mods: tuple[torch.Tensor, ...],
    conv_cache: torch.Tensor | None,
    valid: torch.Tensor | None,
    tensors: tuple[torch.Tensor, ...],
    conv_eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rest of a block after its attention (attn (b, t, heads*head_dim), before `proj`): the gated
    attention, conv and MLP branches. Returns (x, new conv cache)."""
    proj_w, proj_b, w1, b1, ln_w, ln_b, w6, b6, fc1_w, fc1_b, fc2_w, fc2_b = tensors
    _, _, gate_attn, shift_mlp, scale_mlp, gate_mlp, shift_conv, scale_conv, gate_conv = mods
    x = x + gate_attn * F.linear(attn, proj_w, proj_b)
    h, new_conv = causal_conv(
        _modulate(_norm(x), shift_conv, scale_conv), conv_cache, valid, w1, b1, ln_w, ln_b, conv_eps, w6, b6
    )
    x = x + gate_conv * h
    h = _modulate(_norm(x), shift_mlp, scale_mlp)
    x = x + gate_mlp * F.linear(F.gelu(F.linear(h, fc1_w, fc1_b), approximate="tanh"), fc2_w, fc2_b)
    return x, new_conv


class BlockKernels:
    """The two halves of a DiT block around its attention: eager, or one `torch.compile` of each (dynamic
    shapes: one compile serves every block, batch and chunk length; `DiT.fuse_blocks`)."""

    def __init__(self, backend: object | None = None) -> None:
        if backend is None:
            self.attention_inputs: Callable[..., tuple[torch.Tensor, ...]] = block_attention_inputs
            self.output: Callable[..., tuple[torch.Tensor, torch.Tensor]] = block_output
            return
        options = {"dynamic": True, "fullgraph": True, "backend": backend}
        self.attention_inputs = fallback_on_error(
            torch.compile(block_attention_inputs, **options), block_attention_inputs, "a DiT block's inputs"
        )
        self.output = fallback_on_error(
            torch.compile(block_output, **options), block_output, "a DiT block's output"
        )


EAGER_BLOCK = BlockKernels()


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, head_dim: int, mlp_ratio: float) -> None:
        super().__init__()
        self.attn = QKNormAttention(hidden, heads, head_dim)
        self.conv = CausalConvBlock(hidden)
        self.mlp = DiTMLP(hidden, int(hidden * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 9 * hidden))
        self.kernels = EAGER_BLOCK

    def input_tensors(self) -> tuple[torch.Tensor, ...]:
        a, ada = self.attn, self.adaLN_modulation[1]
        return (
            ada.weight,
            ada.bias,
            a.to_q.weight,
            a.to_q.bias,
            a.to_k.weight,
            a.to_k.bias,
            a.to_v.weight,
            a.to_v.bias,
            a.q_norm.weight,
            a.q_norm.bias,
            a.k_norm.weight,
            a.k_norm.bias,
        )

    def output_tensors(self) -> tuple[torch.Tensor, ...]:
        conv, mlp = self.conv.block, self.mlp
        return (
            self.attn.proj.weight,
            self.attn.proj.bias,
            conv["1"].weight,
            conv["1"].bias,
            conv["3"].weight,
            conv["3"].bias,
            conv["6"].weight,
            conv["6"].bias,
            mlp.fc1.weight,
            mlp.fc1.bias,
            mlp.fc2.weight,
            mlp.fc2.bias,
        )

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        conv_cache: torch.Tensor | None = None,
        kv_cache: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        write_pos: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """valid (b,) real frames per row (padded chunks): the conv cache then ends at each row's last real
        frame. write_pos: the KV cache is a store written in place (`QKNormAttention.attend`)."""
        q, k, v, *mods = self.kernels.attention_inputs(
            x, c, self.input_tensors(), self.attn.heads, self.attn.q_norm.eps
        )
        out, new_kv = self.attn.attend(q, k, v, kv_cache, key_mask, write_pos)
        x, new_conv = self.kernels.output(
            x, out, tuple(mods), conv_cache, valid, self.output_tensors(), self.conv.block["3"].eps
        )
        return x, new_conv, new_kv


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, p: DiTParams) -> None:
        super().__init__()
        self.p = p
        self.t_embedder = TimeEmbedding(p.hidden_size)
        self.in_proj = nn.Linear(p.in_channels, p.hidden_size)
        self.blocks = nn.ModuleList(
            DiTBlock(p.hidden_size, p.num_heads, p.head_dim, p.mlp_ratio) for _ in range(p.depth)
        )
        self.final_layer = FinalLayer(p.hidden_size, p.out_channels)

    def fuse_blocks(self, backend: object = "inductor") -> None:
        """Run every block's element-wise work as kernels fused by `torch.compile` (a GPU's flow graphs are
        bound by their kernel count: some 45 per block and ODE step eagerly)."""
        kernels = BlockKernels(backend)
        for block in self.blocks:
            block.kernels = kernels
        self._compile_now()

    @torch.inference_mode()  # as the vocoder runs: Dynamo guards on it
    def _compile_now(self) -> None:
        """Run every path once on dummy rows so the compiles happen here, not in a live round: the padded
        rounds over the store, and the whole-sequence and chunk paths (a voice's prompt). Dynamic shapes:
        later batches and chunk lengths reuse them."""
        p, w = self.p, self.in_proj.weight
        rows, frames, slots = 2, 4, 8  # rows come in pairs (classifier-free guidance), never one
        mel = p.out_channels

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=w.dtype, device=w.device)

        def chunk() -> tuple[torch.Tensor, ...]:
            t = torch.full((rows,), 0.5, dtype=w.dtype, device=w.device)
            return (
                zeros(rows, mel, frames),
                zeros(rows, mel, frames),
                t,
                zeros(rows, mel),
                zeros(rows, mel, frames),
            )

        store = zeros(p.depth, rows, p.num_heads, slots, 2 * p.head_dim)
        valid = torch.full((rows,), frames, dtype=torch.long, device=w.device)
        write = torch.arange(frames, device=w.device)[None].expand(rows, frames)
        key_mask = torch.arange(slots, device=w.device)[None].expand(rows, slots) < frames
        conv = zeros(p.depth, rows, 2 * p.hidden_size, 2)
        self.forward_ragged(*chunk(), conv, store, key_mask, valid, write)
        x, mu, t, spks, cond = chunk()
        self.forward(x, torch.ones(rows, 1, frames, dtype=w.dtype, device=w.device), mu, t, spks, cond)
        _, conv, kv = self.forward_chunk(*chunk(), None, None)
        self.forward_chunk(*chunk(), conv, kv)

    def _inputs(
        self, x: torch.Tensor, mu: torch.Tensor, t: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        frames = x.shape[2]
        stacked = torch.cat([x, mu, spks[:, :, None].expand(-1, -1, frames), cond], dim=1)
        if stacked.shape[1] != self.p.in_channels:
            raise ValueError(f"estimator expects {self.p.in_channels} input channels, got {stacked.shape[1]}")
        return self.in_proj(stacked.transpose(1, 2)), self.t_embedder(t).unsqueeze(1)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        mu: torch.Tensor,
        t: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
    ) -> torch.Tensor:
        """Whole sequence. x, mu, cond (b, 80, T); mask (b, 1, T); t (b,); spks (b, 80) -> (b, 80, T)."""
        h, c = self._inputs(x, mu, t, spks, cond)
        key_mask = mask[:, 0].bool()
        for block in self.blocks:
            h, _, _ = block(h, c, key_mask=key_mask)
        return self.final_layer(h, c).transpose(1, 2)

    def forward_chunk(
        self,
        x: torch.Tensor,
        mu: torch.Tensor,
        t: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        conv_cache: torch.Tensor | None,
        kv_cache: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Streaming chunk with full attention over cache + chunk.

        conv_cache (depth, b, 2*hidden, 2); kv_cache (depth, b, heads, t_cache, 2*head_dim).
        Returns (out (b, 80, T), new conv cache, new kv cache) as fresh tensors.
        """
        h, c = self._inputs(x, mu, t, spks, cond)
        new_conv, new_kv = [], []
        for idx, block in enumerate(self.blocks):
            h, conv, kv = block(
                h,
                c,
                None if conv_cache is None else conv_cache[idx],
                None if kv_cache is None else kv_cache[idx],
            )
            new_conv.append(conv)
            new_kv.append(kv)
        out = self.final_layer(h, c).transpose(1, 2)
        return out, torch.stack(new_conv, dim=0), torch.stack(new_kv, dim=0)

    def forward_ragged(
        self,
        x: torch.Tensor,
        mu: torch.Tensor,
        t: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        conv_cache: torch.Tensor,
        kv_store: torch.Tensor,
        key_mask: torch.Tensor,
        valid: torch.Tensor,
        write_pos: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward_chunk` for padded rows over a KV store: row b has valid[b] real frames (then padding);
        kv_store (depth, b, heads, C, 2*head_dim) gets this chunk's keys at write_pos (b, T) in place and
        key_mask (b, C) marks the keys each row attends to (its cached ones and this chunk's real ones).

        Returns (out (b, 80, T), new conv cache (depth, b, 2*hidden, 2)).
        """
        h, c = self._inputs(x, mu, t, spks, cond)
        new_conv = []
        for idx, block in enumerate(self.blocks):
            h, conv, _ = block(h, c, conv_cache[idx], kv_store[idx], key_mask, valid, write_pos)
            new_conv.append(conv)
        out = self.final_layer(h, c).transpose(1, 2)
        return out, torch.stack(new_conv, dim=0)
