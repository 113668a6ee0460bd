"""A slot-based KV cache shared by many sessions.

Every layer owns two preallocated tensors `[num_slots, kv_heads, max_len + 1, head_dim]` (the last position is
a write-only spare for padding entries). A session holds one slot
for its whole life and the cache tracks how many positions of each slot are filled. A forward step for a batch
of sessions writes each row's new keys/values at that row's own offset, so rows of different lengths share one
step; attention masks hide the positions a row does not own.
"""

from __future__ import annotations

import torch


class CacheFullError(RuntimeError):
    """A slot would grow past the preallocated length, or no slot is free."""


class SlotKVCache:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        max_len: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        # one spare position past max_len: static steps send their padding entries there (one scatter, no
        # read-back of the old value); nothing ever reads it
        shape = (num_slots, kv_heads, max_len + 1, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.max_len = max_len
        self.num_slots = num_slots
        self._free = list(range(num_slots))

    # ---- slot bookkeeping -------------------------------------------------------------------------------------
    def allocate(self, top: bool = False) -> int:
        """The lowest free slot, or with `top` the highest: the active slots stay dense at either end (static
        steps batch a bucket of slots from one end, see `graphs.row_window`)."""
        if not self._free:
            raise CacheFullError(f"all {self.num_slots} KV slots are in use")
        slot = max(self._free) if top else min(self._free)
        self._free.remove(slot)
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self._check_slot(slot)
        if slot in self._free:
            raise ValueError(f"KV slot {slot} is not allocated")
        self.lengths[slot] = 0
        self._free.append(slot)

    def reset(self, slot: int) -> None:
        self._check_slot(slot)
        self.lengths[slot] = 0

    def truncate(self, slot: int, length: int) -> None:
        """Forget everything after `length` positions (e.g. to roll back a speculative step)."""
        self._check_slot(slot)
        if not 0 <= length <= int(self.lengths[slot]):
            raise ValueError(f"cannot truncate slot {slot} of length {int(self.lengths[slot])} to {length}")
        self.lengths[slot] = length

    def length(self, slot: int) -> int:
        return int(self.lengths[slot])

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def layer_keys(self, layer: int, slot: int) -> torch.Tensor:
        """The filled keys of one slot `[kv_heads, length, head_dim]` (after RoPE), for inspection."""
        return self.keys[layer][slot, :, : self.length(slot)]

    def layer_values(self, layer: int, slot: int) -> torch.Tensor:
        return self.values[layer][slot, :, : self.length(slot)]

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"KV slot {slot} out of range 0..{self.num_slots - 1}")

    # ---- used by the attention layers -------------------------------------------------------------------------
    def check_room(self, slots: torch.Tensor, new_tokens: torch.Tensor) -> None:
        ends = self.lengths[slots] + new_tokens
        if bool((ends > self.max_len).any()):
            raise CacheFullError(f"KV slot would exceed max_len {self.max_len} (needs {int(ends.max())})")

    def write(
        self,
        layer: int,
        slots: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        """Store `k, v` `[B, kv_heads, T, head_dim]` at `positions` `[B, T]` of each row's slot.

        Only entries where `valid` `[B, T]` is true are written: padding rows of a ragged batch never touch
        the cache.
        """
        rows = slots[:, None].expand_as(positions)[valid]
        pos = positions[valid]
        self.keys[layer][rows, :, pos] = k.transpose(1, 2)[valid].to(self.keys[layer].dtype)
        self.values[layer][rows, :, pos] = v.transpose(1, 2)[valid].to(self.values[layer].dtype)

    def read(self, layer: int, slots: torch.Tensor, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `[B, kv_heads, upto, head_dim]` of the rows' slots (a view for a single row)."""
        k, v = self.keys[layer][:, :, :upto], self.values[layer][:, :, :upto]
        if slots.numel() == 1:
            i = int(slots[0])
            return k[i : i + 1], v[i : i + 1]
        return k.index_select(0, slots), v.index_select(0, slots)

    def advance(self, slots: torch.Tensor, new_tokens: torch.Tensor) -> None:
        self.lengths[slots] += new_tokens
