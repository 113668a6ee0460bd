"""Speech tokens -> 80-bin log-mel at 50 Hz (the official CausalMaskedDiffWithXvec, our code).

token embedding -> UpsampleConformerEncoder (2 frames per token) -> linear to 80 = `mu` -> flow matching
(DiT estimator) conditioned on mu, the projected speaker vector and the prompt mel (`cond`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cfm import FlowSampler, StepHook
from .conformer import UpsampleConformerEncoder
from .dit import DiT
from .hparams import FlowParams


@dataclass(eq=False)
class FlowCache:
    """Streaming state of the flow: every tensor is owned (never a view of a shared scratch buffer)."""

    conformer_cnn: torch.Tensor  # (1, d, 2 + 2*stride)
    conformer_att: torch.Tensor  # (low + up layers, 1, heads, 2*t_tokens, 2*d_k), token rate tiled x2
    estimator_conv: torch.Tensor  # (steps, depth, 2, 2*hidden, 2)
    estimator_kv: torch.Tensor  # (steps, depth, 2, heads, t_frames, 2*head_dim)

    def shape_key(self) -> tuple[tuple[int, ...], ...]:
        """Caches with equal keys can be stacked into one batch."""
        return (
            tuple(self.conformer_cnn.shape),
            tuple(self.conformer_att.shape),
            tuple(self.estimator_conv.shape),
            tuple(self.estimator_kv.shape),
        )

    def clone(self) -> FlowCache:
        return FlowCache(
            self.conformer_cnn.clone(),
            self.conformer_att.clone(),
            self.estimator_conv.clone(),
            self.estimator_kv.clone(),
        )


def stack_flow_caches(caches: list[FlowCache]) -> FlowCache:
    """B single-stream caches -> one batched cache (estimator rows: B conditioned, then B unconditioned)."""
    if len({c.shape_key() for c in caches}) != 1:
        raise ValueError("only caches of equal shapes can be batched")
    if len(caches) == 1:
        return caches[0]

    def pairs(name: str) -> torch.Tensor:
        parts = [getattr(c, name) for c in caches]
        return torch.cat([p[:, :, :1] for p in parts] + [p[:, :, 1:] for p in parts], dim=2)

    return FlowCache(
        torch.cat([c.conformer_cnn for c in caches], dim=0),
        torch.cat([c.conformer_att for c in caches], dim=1),
        pairs("estimator_conv"),
        pairs("estimator_kv"),
    )


def unstack_flow_cache(cache: FlowCache, batch: int) -> list[FlowCache]:
    """Inverse of `stack_flow_caches`; every returned tensor is a fresh copy (batch 1 is returned as is)."""
    if batch == 1:
        return [cache]
    return split_flow_cache(cache, batch, batch)


def split_flow_cache(cache: FlowCache, count: int, rows: int) -> list[FlowCache]:
    """The first `count` streams of a batched cache of `rows` streams (estimator rows: `rows` conditioned,
    then `rows` unconditioned), each as fresh, owned tensors (safe to keep across CUDA graph replays)."""
    return [
        FlowCache(
            cache.conformer_cnn[i : i + 1].clone(),
            cache.conformer_att[:, i : i + 1].clone(),
            cache.estimator_conv[:, :, i::rows].clone(),
            cache.estimator_kv[:, :, i::rows].clone(),
        )
        for i in range(count)
    ]


class Flow(nn.Module):
    def __init__(self, p: FlowParams, noise: torch.Tensor) -> None:
        super().__init__()
        if p.output_type != "mel":
            raise ValueError(f"only output_type 'mel' is implemented, got {p.output_type!r}")
        if p.encoder.input_size != p.input_size:
            raise ValueError("flow.input_size must equal encoder.input_size")
        self.p = p
        self.input_embedding = nn.Embedding(p.vocab_size, p.input_size)
        self.spk_embed_affine_layer = nn.Linear(p.spk_embed_dim, p.output_size)
        self.encoder = UpsampleConformerEncoder(p.encoder)
        self.encoder_proj = nn.Linear(p.encoder.output_size, p.output_size)
        self.decoder = FlowSampler(DiT(p.estimator), p.inference_cfg_rate, noise)

    @property
    def lookahead(self) -> int:
        return self.encoder.lookahead

    @property
    def up_rate(self) -> int:
        return self.encoder.up_rate

    def _speaker(self, spk: torch.Tensor) -> torch.Tensor:
        return self.spk_embed_affine_layer(F.normalize(spk, dim=1))

    def _check_tokens(self, tokens: torch.Tensor, batch: int = 1) -> None:
        if tokens.ndim != 2 or tokens.shape[0] != batch:
            raise ValueError(f"tokens must have shape ({batch}, n), got {tuple(tokens.shape)}")
        if tokens.numel() and int(tokens.max()) >= self.p.vocab_size:
            raise ValueError(f"token id {int(tokens.max())} is outside the vocabulary of {self.p.vocab_size}")

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Whole utterance: tokens (1, n) -> mu (1, 2n, 80), frame-major (the fixture's `mu`)."""
        self._check_tokens(tokens)
        h = self.encoder(self.input_embedding(tokens.clamp(min=0)))
        return self.encoder_proj(h)

    @torch.inference_mode()
    def inference(
        self,
        tokens: torch.Tensor,
        prompt_tokens: torch.Tensor,
        prompt_mel: torch.Tensor,
        spk: torch.Tensor,
        n_steps: int,
        on_step: StepHook | None = None,
    ) -> torch.Tensor:
        """Whole utterance: mel (1, 80, 2*n) of `tokens`, spoken in the voice of the prompt.

        prompt_mel (1, 2*n_prompt, 80); spk (1, 192).
        """
        mu = self.encode(torch.cat([prompt_tokens, tokens], dim=1))
        n_prompt = prompt_mel.shape[1]
        cond = torch.zeros_like(mu)
        cond[:, :n_prompt] = prompt_mel
        mask = torch.ones(1, 1, mu.shape[1], dtype=mu.dtype, device=mu.device)
        mel = self.decoder.sample(
            mu.transpose(1, 2), mask, self._speaker(spk), cond.transpose(1, 2), n_steps, on_step
        )
        return mel[:, :, n_prompt:]

    @torch.inference_mode()
    def setup_cache(
        self, tokens_with_lookahead: torch.Tensor, prompt_mel: torch.Tensor, spk: torch.Tensor, n_steps: int
    ) -> FlowCache:
        """Run the prompt through the streaming path; tokens carry `lookahead` extra tokens at the end."""
        self._check_tokens(tokens_with_lookahead)
        frames = (tokens_with_lookahead.shape[1] - self.lookahead) * self.up_rate
        if frames != prompt_mel.shape[1]:
            raise ValueError(
                f"prompt mel has {prompt_mel.shape[1]} frames; {frames} are needed for "
                f"{tokens_with_lookahead.shape[1]} tokens including {self.lookahead} lookahead"
            )
        h, cnn, att = self.encoder.forward_chunk(
            self.input_embedding(tokens_with_lookahead), False, None, None
        )
        mu = self.encoder_proj(h).transpose(1, 2)
        _, conv, kv = self.decoder.sample_chunk(
            mu, self._speaker(spk), prompt_mel.transpose(1, 2), n_steps, None, None
        )
        return FlowCache(cnn, att, conv, kv)

    @torch.inference_mode()
    def inference_chunk(
        self, tokens: torch.Tensor, spk: torch.Tensor, cache: FlowCache, last_chunk: bool, n_steps: int
    ) -> tuple[torch.Tensor, FlowCache]:
        """One streaming window -> (mel (1, 80, frames), new cache). The input cache is not modified."""
        mel, caches = self.inference_chunk_batch(tokens, spk, [cache], last_chunk, n_steps)
        return mel, caches[0]

    @torch.inference_mode()
    def inference_chunk_batch(
        self, tokens: torch.Tensor, spk: torch.Tensor, caches: list[FlowCache], last_chunk: bool, n_steps: int
    ) -> tuple[torch.Tensor, list[FlowCache]]:
        """Windows of B streams at once: tokens (B, n), spk (B, 192), caches of equal shapes.

        Returns (mel (B, 80, frames), B new caches). The input caches are not modified.
        """
        self._check_tokens(tokens, len(caches))
        cache = stack_flow_caches(caches)
        mel, new = self.chunk_forward(tokens, spk, cache, last_chunk, n_steps)
        return mel, unstack_flow_cache(new, len(caches))

    def chunk_forward(
        self, tokens: torch.Tensor, spk: torch.Tensor, cache: FlowCache, last_chunk: bool, n_steps: int
    ) -> tuple[torch.Tensor, FlowCache]:
        """The streaming window on an already batched cache, with no checks and no host syncs (the body
        that `flow_graphs` captures). tokens (B, n) valid ids; returns (mel (B, 80, frames), batched cache)."""
        h, cnn, att = self.encoder.forward_chunk(
            self.input_embedding(tokens), last_chunk, cache.conformer_cnn, cache.conformer_att
        )
        mu = self.encoder_proj(h).transpose(1, 2)
        mel, conv, kv = self.decoder.sample_chunk(
            mu, self._speaker(spk), torch.zeros_like(mu), n_steps, cache.estimator_conv, cache.estimator_kv
        )
        return mel, FlowCache(cnn, att, conv, kv)

    def ragged_forward(
        self,
        tokens: torch.Tensor,
        n_tokens: torch.Tensor,
        valid: torch.Tensor,
        spk: torch.Tensor,
        cnn: torch.Tensor,
        low: torch.Tensor,
        up: torch.Tensor,
        conformer_frames: torch.Tensor,
        conv: torch.Tensor,
        kv_store: torch.Tensor,
        key_valid: torch.Tensor,
        estimator_frames: torch.Tensor,
        write_pos: torch.Tensor,
        n_steps: int,
    ) -> tuple[torch.Tensor, ...]:
        """Streaming windows of B streams at any point of their turns as one padded batch (no host syncs;
        what `flow_graphs` captures). See `UpsampleConformerEncoder.forward_ragged` and
        `FlowSampler.sample_ragged` for the layouts; the estimator keys live in `kv_store` (written in
        place). Returns (mel (B, 80, 2U), new cnn cache, new low / up conformer keys of this chunk, new
        estimator conv cache)."""
        h, new_cnn, new_low, new_up = self.encoder.forward_ragged(
            self.input_embedding(tokens), n_tokens, valid, cnn, low, up, conformer_frames
        )
        mu = self.encoder_proj(h).transpose(1, 2)
        mel, new_conv = self.decoder.sample_ragged(
            mu,
            self._speaker(spk),
            n_steps,
            conv,
            kv_store,
            key_valid,
            estimator_frames,
            valid * self.up_rate,
            write_pos,
        )
        return mel, new_cnn, new_low, new_up, new_conv


def keep_ends(x: torch.Tensor, front: int, back: int, dim: int) -> torch.Tensor:
    """The official cut along `dim`: the first `front` and the last `back` frames, when longer than both."""
    n = x.shape[dim]
    if n <= front + back:
        return x
    return torch.cat([x.narrow(dim, 0, front), x.narrow(dim, n - back, back)], dim=dim)


def trim_flow_cache(cache: FlowCache, prompt_frames: int, history_frames: int, low_layers: int) -> FlowCache:
    """Bound the attention caches to the prompt plus the most recent `history_frames` mel frames.

    Follows the official cut exactly, including its choice of "first prompt_frames" and "last history"
    slices along the stored order (the estimator stores the newest chunk first, so this keeps a mix).
    The conformer's token-rate half is cut at half the mel-rate sizes and tiled x2 again.
    """
    kv = keep_ends(cache.estimator_kv, prompt_frames, history_frames, dim=4)
    att = cache.conformer_att
    if att.shape[3] > prompt_frames + history_frames:
        token_part = keep_ends(
            att[:low_layers, :, :, : att.shape[3] // 2], prompt_frames // 2, history_frames // 2, 3
        )
        mel_part = keep_ends(att[low_layers:], prompt_frames, history_frames, dim=3)
        att = torch.cat([token_part.repeat(1, 1, 1, 2, 1), mel_part], dim=0)
    return FlowCache(cache.conformer_cnn, att, cache.estimator_conv, kv)
