"""The Qwen3 text backbone: GQA attention with per-head q/k RMSNorm, RoPE, SwiGLU MLP, untied lm_head.

One forward serves prefill and decode for a batch of sessions: `embeds [B, T, H]` where row b has `n_b <= T`
real tokens (the rest is padding), each row continuing its own KV slot at its own position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LLMConfig
from .kv_cache import SlotKVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm: one fused kernel instead of float/pow/mean/add/rsqrt/mul/cast/mul (the decode steps
        # are kernel-bound at small batch). It accumulates in float32 and rounds once, after the weight; the
        # reference rounds before the weight too (a last-bit difference in half precision, none in float32).
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """Default (unscaled) RoPE: cos/sin computed in float32 from integer positions."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        exponents = (
            torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        )
        return 1.0 / (self.theta**exponents)

    def reset_buffers(self, device: torch.device) -> None:
        """Recompute `inv_freq` (after the module was materialized from the meta device)."""
        self.inv_freq = self._inv_freq(device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[..., None] * self.inv_freq.float()  # [B, T, hd/2]
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[B, heads, T, hd]`, cos/sin `[B, T, hd]`."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: StepContext
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if step.cache is not None:
            step.cache.write(self.layer_idx, step.slots, step.positions, step.valid, k, v)
            k, v = step.cache.read(self.layer_idx, step.slots, step.key_len)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=step.mask, enable_gqa=self.n_kv != self.n_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: StepContext
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, step)
        return x + self.mlp(self.post_attention_layernorm(x))


class StepContext:
    """Positions, cache rows and the attention mask of one forward over a (possibly ragged) batch."""

    def __init__(
        self,
        batch: int,
        steps: int,
        device: torch.device,
        cache: SlotKVCache | None,
        slots: torch.Tensor | None,
        num_new: torch.Tensor | None,
    ) -> None:
        self.cache = cache
        if num_new is None:
            num_new = torch.full((batch,), steps, dtype=torch.long, device=device)
        if bool((num_new > steps).any()) or bool((num_new < 0).any()):
            raise ValueError(f"num_new must lie in 0..{steps}")
        self.num_new = num_new
        offsets = torch.arange(steps, device=device)
        self.valid = offsets[None, :] < num_new[:, None]  # [B, T]
        if cache is None:
            past = torch.zeros(batch, dtype=torch.long, device=device)
            self.slots = None
        else:
            if slots is None or slots.shape != (batch,):
                raise ValueError("a cached forward needs one slot per batch row")
            cache.check_room(slots, num_new)
            past = cache.lengths[slots].to(device)
            self.slots = slots
        self.positions = past[:, None] + offsets[None, :]  # [B, T]
        self.key_len = int((past + steps).max()) if batch else 0
        keys = torch.arange(self.key_len, device=device)
        # A query sees every key at or before its own position; padding queries get the same rule (their
        # output is discarded) so no row of the mask is empty.
        self.mask = (keys[None, None, :] <= self.positions[:, :, None])[:, None]  # [B, 1, T, K]


class Qwen3Model(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)


class Qwen3ForCausalLM(nn.Module):
    """`llm.*` of the checkpoint: `model.{embed_tokens,layers,norm}` and `lm_head`."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        if cfg.rope_scaling not in (None, {}) and cfg.rope_scaling.get("rope_type", "default") != "default":
            raise NotImplementedError(f"rope_scaling {cfg.rope_scaling} is not supported")
        self.config = cfg
        self.model = Qwen3Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def forward(
        self,
        embeds: torch.Tensor,
        cache: SlotKVCache | None = None,
        slots: torch.Tensor | None = None,
        num_new: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run `embeds [B, T, H]`; return the final-norm hidden states `[B, T, H]`.

        With a cache, row b appends its first `num_new[b]` positions (default T) to KV slot `slots[b]` and
        the slot length grows by that much. Without one, the rows are independent causal sequences.
        """
        b, t, _ = embeds.shape
        step = StepContext(b, t, embeds.device, cache, slots, num_new)
        rope = self.model.rotary(step.positions, embeds.dtype)
        x = embeds
        for layer in self.model.layers:
            x = layer(x, rope, step)
        if cache is not None:
            cache.advance(step.slots, step.num_new)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def new_cache(
        self,
        num_slots: int,
        max_len: int,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> SlotKVCache:
        w = self.lm_head.weight
        return SlotKVCache(
            num_layers=self.config.num_hidden_layers,
            num_slots=num_slots,
            max_len=max_len,
            kv_heads=self.config.num_key_value_heads,
            head_dim=self.config.head_dim,
            dtype=dtype or w.dtype,
            device=device or w.device,
        )
