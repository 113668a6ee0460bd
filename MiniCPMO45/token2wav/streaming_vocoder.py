"""Streaming mel -> waveform with the causal HiFT and a bounded history (the official BoundedVocoder rule).

Mel arrives in calls of any size and is processed in blocks of `block_frames` (16). For each block:

1. F0 is predicted (in float64) for every frame that has its 3 frames of right context, re-running the
   predictor over the 8 frames of left context it needs.
2. The excitation for those frames is built with a float64 phase carried across calls (starting at 0):
   per frame, phase += hop * f0 * k / sr for harmonic k; the sine is held for the frame's 480 samples.
   The additive noise is read from a fixed uniform [0, 1) table at absolute sample positions.
3. Audio is decoded for every frame that has conv_pre's 4 frames of look-ahead plus one frame for the
   ISTFT overlap, re-running the filter network over `history` (31) frames of past context.

So output lags input by 3 + 4 + 1 = 8 frames (3840 samples) until the final call flushes them. The first
non-empty, non-final output is prefixed with 3840 zero samples, so audio stays aligned with the mel.
State lives in `VocoderState` (one per stream); the model and the noise table are shared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .causal_hift import CausalF0Predictor, CausalHiFTGenerator

# The official table covers 300 s and is drawn unseeded at build time, so its values cannot be matched
# anyway; a 60 s table (52 MB) read at absolute positions modulo its length only changes the period.
NOISE_TABLE_SECONDS = 60


def default_source_noise_table(
    harmonics: int, sample_rate: int = 24000, seconds: float = NOISE_TABLE_SECONDS, seed: int = 0
) -> torch.Tensor:
    """Uniform [0, 1) table (1, seconds*sample_rate, harmonics) from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(1, int(seconds * sample_rate), harmonics, generator=gen)


@dataclass(eq=False)
class VocoderState:
    """Per-stream state. Frame indices are absolute (since the stream started)."""

    mel: torch.Tensor  # (1, mels, n) float32, mel frames [mel_start, mel_start + n)
    source: torch.Tensor  # (1, 1, n*hop) float32, excitation of frames [source_start, ...)
    phase: torch.Tensor  # (1, 1, harmonics) float64, in cycles
    mel_start: int = 0
    source_start: int = 0
    source_end: int = 0
    emitted: int = 0
    finalized: bool = False
    first_output_pending: bool = True

    def clone(self) -> VocoderState:
        return replace(self, mel=self.mel.clone(), source=self.source.clone(), phase=self.phase.clone())


class StreamingVocoder:
    def __init__(self, model: CausalHiFTGenerator, noise_table: torch.Tensor, block_frames: int = 16) -> None:
        if model.training:
            raise ValueError("the streaming vocoder needs an eval-mode CausalHiFTGenerator")
        if block_frames < 1:
            raise ValueError("block_frames must be a positive integer")
        if noise_table.ndim != 3 or noise_table.shape[2] != model.harmonics:
            raise ValueError(
                f"noise table must have shape (1, n, {model.harmonics}), got {tuple(noise_table.shape)}"
            )
        self.model = model
        self.noise_table = noise_table
        self.block_frames = block_frames
        self.hop = model.hop
        p = model.p
        # A float64 copy of the F0 predictor: F0 errors accumulate in the phase, so it runs in double.
        self.f0_model = CausalF0Predictor(
            p.in_channels, p.f0_predictor.cond_channels, p.f0_predictor.num_class
        )
        self.f0_model.load_state_dict(model.f0_predictor.state_dict())
        self.f0_model = self.f0_model.double().eval().to(next(model.parameters()).device)
        self.f0_left = self.f0_model.left_context
        self.f0_right = self.f0_model.right_context
        self.decoder_right = model.look_right + 1
        self.history = model.receptive_history()

    @property
    def delay_frames(self) -> int:
        return self.f0_right + self.decoder_right

    @property
    def delay_samples(self) -> int:
        return self.delay_frames * self.hop

    def new_state(self) -> VocoderState:
        device = self.model.conv_pre.bias.device
        return VocoderState(
            mel=torch.zeros(1, self.model.p.in_channels, 0, device=device),
            source=torch.zeros(1, 1, 0, device=device),
            phase=torch.zeros(1, 1, self.model.harmonics, dtype=torch.float64, device=device),
        )

    def _excitation(self, state: VocoderState, f0: torch.Tensor, first_frame: int) -> torch.Tensor:
        """F0 (1, n) of frames starting at absolute `first_frame` -> excitation (1, 1, n*hop)."""
        p = self.model.p
        multiples = torch.arange(1, self.model.harmonics + 1, dtype=f0.dtype, device=f0.device)
        per_sample = (f0[:, :, None] * multiples / p.sampling_rate).remainder(1)
        cycles = per_sample.double().cumsum(dim=1) * self.hop + state.phase
        state.phase = cycles[:, -1:].remainder(1).clone()
        sine = torch.sin(cycles.remainder(1) * (2 * math.pi)).to(f0)
        sine = sine.repeat_interleave(self.hop, dim=1)
        voiced = (f0[:, :, None] > p.nsf_voiced_threshold).to(f0).repeat_interleave(self.hop, dim=1)
        noise_amp = voiced * p.nsf_sigma + (1 - voiced) * p.nsf_alpha / 3
        start = first_frame * self.hop
        positions = torch.arange(start, start + sine.shape[1], device=f0.device) % self.noise_table.shape[1]
        noise = self.noise_table[:, positions.to(self.noise_table.device)].to(f0)
        excitation = sine * p.nsf_alpha * voiced + noise_amp * noise
        return self.model.m_source(excitation).transpose(1, 2)

    def _advance(self, state: VocoderState, final: bool) -> torch.Tensor:
        hop = self.hop
        received = state.mel_start + state.mel.shape[2]
        source_ready = received if final else max(0, received - self.f0_right)
        if source_ready > state.source_end:
            start = max(0, state.source_end - self.f0_left)
            feats = state.mel[:, :, start - state.mel_start :]
            f0 = self.f0_model(feats.double(), final=final).to(feats)[:, state.source_end - start :]
            pieces = [state.source]
            for block in f0.split(self.block_frames, dim=1):
                pieces.append(self._excitation(state, block, state.source_end))
                state.source_end += block.shape[1]
            state.source = torch.cat(pieces, dim=2)

        speech_ready = state.source_end if final else max(0, state.source_end - self.decoder_right)
        speech = state.mel.new_zeros(1, 0)
        if speech_ready > state.emitted:
            start = max(0, state.emitted - self.history)
            feats = state.mel[:, :, start - state.mel_start : state.source_end - state.mel_start]
            source = state.source[:, :, (start - state.source_start) * hop :]
            speech = self.model.decode(feats, source, final)[:, (state.emitted - start) * hop :]
            if speech.shape[1] != (speech_ready - state.emitted) * hop:
                raise RuntimeError("streaming vocoder produced an unexpected number of samples")
            state.emitted = speech_ready

        keep_mel = max(0, min(state.emitted - self.history, state.source_end - self.f0_left))
        keep_source = max(0, state.emitted - self.history)
        state.mel = state.mel[:, :, keep_mel - state.mel_start :].clone()
        state.source = state.source[:, :, (keep_source - state.source_start) * hop :].clone()
        state.mel_start = keep_mel
        state.source_start = keep_source
        return speech

    @torch.inference_mode()
    def stream(self, state: VocoderState, mel: torch.Tensor, final: bool = False) -> torch.Tensor:
        """Feed fresh mel (1, mels, n); returns the samples (1, m) that became ready (float32).

        `final` flushes the delayed frames; afterwards the state accepts only empty final calls.
        """
        if mel.ndim != 3 or mel.shape[0] != 1 or mel.shape[1] != state.mel.shape[1]:
            raise ValueError(f"mel must have shape (1, {state.mel.shape[1]}, n), got {tuple(mel.shape)}")
        if state.finalized:
            if mel.shape[2] or not final:
                raise ValueError("this vocoder stream is already finalized; start a new state")
            return mel.new_zeros(1, 0)
        pieces = []
        for part in mel.split(self.block_frames, dim=2):
            if part.shape[2] == 0:
                continue
            state.mel = torch.cat([state.mel, part.float()], dim=2)
            pieces.append(self._advance(state, final=False))
        if final:
            pieces.append(self._advance(state, final=True))
            state.finalized = True
        speech = torch.cat(pieces, dim=1) if pieces else mel.new_zeros(1, 0)
        if speech.shape[1] and state.first_output_pending:
            state.first_output_pending = False
            if not final:
                speech = torch.cat([speech.new_zeros(1, self.delay_samples), speech], dim=1)
        return speech
