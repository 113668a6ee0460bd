"""A Python WebRTC caller for the tests and the benchmark: real aiortc peer connection, paced audio out,
recorded audio in, the `events` data channel, and signal analysis (delay and similarity)."""

from __future__ import annotations

import asyncio
import fractions
import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from MiniCPMO45.audio.rates import MODEL_INPUT_RATE, WEBRTC_FRAME_SAMPLES, WEBRTC_RATE
from MiniCPMO45.audio.resample import AudioResampler, resample
from MiniCPMO45.audio.wav import read_mono

RATE = WEBRTC_RATE  # the caller's audio, both ways
FRAME = WEBRTC_FRAME_SAMPLES  # 20 ms
ESPEAK = "/usr/bin/espeak-ng"


def speech_signal(path: Path, text: str = "Hello, this is a microphone test, one two three.") -> np.ndarray:
    """Speech from espeak-ng at 48 kHz float32 (the WAV is written to `path` and reused)."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([ESPEAK, "-s", "170", "-w", str(path), text], check=True, capture_output=True)
    data, rate = read_mono(path)
    data = resample(data, rate, RATE)
    return (0.7 * data / max(np.abs(data).max(), 1e-6)).astype(np.float32)


class PacedAudioTrack(MediaStreamTrack):
    """Plays a 48 kHz float32 signal in 20 ms frames on a wall clock, then silence; logs send times."""

    kind = "audio"

    def __init__(self, signal: np.ndarray) -> None:
        super().__init__()
        self.signal = (np.clip(signal, -1, 1) * 32767).astype(np.int16)
        self.sent_at: list[float] = []  # time each frame was handed to the encoder
        self._start: float | None = None
        self._index = 0

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._start is None:
            self._start = now
        wait = self._start + self._index * FRAME / RATE - now
        if wait > 0:
            await asyncio.sleep(wait)
        frame = av.AudioFrame.from_ndarray(
            self.chunk(self._index).reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = RATE
        frame.time_base = fractions.Fraction(1, RATE)
        frame.pts = self._index * FRAME
        self.sent_at.append(time.monotonic())
        self._index += 1
        return frame

    def chunk(self, index: int) -> np.ndarray:
        """The samples of frame `index`: the signal, then silence."""
        chunk = self.signal[index * FRAME : (index + 1) * FRAME]
        return chunk if chunk.size == FRAME else np.pad(chunk, (0, FRAME - chunk.size))

    def timeline_start(self) -> float:
        """When sample 0 was sent: frames are never sent before their slot, only late (a busy loop)."""
        times = np.array(self.sent_at) - np.arange(len(self.sent_at)) * FRAME / RATE
        return float(times.min())


@dataclass
class Recorder:
    """Collects what the server sends back, with each frame's arrival time."""

    chunks: list[np.ndarray] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    arrived_at: list[float] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    samples: int = 0
    keep: bool = True  # False: only count frames (benchmark callers)
    frames: int = 0

    def start(self, track: MediaStreamTrack) -> None:
        self.task = asyncio.ensure_future(self._run(track))

    async def _run(self, track: MediaStreamTrack) -> None:
        resampler = AudioResampler(format="flt", layout="mono", rate=RATE)
        try:
            while True:
                frame = await track.recv()
                self.frames += 1
                if not self.keep:
                    continue
                now = time.monotonic()
                for out in resampler.resample(frame):
                    pcm = out.to_ndarray().reshape(-1).astype(np.float32)
                    self.offsets.append(self.samples)
                    self.arrived_at.append(now)
                    self.chunks.append(pcm)
                    self.samples += pcm.size
        except MediaStreamError:
            pass

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    def signal(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.float32)

    def timeline_start(self) -> float:
        """When sample 0 arrived, if nothing had been late: a busy loop only delays frames, so a low
        percentile of (arrival - position) is the undelayed timeline (the 5th, to ignore an odd early frame)."""
        times = np.array(self.arrived_at) - np.array(self.offsets) / RATE
        return float(np.percentile(times, 5))


def align(sent: np.ndarray, received: np.ndarray, rate: int = 16000) -> tuple[int, float]:
    """Lag (samples at `rate`) of `sent` inside `received`, and the normalised cross-correlation there."""
    n = 1 << int(np.ceil(np.log2(sent.size + received.size)))
    corr = np.fft.irfft(np.fft.rfft(received, n) * np.conj(np.fft.rfft(sent, n)), n)[: received.size]
    lag = int(np.argmax(corr))
    window = received[lag : lag + sent.size]
    ref = sent[: window.size]
    denom = float(np.sqrt(np.dot(ref, ref) * np.dot(window, window)))
    return lag, float(np.dot(ref, window) / denom) if denom > 0 else 0.0


@dataclass
class Call:
    """One caller: a peer connection with a paced audio track, a recorder and the events channel."""

    base_url: str
    signal: np.ndarray
    token: str | None = None
    pc: RTCPeerConnection = field(default_factory=lambda: RTCPeerConnection(RTCConfiguration(iceServers=[])))
    events: list[dict[str, Any]] = field(default_factory=list)
    recorder: Recorder = field(default_factory=Recorder)
    session_id: str | None = None
    location: str | None = None

    def __post_init__(self) -> None:
        self.track = PacedAudioTrack(self.signal)
        self.pc.addTrack(self.track)
        self.channel = self.pc.createDataChannel("events")
        self.channel.on("message", lambda data: self.events.append(json.loads(data)))
        self.pc.on("track", lambda track: self.recorder.start(track) if track.kind == "audio" else None)
        self.channel_open = asyncio.Event()
        self.channel.on("open", self.channel_open.set)

    def headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {} if content_type is None else {"Content-Type": content_type}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    async def _offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def start_whip(self, mode: str = "loopback") -> None:
        sdp = await self._offer()
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{self.base_url}/whip?mode={mode}", data=sdp, headers=self.headers("application/sdp")
            ) as resp:
                body = await resp.text()
                if resp.status != 201:
                    raise RuntimeError(f"WHIP POST answered {resp.status}: {body}")
                assert resp.content_type == "application/sdp"
                self.location = resp.headers["Location"]
        self.session_id = self.location.rsplit("/", 1)[1]
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))

    async def post_json(self, mode: str = "loopback", **extra: Any) -> dict[str, Any]:
        """POST the offer to /api/sessions and return the 201 body; the answer is not applied yet."""
        sdp = await self._offer()
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{self.base_url}/api/sessions",
                json={"sdp": sdp, "type": "offer", "mode": mode, **extra},
                headers=self.headers(),
            ) as resp:
                body = await resp.json()
                if resp.status != 201:
                    raise RuntimeError(f"POST /api/sessions answered {resp.status}: {body}")
                self.location = resp.headers["Location"]
        assert body["type"] == "answer"
        self.session_id = body["session_id"]
        return body

    async def apply_answer(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

    async def start_json(self, mode: str = "loopback", **extra: Any) -> None:
        body = await self.post_json(mode, **extra)
        await self.apply_answer(body["sdp"])

    async def wait_connected(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while self.pc.connectionState != "connected":
            if time.monotonic() > deadline:
                raise TimeoutError(f"not connected (state {self.pc.connectionState})")
            await asyncio.sleep(0.05)

    async def wait_event(self, kind: str, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event.get("type") == kind and all(event.get(k) == v for k, v in match.items()):
                    return event
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {kind} event {match or ''}; got {self.events}")
            await asyncio.sleep(0.05)

    def send(self, message: dict[str, Any] | str) -> None:
        self.channel.send(message if isinstance(message, str) else json.dumps(message))

    async def hang_up(self) -> int:
        """DELETE the session (WHIP or JSON location); returns the status."""
        async with aiohttp.ClientSession() as http:
            async with http.delete(f"{self.base_url}{self.location}", headers=self.headers()) as resp:
                return resp.status

    async def close(self) -> None:
        await self.recorder.stop()
        await self.pc.close()

    def measure(self) -> tuple[float, float, np.ndarray]:
        """Delay heard (s), global normalised cross-correlation, and per-window correlations.

        The windows (250 ms of sent audio with signal in it) are re-aligned within +-10 ms of the global
        lag: a dropped packet under CPU load shifts the rest of the recording a little, which lowers the
        global figure without making the audio any less the caller's own voice.
        """
        sent16 = resample(self.signal, RATE, MODEL_INPUT_RATE)
        received16 = resample(self.recorder.signal(), RATE, MODEL_INPUT_RATE)
        lag, ncc = align(sent16, received16)
        delay = self.recorder.timeline_start() + lag / 16000 - self.track.timeline_start()
        return delay, ncc, windowed_similarity(sent16, received16, lag)


def windowed_similarity(sent: np.ndarray, received: np.ndarray, lag: int, rate: int = 16000) -> np.ndarray:
    win, slack = rate // 4, rate // 100
    out = []
    for start in range(0, sent.size - win + 1, win):
        seg = sent[start : start + win]
        if np.sqrt(np.mean(seg**2)) < 0.02:
            continue  # silence: nothing to compare
        lo = max(lag + start - slack, 0)
        region = received[lo : lag + start + win + slack]
        if region.size < win:
            out.append(0.0)
            continue
        out.append(align(seg, region)[1])
    return np.array(out)
