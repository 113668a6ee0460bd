"""The TTS decoder stack (a Llama model without its token embedding) and the slot KV cache it writes into.

Parameter names match the checkpoint under `tts.model.`: `layers.N.self_attn.{q,k,v,o}_proj`,
`layers.N.mlp.{gate,up,down}_proj`, `layers.N.{input,post_attention}_layernorm`, `norm`.

The official model builds a transformers `LlamaConfig` from the TTS sizes only, so the RMSNorm epsilon and
the RoPE base always take that class's defaults (1e-6 and 10000), whatever `tts_config` holds; we do the same.

One forward call serves a batch of sessions. Row b of the batch belongs to cache slot `slots[b]`, starts at
position `starts[b]` (the number of positions that slot already holds, which is also the RoPE position of its
first new token) and has `valid[b]` real tokens; shorter rows are right-padded. Only real tokens are written to
the cache; padded query rows compute garbage that the caller ignores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kv_cache import CacheFullError
from .qwen3 import RMSNorm as Qwen3RMSNorm

LLAMA_RMS_NORM_EPS = 1e-6
LLAMA_ROPE_THETA = 10000.0


class TTSKVCache:
    """Preallocated keys/values `[num_slots, kv_heads, capacity, head_dim]` per layer, one slot per session.

    The cache does not track lengths: each session's state knows how many positions of its slot are valid.
    """

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        capacity: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if num_slots < 1 or capacity < 1:
            raise ValueError(f"num_slots and capacity must be positive, got {num_slots} and {capacity}")
        shape = (num_slots, kv_heads, capacity + 1, head_dim)  # + a write-only spare, as in `SlotKVCache`
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity = capacity
        self.num_slots = num_slots
        self._free = list(range(num_slots))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise CacheFullError(f"all {self.num_slots} TTS cache slots are in use")
        return self._free.pop(0)

    def release(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or slot in self._free:
            raise ValueError(f"TTS cache slot {slot} is not allocated")
        self._free.append(slot)

    def write(
        self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ):
        """Store rows `k, v` `[N, kv_heads, head_dim]` at (slots[i], positions[i])."""
        self.keys[layer][slots, :, positions] = k
        self.values[layer][slots, :, positions] = v

    def read(self, layer: int, slots: torch.Tensor | slice, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` positions of each slot: `[B, kv_heads, length, head_dim]` twice.

        A slice of consecutive slots gives views; an index tensor gathers copies.
        """
        return self.keys[layer][slots, :, :length], self.values[layer][slots, :, :length]


class LlamaRMSNorm(Qwen3RMSNorm):
    def __init__(self, dim: int, eps: float = LLAMA_RMS_NORM_EPS) -> None:
        super().__init__(dim, eps)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin `[B, S, head_dim]` for integer positions `[B, S]` (the half-split "rotate_half" layout)."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[B, H, S, D]`; cos/sin `[B, S, D]`."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class LlamaAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        if hidden % heads or heads % kv_heads:
            raise ValueError(f"hidden {hidden}, heads {heads}, kv heads {kv_heads} do not divide evenly")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: TTSKVCache,
        layer: int,
        batch: BatchLayout,
    ) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # [B, H, S, D] -> the real tokens as [N, H, D]
        real_k = k.transpose(1, 2)[batch.row_mask]
        real_v = v.transpose(1, 2)[batch.row_mask]
        cache.write(layer, batch.write_slots, batch.write_positions, real_k, real_v)
        keys, values = cache.read(layer, batch.slots, batch.read_length)
        if self.kv_heads != self.heads:
            repeat = self.heads // self.kv_heads
            keys = keys.repeat_interleave(repeat, dim=1)
            values = values.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=batch.attn_mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, hidden: int, intermediate: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(hidden, heads, kv_heads)
        self.mlp = LlamaMLP(hidden, intermediate)
        self.input_layernorm = LlamaRMSNorm(hidden)
        self.post_attention_layernorm = LlamaRMSNorm(hidden)

    def forward(self, x, cos, sin, cache: TTSKVCache, layer: int, batch: BatchLayout) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class BatchLayout:
    """Index tensors shared by every layer of one batched forward call (built from host-side ints)."""

    def __init__(self, slots: list[int], starts: list[int], valid: list[int], seq_len: int, device) -> None:
        slot_t = torch.tensor(slots, dtype=torch.long, device=device)
        start_t = torch.tensor(starts, dtype=torch.long, device=device)
        valid_t = torch.tensor(valid, dtype=torch.long, device=device)
        offsets = torch.arange(seq_len, device=device)
        consecutive = slots == list(range(slots[0], slots[0] + len(slots)))
        self.slots: torch.Tensor | slice = slice(slots[0], slots[0] + len(slots)) if consecutive else slot_t
        self.positions = start_t[:, None] + offsets  # [B, S]
        self.row_mask = offsets[None, :] < valid_t[:, None]  # [B, S] real tokens
        self.write_slots = slot_t[:, None].expand_as(self.positions)[self.row_mask]
        self.write_positions = self.positions[self.row_mask]
        self.read_length = max(a + n for a, n in zip(starts, valid, strict=True))
        keys = torch.arange(self.read_length, device=device)
        # query (b, i) at position starts[b] + i sees keys 0 .. starts[b] + i of its own slot
        self.attn_mask = (keys[None, None, :] <= self.positions[:, :, None])[:, None]  # [B, 1, S, L]


class LlamaBackbone(nn.Module):
    """`tts.model`: decoder layers + final norm, fed with embeddings (its `embed_tokens` is unused)."""

    def __init__(self, hidden: int, intermediate: int, num_layers: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(hidden, intermediate, heads, kv_heads) for _ in range(num_layers)
        )
        self.norm = LlamaRMSNorm(hidden)
        self.head_dim = hidden // heads
        self.kv_heads = kv_heads

    def new_cache(
        self, num_slots: int, capacity: int, dtype: torch.dtype, device: str | torch.device
    ) -> TTSKVCache:
        return TTSKVCache(len(self.layers), num_slots, capacity, self.kv_heads, self.head_dim, dtype, device)

    def forward(
        self,
        embeds: torch.Tensor,
        cache: TTSKVCache,
        slots: list[int],
        starts: list[int],
        valid: list[int],
    ) -> torch.Tensor:
        """embeds `[B, S, hidden]` -> last hidden states `[B, S, hidden]`, caching the real tokens' keys/values.

        slots/starts/valid are host-side ints, one per row: the row's cache slot, how many positions that slot
        already holds (the RoPE position of the row's first token) and how many of its S tokens are real.
        """
        b, s, _ = embeds.shape
        if not (len(slots) == len(starts) == len(valid) == b):
            raise ValueError("slots, starts and valid must each hold one entry per batch row")
        if len(set(slots)) != b:
            raise ValueError(f"a cache slot appears twice in one batch: {slots}")
        if min(valid) < 1 or max(valid) > s:
            raise ValueError(f"valid lengths must lie in [1, {s}], got {valid}")
        needed = max(a + n for a, n in zip(starts, valid, strict=True))
        if needed > cache.capacity:
            raise CacheFullError(
                f"TTS cache slot would need {needed} positions, capacity is {cache.capacity}"
            )
        batch = BatchLayout(slots, starts, valid, s, embeds.device)
        cos, sin = rope_cos_sin(batch.positions, self.head_dim, LLAMA_ROPE_THETA, embeds.dtype)
        x = embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, batch)
        return self.norm(x)
