"""Conditional flow matching sampler: Euler steps on a cosine time grid with classifier-free guidance.

Each step evaluates the estimator on a batch of two: the conditioned input and an unconditioned copy with
mu, speaker and cond set to zero, then combines v = (1 + r) * v_cond - r * v_uncond (r = cfg rate).
The starting noise is a fixed table (the official model draws it once at build time); a chunk starts
reading it at the current length of the estimator's attention cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .conformer import right_padded_mask
from .dit import DiT

# 50 mel frames per second x 600 s, as in the official noise buffer.
NOISE_FRAMES = 50 * 600


def cosine_time_grid(n_steps: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """t_k = 1 - cos(pi/2 * k/n), k = 0..n."""
    if n_steps <= 0:
        raise ValueError("n_timesteps must be positive")
    grid = torch.linspace(0, 1, n_steps + 1, dtype=dtype)
    return 1 - torch.cos(grid * 0.5 * math.pi)


def default_noise_table(out_channels: int, frames: int = NOISE_FRAMES, seed: int = 0) -> torch.Tensor:
    """A reproducible standard-normal table (1, out_channels, frames)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, out_channels, frames, generator=gen)


StepHook = Callable[[int, torch.Tensor, torch.Tensor], None]


class FlowSampler(nn.Module):
    """Runs the Euler/CFG loop around the DiT (`estimator`, the only weights); holds the noise table."""

    def __init__(self, estimator: DiT, cfg_rate: float, noise: torch.Tensor) -> None:
        super().__init__()
        if cfg_rate <= 0:
            raise ValueError("inference_cfg_rate must be > 0")
        self.estimator = estimator
        self.cfg_rate = cfg_rate
        # Not part of the checkpoint (the official buffer is non-persistent too), but moves with .to().
        self.register_buffer("noise", noise, persistent=False)
        self._grids: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def time_grid(self, n_steps: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """`cosine_time_grid` on `device`, computed on the host once per (steps, dtype, device)."""
        key = (n_steps, dtype, device)
        grid = self._grids.get(key)
        if grid is None:
            grid = self._grids[key] = cosine_time_grid(n_steps, dtype).to(device)
        return grid

    def _noise(self, offset: int, frames: int, like: torch.Tensor) -> torch.Tensor:
        if offset + frames > self.noise.shape[2]:
            raise ValueError(
                f"flow noise table has {self.noise.shape[2]} frames, {offset + frames} are needed"
            )
        return self.noise[:, :, offset : offset + frames].to(dtype=like.dtype)

    def _guided(self, v: torch.Tensor) -> torch.Tensor:
        cond, uncond = v.chunk(2, dim=0)
        return (1.0 + self.cfg_rate) * cond - self.cfg_rate * uncond

    def sample(
        self,
        mu: torch.Tensor,
        mask: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        n_steps: int,
        on_step: StepHook | None = None,
    ) -> torch.Tensor:
        """Whole sequence. mu, cond (1, 80, T); mask (1, 1, T); spks (1, 80) -> mel (1, 80, T)."""
        x = self._noise(0, mu.shape[2], mu)
        grid = cosine_time_grid(n_steps, mu.dtype).to(mu.device)
        mask2 = torch.cat([mask, mask], dim=0)
        mu2 = torch.cat([mu, torch.zeros_like(mu)], dim=0)
        spks2 = torch.cat([spks, torch.zeros_like(spks)], dim=0)
        cond2 = torch.cat([cond, torch.zeros_like(cond)], dim=0)
        t = grid[0:1]
        dt = grid[1] - grid[0]
        for step in range(1, n_steps + 1):
            x2 = torch.cat([x, x], dim=0)
            v = self.estimator(x2, mask2, mu2, torch.cat([t, t]), spks2, cond2)
            if on_step is not None:
                on_step(step - 1, x2, v)
            x = x + dt * self._guided(v)
            t = t + dt
            if step < n_steps:
                dt = grid[step + 1] - t
        return x

    def sample_chunk(
        self,
        mu: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        n_steps: int,
        conv_cache: torch.Tensor | None,
        kv_cache: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Streaming chunk for B streams whose caches have the same length (mu (B, 80, T), spks (B, 80)).

        Caches are per step: conv (steps, depth, 2B, 2*hidden, 2) and kv (steps, depth, 2B, heads, t,
        2*head_dim), the B conditioned rows first, then the B unconditioned ones. All streams read the same
        noise (the offset is the cache length). Returns (mel, new conv cache, new kv cache), all new tensors.
        """
        batch = mu.shape[0]
        offset = 0 if kv_cache is None else kv_cache.shape[4]
        if kv_cache is not None and kv_cache.shape[0] < n_steps:
            raise ValueError(f"estimator cache holds {kv_cache.shape[0]} steps, {n_steps} are needed")
        x = self._noise(offset, mu.shape[2], mu).expand(batch, -1, -1)
        grid = self.time_grid(n_steps, mu.dtype, mu.device)
        mu2 = torch.cat([mu, torch.zeros_like(mu)], dim=0)
        spks2 = torch.cat([spks, torch.zeros_like(spks)], dim=0)
        cond2 = torch.cat([cond, torch.zeros_like(cond)], dim=0)
        t = grid[0:1]
        dt = grid[1] - grid[0]
        new_conv, new_kv = [], []
        for step in range(1, n_steps + 1):
            v, conv, kv = self.estimator.forward_chunk(
                x.repeat(2, 1, 1),
                mu2,
                t.repeat(2 * batch),
                spks2,
                cond2,
                None if conv_cache is None else conv_cache[step - 1],
                None if kv_cache is None else kv_cache[step - 1],
            )
            new_conv.append(conv)
            new_kv.append(kv)
            x = x + dt * self._guided(v)
            t = t + dt
            if step < n_steps:
                dt = grid[step + 1] - t
        return x, torch.stack(new_conv, dim=0), torch.stack(new_kv, dim=0)

    def sample_ragged(
        self,
        mu: torch.Tensor,
        spks: torch.Tensor,
        n_steps: int,
        conv_cache: torch.Tensor,
        kv_store: torch.Tensor,
        key_valid: torch.Tensor,
        cached_frames: torch.Tensor,
        valid_frames: torch.Tensor,
        write_pos: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`sample_chunk` for B streams whose estimator KV lives in a store, padded to common shapes.

        mu (B, 80, T): row b's first valid_frames[b] frames are real. The estimator rows are interleaved
        (2b conditioned, 2b + 1 unconditioned): conv (steps, depth, 2B, 2*hidden, 2) and the store kv_store
        (steps, depth, 2B, heads, C, 2*head_dim), whose positions key_valid (B, C) marks as row b's cached
        keys. Row b writes its chunk's keys at write_pos (B, T) (padding frames at a scratch position no mask
        marks) and reads its own noise at offset cached_frames[b] (its cache length). Returns (mel (B, 80, T),
        new conv cache); the store holds the chunk's keys afterwards.
        """
        batch, _, frames = mu.shape
        positions = cached_frames[:, None] + torch.arange(frames, device=mu.device)
        x = self.noise[0][:, positions].transpose(0, 1).to(dtype=mu.dtype)  # (B, 80, T)
        grid = self.time_grid(n_steps, mu.dtype, mu.device)
        mu2 = torch.stack([mu, torch.zeros_like(mu)], dim=1).flatten(0, 1)
        spks2 = torch.stack([spks, torch.zeros_like(spks)], dim=1).flatten(0, 1)
        cond2 = torch.zeros_like(mu2)
        valid2 = valid_frames.repeat_interleave(2)
        write2 = write_pos.repeat_interleave(2, dim=0)
        # the cached keys plus this chunk's real ones (padding frames all land on a scratch position; an idle
        # row's key_valid marks only that scratch, so its softmax stays finite)
        cached = key_valid.repeat_interleave(2, dim=0)
        key_mask = cached.scatter(1, write2, right_padded_mask(valid2, frames)) | cached
        t = grid[0:1]
        dt = grid[1] - grid[0]
        new_conv = []
        for step in range(1, n_steps + 1):
            v, conv = self.estimator.forward_ragged(
                x.repeat_interleave(2, dim=0),
                mu2,
                t.repeat(2 * batch),
                spks2,
                cond2,
                conv_cache[step - 1],
                kv_store[step - 1],
                key_mask,
                valid2,
                write2,
            )
            new_conv.append(conv)
            v = v.view(batch, 2, *v.shape[1:])
            x = x + dt * ((1.0 + self.cfg_rate) * v[:, 0] - self.cfg_rate * v[:, 1])
            t = t + dt
            if step < n_steps:
                dt = grid[step + 1] - t
        return x, torch.stack(new_conv, dim=0)
