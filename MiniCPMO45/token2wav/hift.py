"""The whole-utterance vocoder: the original CosyVoice2 HiFT generator (NSF source + ISTFTNet).

mel (1, 80, T) -> F0 (5 centred convs, |linear|) -> harmonic source at 24 kHz (SineGen2: phase integrated
at frame rate with linear interpolation, random initial phases, Gaussian noise) -> filter network
(transposed-conv upsampling 8x5x3 fused with the source's STFT at each stage) -> ISTFT (n_fft 16, hop 4).

`HiFTBody` holds the filter network both generators share; the causal variant lives in `causal_hift.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from .hift_layers import ResBlock, SpectralPair, upsample_plan
from .hparams import HiFTParams


class F0Predictor(nn.Module):
    """Five k=3 centred convs with ELU, then |linear| -> F0 in Hz per mel frame."""

    def __init__(self, in_channels: int, channels: int, num_class: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers.append(weight_norm(nn.Conv1d(in_channels if i == 0 else channels, channels, 3, padding=1)))
            layers.append(nn.ELU())
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_class)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        h = self.condnet(mel).transpose(1, 2)
        return self.classifier(h).squeeze(-1).abs()


class HarmonicMixer(nn.Module):
    """Merges the 9 harmonic channels into one excitation (the official `m_source` keys)."""

    def __init__(self, harmonics: int) -> None:
        super().__init__()
        self.l_linear = nn.Linear(harmonics, 1)

    def forward(self, harmonics: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.l_linear(harmonics))


@dataclass
class SourceNoise:
    """The random numbers the original source draws per call (inject them for reproducible output)."""

    initial_phase: torch.Tensor  # (1, harmonics) uniform [0, 1), column 0 is forced to 0
    gaussian: torch.Tensor  # (1, samples, harmonics) standard normal

    @staticmethod
    def draw(samples: int, harmonics: int, generator: torch.Generator | None = None) -> SourceNoise:
        return SourceNoise(
            torch.rand(1, harmonics, generator=generator),
            torch.randn(1, samples, harmonics, generator=generator),
        )


class HiFTBody(nn.Module):
    """Filter network and source mixer shared by the original and the causal generator."""

    def __init__(self, p: HiFTParams) -> None:
        super().__init__()
        self.p = p
        self.hop = p.hop_samples
        self.harmonics = p.nb_harmonics + 1
        self.spectral = SpectralPair(p.istft_n_fft, p.istft_hop_len)
        self.m_source = HarmonicMixer(self.harmonics)

    def stage_channels(self, stage: int) -> int:
        return self.p.base_channels // (2 ** (stage + 1))

    def _build_common(self, causal: bool) -> None:
        """Resblocks of both paths (the convs differ per subclass)."""
        p = self.p
        self.source_resblocks = nn.ModuleList(
            ResBlock(self.stage_channels(i), k, tuple(d), causal)
            for i, (k, d) in enumerate(
                zip(p.source_resblock_kernel_sizes, p.source_resblock_dilation_sizes, strict=True)
            )
        )
        self.resblocks = nn.ModuleList(
            ResBlock(self.stage_channels(i), k, tuple(d), causal)
            for i in range(len(p.upsample_rates))
            for k, d in zip(p.resblock_kernel_sizes, p.resblock_dilation_sizes, strict=True)
        )

    def filter(self, x: torch.Tensor, source_spec: torch.Tensor) -> torch.Tensor:
        """conv_pre output (1, base, T) and the source STFT -> waveform (1, samples), before clamping."""
        return self.spectral.synthesise(*self.filter_spectrum(x, source_spec))

    def filter_spectrum(
        self, x: torch.Tensor, source_spec: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`filter` up to the ISTFT: (magnitude, phase sine), each (b, n_fft/2 + 1, frames)."""
        p = self.p
        kernels = len(p.resblock_kernel_sizes)
        stages = len(p.upsample_rates)
        for i in range(stages):
            x = self.ups[i](F.leaky_relu(x, p.lrelu_slope))
            if i == stages - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](source_spec))
            total = self.resblocks[i * kernels](x)
            for j in range(1, kernels):
                total = total + self.resblocks[i * kernels + j](x)
            x = total / kernels
        x = self.conv_post(F.leaky_relu(x))
        bins = p.istft_n_fft // 2 + 1
        return torch.exp(x[:, :bins]), torch.sin(x[:, bins:])


class HiFTGenerator(HiFTBody):
    def __init__(self, p: HiFTParams) -> None:
        super().__init__(p)
        spec_channels = p.istft_n_fft + 2
        self.conv_pre = weight_norm(nn.Conv1d(p.in_channels, p.base_channels, 7, padding=3))
        self.ups = nn.ModuleList(
            weight_norm(
                nn.ConvTranspose1d(
                    p.base_channels // (2**i), self.stage_channels(i), k, u, padding=(k - u) // 2
                )
            )
            for i, (u, k) in enumerate(zip(p.upsample_rates, p.upsample_kernel_sizes, strict=True))
        )
        self.source_downs = nn.ModuleList(
            nn.Conv1d(spec_channels, self.stage_channels(i), 1)
            if u == 1
            else nn.Conv1d(spec_channels, self.stage_channels(i), 2 * u, u, padding=u // 2)
            for i, u in enumerate(upsample_plan(p.upsample_rates))
        )
        self._build_common(causal=False)
        self.conv_post = weight_norm(
            nn.Conv1d(self.stage_channels(len(p.upsample_rates) - 1), spec_channels, 7, padding=3)
        )
        self.f0_predictor = F0Predictor(p.in_channels, p.f0_predictor.cond_channels, p.f0_predictor.num_class)

    def source(self, f0: torch.Tensor, noise: SourceNoise) -> torch.Tensor:
        """F0 per frame (1, T) -> excitation (1, 1, T*hop)."""
        p = self.p
        f0_samples = torch.repeat_interleave(f0, self.hop, dim=1).unsqueeze(-1)  # (1, N, 1)
        multiples = torch.arange(1, self.harmonics + 1, dtype=f0.dtype, device=f0.device)
        cycles = (f0_samples * multiples / p.sampling_rate) % 1  # (1, N, H) cycles per sample
        initial = noise.initial_phase.to(cycles).clone()
        initial[:, 0] = 0
        cycles[:, 0, :] = cycles[:, 0, :] + initial
        # Integrate at frame rate (linear resampling down, cumulative sum, linear resampling up).
        per_frame = F.interpolate(cycles.transpose(1, 2), scale_factor=1 / self.hop, mode="linear")
        phase = torch.cumsum(per_frame, dim=2) * 2 * math.pi
        phase = F.interpolate(phase * self.hop, scale_factor=self.hop, mode="linear").transpose(1, 2)
        sines = torch.sin(phase) * p.nsf_alpha
        voiced = (f0_samples > p.nsf_voiced_threshold).to(sines)
        noise_amp = voiced * p.nsf_sigma + (1 - voiced) * p.nsf_alpha / 3
        gaussian = noise.gaussian.to(sines)
        if gaussian.shape != sines.shape:
            raise ValueError(
                f"source noise must have shape {tuple(sines.shape)}, got {tuple(gaussian.shape)}"
            )
        excitation = sines * voiced + noise_amp * gaussian
        return self.m_source(excitation).transpose(1, 2)

    @torch.inference_mode()
    def forward(
        self,
        mel: torch.Tensor,
        noise: SourceNoise | None = None,
        cached_source: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mel (1, 80, T) -> (waveform (1, T*hop), source (1, 1, T*hop), F0 (1, T)).

        `cached_source` (1, 1, n) replaces the first n source samples (used by cross-fade streaming so that
        overlapping audio is synthesised from the same excitation). Without `noise`, the random numbers
        are drawn from `generator` (or the global generator).
        """
        if mel.ndim != 3 or mel.shape[0] != 1 or mel.shape[1] != self.p.in_channels:
            raise ValueError(f"mel must have shape (1, {self.p.in_channels}, T), got {tuple(mel.shape)}")
        f0 = self.f0_predictor(mel)
        if noise is None:
            noise = SourceNoise.draw(mel.shape[2] * self.hop, self.harmonics, generator)
        source = self.source(f0, noise)
        if cached_source is not None and cached_source.shape[2]:
            source = source.clone()
            source[:, :, : cached_source.shape[2]] = cached_source
        wav = self.filter(self.conv_pre(mel), self.spectral.analyse(source.squeeze(1)))
        return wav.clamp(-self.p.audio_limit, self.p.audio_limit), source, f0
