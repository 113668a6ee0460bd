"""Test helpers for media tests: generated source tracks, a loopback peer connection pair, signal checks."""

from __future__ import annotations

import asyncio
import fractions
import time
from collections.abc import Callable, Iterable

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError

from MiniCPMO45.audio.rates import WEBRTC_FRAME_SAMPLES, WEBRTC_RATE


def stepped_tone(t: np.ndarray, freqs: list[float], step_s: float, amplitude: float = 0.4) -> np.ndarray:
    """A phase-continuous tone whose frequency changes every `step_s` seconds (last one holds)."""
    idx = np.minimum((t // step_s).astype(int), len(freqs) - 1)
    f = np.asarray(freqs, dtype=np.float64)
    # phase(t) = 2π (Σ_{j<i} f_j·step + f_i·(t − i·step)) for t in step i
    starts = np.concatenate([[0.0], np.cumsum(f[:-1] * step_s)])
    phase = 2 * np.pi * (starts[idx] + f[idx] * (t - idx * step_s))
    return amplitude * np.sin(phase)


def chirp(t: np.ndarray, f0: float, f1: float, duration: float, amplitude: float = 0.4) -> np.ndarray:
    """Linear chirp from f0 to f1 over `duration` seconds."""
    k = (f1 - f0) / duration
    return amplitude * np.sin(2 * np.pi * (f0 * t + 0.5 * k * t * t))


class FunctionAudioTrack(MediaStreamTrack):
    """Paced 20 ms frames of s16 48 kHz audio computed from `signal(t_seconds)`; stereo like a browser."""

    kind = "audio"

    def __init__(self, signal: Callable[[np.ndarray], np.ndarray], layout: str = "stereo") -> None:
        super().__init__()
        self.signal = signal
        self.layout = layout
        self.frames_sent = 0
        self._start: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        pts = self.frames_sent * WEBRTC_FRAME_SAMPLES
        wait = self._start + pts / WEBRTC_RATE - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        t = (pts + np.arange(WEBRTC_FRAME_SAMPLES)) / WEBRTC_RATE
        mono = np.round(np.clip(self.signal(t), -1, 1) * 32767).astype(np.int16)
        channels = 2 if self.layout == "stereo" else 1
        data = np.repeat(mono, channels).reshape(1, -1)  # packed s16: interleaved samples
        frame = av.AudioFrame.from_ndarray(data, format="s16", layout=self.layout)
        frame.sample_rate = WEBRTC_RATE
        frame.pts = pts
        frame.time_base = fractions.Fraction(1, WEBRTC_RATE)
        self.frames_sent += 1
        return frame


class FramesTrack(MediaStreamTrack):
    """Returns the given frames as fast as they are pulled, then ends (MediaStreamError)."""

    def __init__(self, kind: str, frames: Iterable[av.AudioFrame | av.VideoFrame]) -> None:
        super().__init__()
        self.kind = kind
        self._frames = iter(frames)

    async def recv(self) -> av.AudioFrame | av.VideoFrame:
        await asyncio.sleep(0)
        try:
            return next(self._frames)
        except StopIteration:
            self.stop()
            raise MediaStreamError from None


class ColourVideoTrack(MediaStreamTrack):
    """Paced 30 fps frames of one solid RGB colour."""

    kind = "video"

    def __init__(self, rgb: tuple[int, int, int], width: int = 640, height: int = 480) -> None:
        super().__init__()
        image = np.empty((height, width, 3), dtype=np.uint8)
        image[:] = rgb
        self._image = image
        self._count = 0
        self._start: float | None = None

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self._count / 30 - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        frame = av.VideoFrame.from_ndarray(self._image, format="rgb24")
        frame.pts = self._count * 3000
        frame.time_base = fractions.Fraction(1, 90000)
        self._count += 1
        return frame


async def connect_pair(
    tracks: list[MediaStreamTrack],
) -> tuple[RTCPeerConnection, RTCPeerConnection, list[MediaStreamTrack]]:
    """Offer/answer between two in-process peer connections over loopback; returns the remote tracks."""
    config = RTCConfiguration(iceServers=[])  # no STUN: the test machine may have no network
    sender = RTCPeerConnection(config)
    receiver = RTCPeerConnection(config)
    remote: list[MediaStreamTrack] = []
    receiver.on("track", remote.append)
    for track in tracks:
        sender.addTrack(track)
    await sender.setLocalDescription(await sender.createOffer())
    await receiver.setRemoteDescription(sender.localDescription)
    await receiver.setLocalDescription(await receiver.createAnswer())
    await sender.setRemoteDescription(receiver.localDescription)
    assert len(remote) == len(tracks)
    return sender, receiver, remote


def dominant_frequency(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.argmax(spectrum) * rate / x.size)


def best_correlation(received: np.ndarray, expected: np.ndarray, max_lag: int) -> tuple[float, int]:
    """Max normalised correlation of `received[lag:]` with `expected` over lags 0..max_lag."""
    n = received.size + expected.size
    size = 1 << (n - 1).bit_length()
    corr = np.fft.irfft(np.fft.rfft(received, size) * np.conj(np.fft.rfft(expected, size)), size)
    best_lag = int(np.argmax(corr[: max_lag + 1]))
    length = min(received.size - best_lag, expected.size)
    a = received[best_lag : best_lag + length]
    b = expected[:length]
    score = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
    return score, best_lag
