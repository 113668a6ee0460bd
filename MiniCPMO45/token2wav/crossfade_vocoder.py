"""Streaming with the original (non-causal) HiFT: the older token2wav layout's vocoder rule.

Each call re-synthesises the last 8 mel frames of the previous call together with the new ones, reusing
the previous call's last 3840 source samples, and cross-fades the first 3840 output samples with the
tail held back last time (Hamming window of 7680 samples: rising half on the new audio, falling half on
the old). A non-final call holds back its last 3840 samples; the first call instead starts with 3840
zero samples, so every call returns as many samples as it got mel frames (x480), and the final call
returns the held-back tail as well.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from .hift import HiFTGenerator

CACHE_FRAMES = 8


def hamming(length: int) -> torch.Tensor:
    """Symmetric Hamming window (float64): 0.54 - 0.46 cos(2 pi n / (length - 1))."""
    n = torch.arange(length, dtype=torch.float64)
    return 0.54 - 0.46 * torch.cos(2 * np.pi * n / (length - 1))


@dataclass(eq=False)
class CrossfadeState:
    mel: torch.Tensor  # (1, mels, <= 8) last mel frames of the previous call
    source: torch.Tensor  # (1, 1, <= 3840) last source samples of the previous call
    speech: torch.Tensor  # (1, <= 3840) held-back audio of the previous call
    generator: torch.Generator
    finalized: bool = False

    def clone(self) -> CrossfadeState:
        gen = torch.Generator(device=self.generator.device)
        gen.set_state(self.generator.get_state())
        return replace(
            self, mel=self.mel.clone(), source=self.source.clone(), speech=self.speech.clone(), generator=gen
        )


class CrossfadeVocoder:
    def __init__(self, model: HiFTGenerator, cache_frames: int = CACHE_FRAMES) -> None:
        self.model = model
        self.hop = model.hop
        self.cache_frames = cache_frames
        self.overlap = cache_frames * model.hop
        self.window = hamming(2 * self.overlap)

    @property
    def delay_samples(self) -> int:
        return self.overlap

    def new_state(self, seed: int = 0) -> CrossfadeState:
        device = self.model.conv_pre.bias.device
        return CrossfadeState(
            mel=torch.zeros(1, self.model.p.in_channels, 0, device=device),
            source=torch.zeros(1, 1, 0, device=device),
            speech=torch.zeros(1, 0, device=device),
            generator=torch.Generator().manual_seed(seed),
        )

    def _fade(self, speech: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        n = self.overlap
        window = self.window.to(speech.device)
        out = speech.clone()
        mixed = speech[:, :n].double() * window[:n] + previous[:, -n:].double() * window[n:]
        out[:, :n] = mixed.to(speech.dtype)
        return out

    @torch.inference_mode()
    def stream(self, state: CrossfadeState, mel: torch.Tensor, final: bool = False) -> torch.Tensor:
        """Fresh mel (1, mels, n) -> audio (1, m) float32."""
        if mel.ndim != 3 or mel.shape[0] != 1 or mel.shape[1] != state.mel.shape[1]:
            raise ValueError(f"mel must have shape (1, {state.mel.shape[1]}, n), got {tuple(mel.shape)}")
        if state.finalized:
            raise ValueError("this vocoder stream is already finalized; start a new state")
        full = torch.cat([state.mel, mel.float()], dim=2)
        if full.shape[2] == 0:
            state.finalized = final
            return mel.new_zeros(1, 0)
        speech, source, _ = self.model(full, cached_source=state.source, generator=state.generator)
        first = state.speech.shape[1] == 0
        if not first:
            speech = self._fade(speech, state.speech)
        state.mel = full[:, :, -self.cache_frames :].clone()
        state.source = source[:, :, -self.overlap :].clone()
        state.speech = speech[:, -self.overlap :].clone()
        if final:
            state.finalized = True
            return speech
        if first:
            return torch.cat([speech.new_zeros(1, self.overlap), speech[:, : -self.overlap]], dim=1)
        return speech[:, : -self.overlap]

    def stream_batch(
        self, states: list[CrossfadeState], mels: list[torch.Tensor], finals: list[bool]
    ) -> list[torch.Tensor]:
        """One call per stream (the random source makes each stream's call independent anyway)."""
        return [self.stream(st, mel, final) for st, mel, final in zip(states, mels, finals, strict=True)]
