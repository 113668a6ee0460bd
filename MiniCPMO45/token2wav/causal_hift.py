"""The streaming vocoder network: CosyVoice3's causal HiFT generator (our code, official key names).

Differences to the original generator: every conv is one-sided. conv_pre looks `conv_pre_look_right`
frames ahead, the F0 predictor's first conv looks 3 frames ahead (kernel 4), and all other convs look
back only. Upsampling is nearest repeat + causal conv, and the source downsampling convs are left-padded.
The source itself is produced by `streaming_vocoder.StreamingVocoder`, not here.
"""

from __future__ import annotations

from fractions import Fraction

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from .hift import HiFTBody
from .hift_layers import CausalConv1d, CausalDownsampleConv1d, CausalUpsampleConv1d, upsample_plan
from .hparams import HiFTParams


class CausalF0Predictor(nn.Module):
    """conv k=4 with 3 frames of right context, four k=3 left-causal convs (ELU after each), |linear|."""

    def __init__(self, in_channels: int, channels: int, num_class: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            weight_norm(CausalConv1d(in_channels, channels, 4, side="right")),
            nn.ELU(),
        ]
        for _ in range(4):
            layers += [weight_norm(CausalConv1d(channels, channels, 3, side="left")), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_class)

    @property
    def right_context(self) -> int:
        return self.condnet[0].context

    @property
    def left_context(self) -> int:
        return sum(layer.context for layer in list(self.condnet)[2::2])

    def forward(self, mel: torch.Tensor, final: bool = True) -> torch.Tensor:
        """mel (1, 80, T) -> F0 (1, T) if final (zero future), else (1, T - right_context) using the
        last frames as the look-ahead."""
        first = self.condnet[0]
        if final:
            h = first(mel)
        else:
            cut = mel.shape[2] - self.right_context
            h = first(mel[:, :, :cut], mel[:, :, cut:])
        for layer in list(self.condnet)[1:]:
            h = layer(h)
        return self.classifier(h.transpose(1, 2)).squeeze(-1).abs()


class CausalHiFTGenerator(HiFTBody):
    def __init__(self, p: HiFTParams) -> None:
        super().__init__(p)
        spec_channels = p.istft_n_fft + 2
        self.look_right = p.conv_pre_look_right
        self.conv_pre = weight_norm(
            CausalConv1d(p.in_channels, p.base_channels, p.conv_pre_look_right + 1, side="right")
        )
        if self.conv_pre.context != p.conv_pre_look_right:
            raise ValueError("conv_pre_look_right must be even (its kernel is look_right + 1)")
        self.ups = nn.ModuleList(
            weight_norm(CausalUpsampleConv1d(p.base_channels // (2**i), self.stage_channels(i), k, u))
            for i, (u, k) in enumerate(zip(p.upsample_rates, p.upsample_kernel_sizes, strict=True))
        )
        self.source_downs = nn.ModuleList(
            CausalConv1d(spec_channels, self.stage_channels(i), 1, side="left")
            if u == 1
            else CausalDownsampleConv1d(spec_channels, self.stage_channels(i), u)
            for i, u in enumerate(upsample_plan(p.upsample_rates))
        )
        self._build_common(causal=True)
        self.conv_post = weight_norm(
            CausalConv1d(self.stage_channels(len(p.upsample_rates) - 1), spec_channels, 7, side="left")
        )
        self.f0_predictor = CausalF0Predictor(
            p.in_channels, p.f0_predictor.cond_channels, p.f0_predictor.num_class
        )

    @property
    def stft_frames_per_mel_frame(self) -> int:
        return self.hop // self.p.istft_hop_len

    def decode(self, mel: torch.Tensor, source: torch.Tensor, final: bool) -> torch.Tensor:
        """mel (1, 80, T) and its source (1, 1, T*hop) -> waveform.

        final: zero future for conv_pre, T*hop samples out. Otherwise the last `look_right` mel frames are
        look-ahead only and the ISTFT's last (incomplete) frame is held back: (T - look_right - 1)*hop out.
        """
        return self.finish_decode(*self.decode_spectrum(mel, source, final), final)

    def decode_spectrum(
        self, mel: torch.Tensor, source: torch.Tensor, final: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`decode` up to the ISTFT (static shapes, no host syncs: what a CUDA graph captures)."""
        spec = self.spectral.analyse(source.squeeze(1))
        if final:
            x = self.conv_pre(mel)
        else:
            cut = mel.shape[2] - self.look_right
            x = self.conv_pre(mel[:, :, :cut], mel[:, :, cut:])
            spec = spec[:, :, : spec.shape[2] - self.stft_frames_per_mel_frame * self.look_right]
        return self.filter_spectrum(x, spec)

    def finish_decode(self, magnitude: torch.Tensor, phase: torch.Tensor, final: bool) -> torch.Tensor:
        """The rest of `decode`: ISTFT (no host wait: see `SpectralPair.synthesise`), hold back the incomplete
        last frame unless final, clamp. Runs after the padded decoder graph, on the real rows only."""
        wav = self.spectral.synthesise(magnitude, phase)
        if not final:
            wav = wav[:, : wav.shape[1] - self.hop]
        return wav.clamp(-self.p.audio_limit, self.p.audio_limit)

    def receptive_history(self) -> int:
        """Mel frames of past context that one output frame of `decode` can depend on.

        Follows every left-causal stage back through the filter network (upsampling convs, source STFT,
        source downsampling, residual blocks, conv_post, ISTFT), rounds up and adds two frames for the
        resampling grid, like the official bounded vocoder.
        """
        p = self.p
        frame_rate = 1
        for r in p.upsample_rates:
            frame_rate *= r
        transform = Fraction(p.istft_n_fft, self.hop)
        kernels = len(p.resblock_kernel_sizes)
        history, scale = Fraction(0), 1
        for stage, up in enumerate(self.ups):
            scale *= p.upsample_rates[stage]
            history += Fraction(up.kernel_size[0] - 1, scale)
            down = self.source_downs[stage]
            source_history = (
                transform
                + Fraction((down.kernel_size[0] - 1) * down.dilation[0], frame_rate)
                + Fraction(self.source_resblocks[stage].causal_history(), scale)
            )
            stage_blocks = self.resblocks[stage * kernels : (stage + 1) * kernels]
            history = max(history, source_history) + Fraction(
                max(block.causal_history() for block in stage_blocks), scale
            )
        history += Fraction(self.conv_post.context + 1, frame_rate) + transform
        return -(-history.numerator // history.denominator) + 2
