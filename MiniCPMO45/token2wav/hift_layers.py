"""Building blocks shared by both HiFT vocoders: padded/causal convolutions, Snake, residual blocks, STFT."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from ..modules.compiled import fallback_on_error


def centered_padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


class CausalConv1d(nn.Conv1d):
    """Stride-1 conv that only sees one side: `left` (past) or `right` (future) context.

    The context length is the total padding a centred conv of this kernel/dilation would use (plus one
    for even kernels). `forward(x, context)` uses the given context frames instead of zeros, so a
    right-sided conv can be fed real look-ahead frames.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1, side: str = "left"
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation)
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        self.side = side
        self.context = 2 * centered_padding(kernel_size, dilation) + (kernel_size + 1) % 2

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is None:
            context = x.new_zeros(x.shape[0], x.shape[1], self.context)
        if context.shape[2] != self.context:
            raise ValueError(f"expected {self.context} context frames, got {context.shape[2]}")
        x = torch.cat([context, x] if self.side == "left" else [x, context], dim=2)
        return super().forward(x)


class CausalDownsampleConv1d(nn.Conv1d):
    """Strided conv (kernel 2*stride) with stride-1 zero frames on the left."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__(in_channels, out_channels, 2 * stride, stride=stride)
        self.left = stride - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.left, 0)))


class CausalUpsampleConv1d(nn.Conv1d):
    """Nearest upsampling by `stride`, then a left-causal conv keeping the length."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size)
        self.stride_up = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.repeat_interleave(x, self.stride_up, dim=2)
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))


def snake(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """x (b, channels, n) + sin^2(alpha * x) / alpha, alpha (channels,)."""
    a = alpha[None, :, None]
    return x + (1.0 / (a + 1e-9)) * torch.sin(x * a).pow(2)


class Snake(nn.Module):
    """x + sin^2(alpha * x) / alpha, one alpha per channel. `kernel`: the function that computes it (eagerly six
    element-wise kernels over the whole signal; `fuse_snakes` swaps in one fused kernel)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))
        self.kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = snake

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # detached: Dynamo keeps a parameter's shape static, so each channel count would trace its own graph
        return self.kernel(x, self.alpha.detach())


def fuse_snakes(module: nn.Module, backend: object = "inductor") -> int:
    """Every Snake under `module` through one `torch.compile` of `snake` (dynamic shapes: one compile serves
    every channel count and length), compiled now on the module's device and dtype. The vocoder's Snakes run
    over the upsampled signal (up to 24,000 samples a second per stream): on a GPU they were the largest
    element-wise cost of a tick. Returns how many Snakes it swapped."""
    snakes = [m for m in module.modules() if isinstance(m, Snake)]
    if not snakes:
        return 0
    compiled = fallback_on_error(
        torch.compile(snake, dynamic=True, fullgraph=True, backend=backend), snake, "the vocoder's Snake"
    )
    like = snakes[0].alpha
    # one stream and batches (Dynamo keeps a size of 1 apart), channel counts and lengths that change, the
    # signal made in inference mode and alpha outside it, as live calls have them: those trace nothing new
    for b, c, n in ((1, 12, 50), (1, 6, 70), (2, 5, 90), (3, 7, 110)):
        alpha = torch.ones(c, dtype=like.dtype, device=like.device)
        with torch.inference_mode():  # as the vocoder runs: Dynamo guards on it
            compiled(torch.zeros(b, c, n, dtype=like.dtype, device=like.device), alpha)
    for m in snakes:
        m.kernel = compiled
    return len(snakes)


class ResBlock(nn.Module):
    """Three Snake -> dilated conv -> Snake -> conv residual units (centred or left-causal convs)."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...], causal: bool) -> None:
        super().__init__()

        def conv(dilation: int) -> nn.Conv1d:
            if causal:
                layer: nn.Conv1d = CausalConv1d(channels, channels, kernel_size, dilation, side="left")
            else:
                layer = nn.Conv1d(
                    channels,
                    channels,
                    kernel_size,
                    dilation=dilation,
                    padding=centered_padding(kernel_size, dilation),
                )
            return weight_norm(layer)

        self.convs1 = nn.ModuleList(conv(d) for d in dilations)
        self.convs2 = nn.ModuleList(conv(1) for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2, a1, a2 in zip(
            self.convs1, self.convs2, self.activations1, self.activations2, strict=True
        ):
            x = x + c2(a2(c1(a1(x))))
        return x

    def causal_history(self) -> int:
        """Past samples one output depends on (causal blocks only)."""
        return sum(c.context for c in (*self.convs1, *self.convs2))  # type: ignore[union-attr]


def hann_window(n_fft: int) -> torch.Tensor:
    """Periodic Hann window, computed in float64 then rounded (as scipy's get_window does)."""
    return torch.hann_window(n_fft, periodic=True, dtype=torch.float64).float()


class SpectralPair(nn.Module):
    """The tiny STFT/ISTFT pair of ISTFTNet (centred, Hann, n_fft 16, hop 4 in the real config)."""

    def __init__(self, n_fft: int, hop: int) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.hop = hop
        self.register_buffer("window", hann_window(n_fft), persistent=False)
        if hop * 2 > n_fft:
            raise ValueError(f"hop {hop} must be at most n_fft / 2 = {n_fft // 2} (overlap-add needs it)")
        self._envelopes: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def analyse(self, signal: torch.Tensor) -> torch.Tensor:
        """signal (b, n) -> (b, 2*(n_fft//2+1), frames): real parts then imaginary parts."""
        spec = torch.stft(signal, self.n_fft, self.hop, self.n_fft, window=self.window, return_complex=True)
        return torch.cat([spec.real, spec.imag], dim=1)

    def synthesise(self, magnitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        """(b, n_fft//2+1, frames) magnitude and phase -> (b, hop*(frames-1)): `torch.istft` (centred, Hann),
        written out as inverse FFT, overlap-add and division by the window envelope. `torch.istft` checks its
        envelope on the host, which makes the host wait for the device on every call."""
        magnitude = magnitude.clamp(max=1e2)
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        frames = torch.fft.irfft(spec, n=self.n_fft, dim=1) * self.window[:, None]  # (b, n_fft, frames)
        count = frames.shape[2]
        full = self.n_fft + self.hop * (count - 1)
        signal = F.fold(frames, (1, full), (1, self.n_fft), stride=(1, self.hop))[:, 0, 0]
        half = self.n_fft // 2
        return signal[:, half : full - half] / self._envelope(count, signal.dtype)

    def _envelope(self, count: int, dtype: torch.dtype) -> torch.Tensor:
        """The overlapped squared window of `count` frames, trimmed like the signal (never zero for Hann
        with hop <= n_fft / 2: the check `torch.istft` does on the host holds by construction)."""
        key = (count, dtype, self.window.device)
        cached = self._envelopes.get(key)
        if cached is None:
            squares = (self.window**2).to(dtype)[None, :, None].expand(1, self.n_fft, count)
            full = self.n_fft + self.hop * (count - 1)
            total = F.fold(squares, (1, full), (1, self.n_fft), stride=(1, self.hop))[0, 0, 0]
            half = self.n_fft // 2
            cached = self._envelopes[key] = total[half : full - half]
        return cached


def upsample_plan(upsample_rates: tuple[int, ...]) -> list[int]:
    """Per upsampling stage, how many source-STFT frames fold into one frame of that stage."""
    rates = [1, *reversed(upsample_rates)][: len(upsample_rates)]
    cumulative = []
    total = 1
    for r in rates:
        total *= r
        cumulative.append(total)
    return list(reversed(cumulative))
