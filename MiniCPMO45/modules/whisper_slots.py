"""The streaming Whisper encoder for many sessions in one batch, over a preallocated per-slot KV cache.

`WhisperSlotCache` holds, per encoder layer, one key and one value buffer `[slots, heads, positions, head_dim]`
(positions = the 1500 of the position table) and each slot's length on the host. `slot_stream_forward` runs
one chunk for a contiguous range of slots: row r is slot `lo + r`, it writes its new keys/values in place at
its own length, attends over the first `window` positions of its slot with a key mask (everything up to the
end of its own chunk, as `WhisperEncoder.forward_stream` does with its concatenated cache), and takes its
positional embeddings from its own length. Rows may have different mel lengths and redundancy trimming
(the first chunk of a session against later ones): mels are right-padded, conv1 outputs past each row's end
are zeroed so conv2 sees the zero padding a lone chunk has there, and each row's frames are gathered from its
own trim offset. Rows with no new frames (idle slots inside the range) write nothing.

Every shape is fixed by (rows, mel frames, new frames, window) and no host value enters the function, so it
can be captured as a CUDA graph (`engine.batched_audio`); the host decides the per-row lengths and resets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import AudioConfig
from .whisper import WhisperAttention, WhisperEncoder, WhisperStreamCache, cnn_frames


def trimmed_frames(mel_frames: int, prefix_extra_frames: int, suffix_extra_frames: int) -> tuple[int, int]:
    """(first kept CNN frame, number kept) of a streaming chunk, as `forward_stream` trims it."""
    c = cnn_frames(mel_frames)
    front = (prefix_extra_frames + 1) // 2 if prefix_extra_frames > 0 else 0
    back = (suffix_extra_frames + 1) // 2 if suffix_extra_frames > 0 else 0
    n = max(c - front, 0)
    if 0 < back < n:
        n -= back
    return front, n


class WhisperSlotCache:
    """Streaming-encoder K/V of every KV slot of a worker, allocated on first use.

    `lengths[slot]` (host ints) is the number of cached frames of the slot's stream; `resets[slot]` counts the
    times the stream was dropped at the end of the position table (like `WhisperStreamCache.resets`).
    """

    def __init__(
        self,
        num_slots: int,
        layers: int,
        heads: int,
        head_dim: int,
        positions: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if num_slots < 1:
            raise ValueError("the audio slot cache needs at least one slot")
        self.num_slots, self.layers, self.heads, self.head_dim = num_slots, layers, heads, head_dim
        self.positions = positions
        self.dtype, self.device = dtype, torch.device(device)
        self.lengths = [0] * num_slots
        self.resets = [0] * num_slots
        self._keys: list[torch.Tensor] | None = None
        self._values: list[torch.Tensor] | None = None

    @classmethod
    def for_encoder(cls, enc: WhisperEncoder, num_slots: int) -> WhisperSlotCache:
        attn = enc.layers[0].self_attn
        w = enc.conv1.weight
        return cls(
            num_slots, len(enc.layers), attn.heads, attn.head_dim, enc.max_positions, w.dtype, w.device
        )

    @staticmethod
    def bytes_per_slot(cfg: AudioConfig, dtype: torch.dtype) -> int:
        """Device memory of one slot: K and V of every layer over the whole position table."""
        return 2 * cfg.encoder_layers * cfg.max_source_positions * cfg.d_model * dtype.itemsize

    @property
    def allocated(self) -> bool:
        return self._keys is not None

    def allocate(self) -> None:
        """Allocate the buffers now (they are otherwise allocated when first read)."""
        if self._keys is not None:
            return
        # Zeros, not empty: masked keys get weight 0, and 0 * NaN from uninitialized memory would be NaN.
        shape = (self.num_slots, self.heads, self.positions, self.head_dim)
        self._keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        self._values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]

    @property
    def keys(self) -> list[torch.Tensor]:
        self.allocate()
        assert self._keys is not None
        return self._keys

    @property
    def values(self) -> list[torch.Tensor]:
        self.allocate()
        assert self._values is not None
        return self._values

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"audio slot {slot} outside 0..{self.num_slots - 1}")

    def reset(self, slot: int) -> None:
        """Start a new stream in `slot` (a new conversation: its reset counter starts over too)."""
        self._check_slot(slot)
        self.lengths[slot] = 0
        self.resets[slot] = 0

    def load(self, slot: int, cache: WhisperStreamCache) -> None:
        """Continue a per-session stream (`forward_stream`'s cache) in `slot`."""
        self._check_slot(slot)
        n = cache.length
        if n > self.positions:
            raise ValueError(f"a stream of {n} frames does not fit {self.positions} positions")
        if cache.layers and len(cache.layers) != self.layers:
            raise ValueError(f"stream cache has {len(cache.layers)} layers, the encoder {self.layers}")
        for i, (k, v) in enumerate(cache.layers):
            self.keys[i][slot, :, :n] = k[0].to(self.device, self.dtype)
            self.values[i][slot, :, :n] = v[0].to(self.device, self.dtype)
        self.lengths[slot] = n
        self.resets[slot] = cache.resets

    def stream_cache(self, slot: int) -> WhisperStreamCache:
        """A copy of the slot's stream as a per-session cache (what `forward_stream` would hold)."""
        self._check_slot(slot)
        n = self.lengths[slot]
        layers = (
            [(k[slot : slot + 1, :, :n].clone(), v[slot : slot + 1, :, :n].clone()) for k, v in self._pairs()]
            if n
            else []
        )
        return WhisperStreamCache(layers=layers, resets=self.resets[slot])

    def _pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(self.keys, self.values, strict=True))


def _attend(
    attn: WhisperAttention,
    x: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    write_idx: torch.Tensor,
    valid: torch.Tensor,
    mask: torch.Tensor,
    window: int,
) -> torch.Tensor:
    b, n, d = x.shape
    q = attn._split(attn.q_proj(x))
    k, v = attn.project_kv(x)
    idx = write_idx[:, None, :, None].expand(b, attn.heads, n, attn.head_dim)
    keep = valid[:, None, :, None]
    # padding entries write back what is there (their positions never meet a real write of the same row)
    keys.scatter_(2, idx, torch.where(keep, k.to(keys.dtype), keys.gather(2, idx)))
    values.scatter_(2, idx, torch.where(keep, v.to(values.dtype), values.gather(2, idx)))
    out = F.scaled_dot_product_attention(q, keys[:, :, :window], values[:, :, :window], attn_mask=mask)
    return attn.out_proj(out.transpose(1, 2).reshape(b, n, d))


def slot_stream_forward(
    enc: WhisperEncoder,
    cache: WhisperSlotCache,
    lo: int,
    mel: torch.Tensor,
    mel_frames: torch.Tensor,
    first_frame: torch.Tensor,
    num_new: torch.Tensor,
    past: torch.Tensor,
    new_frames: int,
    window: int,
) -> torch.Tensor:
    """One streaming chunk for slots `lo .. lo+rows-1`; returns final-norm states `[rows, new_frames, d]`.

    mel `[rows, n_mels, F]` right-padded with zeros; per row (long `[rows]`): `mel_frames` real mel frames,
    `first_frame` its first kept CNN frame, `num_new` kept frames (at most `new_frames`; 0 = idle row) and
    `past` the cached frames the chunk continues (after any reset). Advances nothing on the host: the caller
    sets `cache.lengths`.
    """
    rows = mel.shape[0]
    table = cache.positions
    if new_frames >= table or window > table:
        raise ValueError(f"{new_frames} new frames / window {window} do not fit {table} positions")
    device = mel.device
    x = F.gelu(enc.conv1(mel.to(enc.conv1.weight.dtype)))
    t = torch.arange(mel.shape[-1], device=device)
    x = x * (t[None, :] < mel_frames[:, None]).to(x.dtype)[:, None, :]
    x = F.gelu(enc.conv2(x)).transpose(1, 2)  # [rows, C, d]
    c, d = x.shape[1], x.shape[2]
    offsets = torch.arange(new_frames, device=device)
    src = (first_frame[:, None] + offsets[None, :]).clamp(max=c - 1)
    x = x.gather(1, src[:, :, None].expand(rows, new_frames, d))
    positions = past[:, None] + offsets[None, :]  # [rows, N]
    x = x + enc.embed_positions.weight[positions.clamp(max=table - 1)]
    valid = offsets[None, :] < num_new[:, None]
    write_idx = positions % table
    # a chunk sees every cached frame and all of its own frames; an idle row keeps one key so no row is empty
    end = (past + num_new).clamp(min=1)
    allowed = torch.arange(window, device=device)[None, :] < end[:, None]
    mask = torch.zeros(rows, 1, 1, window, dtype=x.dtype, device=device)
    mask.masked_fill_(~allowed[:, None, None, :], float("-inf"))
    for i, layer in enumerate(enc.layers):
        keys, values = cache.keys[i][lo : lo + rows], cache.values[i][lo : lo + rows]
        h = layer.self_attn_layer_norm(x)
        x = x + _attend(layer.self_attn, h, keys, values, write_idx, valid, mask, window)
        x = x + layer.fc2(F.gelu(layer.fc1(layer.final_layer_norm(x))))
    return enc.layer_norm(x)
