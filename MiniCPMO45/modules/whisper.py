"""Whisper encoder (`apm.*`) in two forms.

* Batch: a whole clip (or a batch of 30-s pieces) at once, with either full attention or the chunk-causal
  mask (a frame sees everything up to the end of its own chunk).
* Streaming: one chunk at a time; the encoder keeps its own per-layer KV cache, positional embeddings continue
  from the cache length, the cache is dropped when it would reach the 1500 positions of the table, and the
  redundancy frames the streaming mel adds around a chunk are trimmed after conv2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AudioConfig


def cnn_frames(mel_frames: int) -> int:
    """Frames after conv2 (stride 2, kernel 3, padding 1)."""
    return (mel_frames - 1) // 2 + 1


def chunk_causal_mask(size: int, chunk: int, device: torch.device) -> torch.Tensor:
    """`[size, size]` bool: query i may see key j iff j < end of i's chunk."""
    idx = torch.arange(size, device=device)
    chunk_end = (idx // chunk + 1) * chunk
    return idx[None, :] < chunk_end[:, None]


class WhisperAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._split(self.k_proj(x)), self._split(self.v_proj(x))

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Returns the output and the full (past + new) keys/values of this layer."""
        b, n, d = x.shape
        q = self._split(self.q_proj(x))
        k, v = self.project_kv(x)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d)), (k, v)


class WhisperLayer(nn.Module):
    def __init__(self, cfg: AudioConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.self_attn = WhisperAttention(d, cfg.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        if cfg.activation_function != "gelu":
            raise NotImplementedError(f"audio activation {cfg.activation_function!r} is not supported")

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        attn, kv = self.self_attn(self.self_attn_layer_norm(x), mask, past)
        x = x + attn
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        return x, kv


@dataclass
class WhisperStreamCache:
    """Per-session KV cache of the streaming encoder (one `[1, heads, L, head_dim]` pair per layer)."""

    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    resets: int = 0

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[2] if self.layers else 0

    def clear(self) -> None:
        self.layers = []


class WhisperEncoder(nn.Module):
    def __init__(self, cfg: AudioConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, d)
        self.layers = nn.ModuleList(WhisperLayer(cfg) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(d)
        if cfg.scale_embedding:
            raise NotImplementedError("scale_embedding=True is not supported")

    @property
    def max_positions(self) -> int:
        return self.embed_positions.weight.shape[0]

    def _cnn(self, mel: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(mel.to(self.conv1.weight.dtype)))
        return F.gelu(self.conv2(x)).transpose(1, 2)  # [B, frames, d]

    def forward(
        self, mel: torch.Tensor, mel_lengths: torch.Tensor | None = None, chunk_frames: int | None = None
    ) -> torch.Tensor:
        """Batch form. mel `[B, n_mels, F]` → final-norm hidden states `[B, cnn_frames(F), d]`.

        `chunk_frames` (50 = 1 s) gives the chunk-causal mask; None gives full attention. Like the reference,
        the length mask compares CNN frame indices with *mel* lengths, so in practice it only hides frames
        when a row is shorter than half the batch's longest row.
        """
        x = self._cnn(mel)
        b, n, _ = x.shape
        if n > self.max_positions:
            raise ValueError(f"audio piece of {n} encoder frames exceeds {self.max_positions}; cut it first")
        x = x + self.embed_positions.weight[:n]
        allowed = torch.ones(b, 1, n, n, dtype=torch.bool, device=x.device)
        if mel_lengths is not None:
            keys = torch.arange(n, device=x.device)
            allowed = allowed & (keys[None, :] < mel_lengths.to(x.device)[:, None])[:, None, None, :]
        if chunk_frames is not None and chunk_frames > 0:
            allowed = allowed & chunk_causal_mask(n, chunk_frames, x.device)[None, None]
        mask = None if bool(allowed.all()) else allowed
        for layer in self.layers:
            x, _ = layer(x, mask)
        return self.layer_norm(x)

    def forward_stream(
        self,
        mel: torch.Tensor,
        cache: WhisperStreamCache,
        prefix_extra_frames: int = 0,
        suffix_extra_frames: int = 0,
    ) -> torch.Tensor:
        """Streaming form for one session. mel `[1, n_mels, F]` (with redundancy mel frames on either side)
        → hidden states `[1, n, d]` of the chunk's own frames; `cache` is extended in place."""
        if mel.shape[0] != 1:
            raise ValueError("the streaming encoder takes one session's chunk at a time")
        if cache.layers and cache.length + cnn_frames(mel.shape[-1]) >= self.max_positions:
            cache.clear()
            cache.resets += 1
        x = self._cnn(mel)
        drop_front = (prefix_extra_frames + 1) // 2 if prefix_extra_frames > 0 else 0
        drop_back = (suffix_extra_frames + 1) // 2 if suffix_extra_frames > 0 else 0
        x = x[:, drop_front:]
        if 0 < drop_back < x.shape[1]:
            x = x[:, :-drop_back]
        past = cache.length
        n = x.shape[1]
        pos = self.embed_positions.weight
        if past + n <= self.max_positions:
            x = x + pos[past : past + n]
        else:  # longer than the table: the last position repeats
            idx = torch.arange(past, past + n, device=x.device).clamp(max=self.max_positions - 1)
            x = x + pos[idx]
        new_layers = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, None, cache.layers[i] if cache.layers else None)
            new_layers.append(kv)
        cache.layers = new_layers
        return self.layer_norm(x)


class AudioProjector(nn.Module):
    """`audio_projection_layer.*`: Linear → ReLU → Linear to the LLM width."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(in_dim, out_dim)
        self.linear2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.relu(self.linear1(x)))


def avg_pool_time(x: torch.Tensor, step: int) -> torch.Tensor:
    """AvgPool1d(step, stride=step) over the time axis of `[B, T, D]`."""
    return F.avg_pool1d(x.transpose(1, 2), step, stride=step).transpose(1, 2)


def pooled_tokens(mel_frames: int, step: int) -> int:
    """LLM audio tokens for a segment of `mel_frames` log-mel frames."""
    return (cnn_frames(mel_frames) - step) // step + 1
