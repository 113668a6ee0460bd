"""Outbound speech: model PCM → a paced 48 kHz WebRTC audio track that can be flushed at once.

aiortc's RTP sender pulls `recv()` as fast as it returns, so the track paces itself on the wall clock:
packet k is due at start + k·`packet_ms`. Every packet is `packet_ms` (20, 40 or 60 ms; `rtc.outbound_packet_ms`)
of s16 mono at 48 kHz (48 kHz input avoids the extra frame of delay the Opus encoder adds when it has to
resample). Speech is resampled once, when pushed, into a fixed-size ring buffer; `recv()` only copies one
packet's samples out of it.

Interruption: `flush()` empties the ring (the next frame is silence) and a turn counter makes late
pushes of a finished turn harmless. All methods must be called on the event loop's thread.

With `encode=True` (the server's calls) `recv()` returns Opus packets encoded here, in mono, on the event loop
(~60 µs a 20 ms frame at libopus's compression level 5, `rtc.opus_compression_level`; a repeated 3-byte packet
for silence once the encoder has settled on it): aiortc then only packs them, one RTP packet each, whose RTP
timestamp is the packet's pts (so it steps by the packet's duration). Longer packets mean fewer RTP packets,
SRTP operations, UDP sends and loop wake-ups per call; they cost up to one packet of extra delay before speech
starts and lose more audio per lost packet. Given raw frames (`encode=False`, 20 ms only), aiortc's sender
resamples each one to stereo and encodes it in its thread pool, a thread hand-off every 20 ms per call.
"""

from __future__ import annotations

import asyncio
import fractions
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from MiniCPMO45.audio.rates import SPEECH_RATE, WEBRTC_FRAME_SAMPLES, WEBRTC_RATE
from MiniCPMO45.audio.resample import AudioResampler

FRAME_S = WEBRTC_FRAME_SAMPLES / WEBRTC_RATE
TIME_BASE = fractions.Fraction(1, WEBRTC_RATE)
# libopus's compression level ("complexity", 0-10) for the outbound speech: measured on espeak-ng speech at
# 48 kbps in CELT low-delay mode (bench/opus_levels.py), level 5 costs 25 % less CPU per frame than 10 (58 against
# 78 µs) for 0.9 dB less waveform SNR; levels 1-4 lose another 1.3 dB, and level 0 (36 µs) keeps the SNR but has
# the largest per-bin spectral distance (3.5 dB against 3.2 at 5 and 3.0 at 10). `rtc.opus_compression_level`
DEFAULT_COMPRESSION_LEVEL = 5
# all-zero frames that libopus must have coded as one same packet before the encoder is skipped for silence
SILENCE_REPEATS = 3
# Outbound packet durations libopus and the track support (`rtc.outbound_packet_ms`)
PACKET_MS_CHOICES = (20, 40, 60)
# The calls' default (`rtc.outbound_packet_ms`; a bare SpeechTrack sends 20 ms). Measured through the product on the
# 2-vCPU VM (docs/PERFORMANCE.md, "Twelfth session"), media CPU per audio-duplex call against 20 ms packets: 40 ms
# -21 %, 60 ms -23 %; 40 ms costs up to 20 ms more before speech starts and after a cut (one packet already
# sent), and a lost packet loses 40 ms; Chromium's jitter buffer did not grow (20-30 ms at every size).
DEFAULT_PACKET_MS = 40
# The outbound tracks of a process start their schedules (one packet every `packet_ms`) on this many shared phases
# (round robin) of a process-wide grid, so the event loop wakes for them WAKE_PHASES times a packet, not once per
# call: packets due at the same instant are sent in one pass of the loop. More phases: smaller bursts (less
# lateness for the last packet of a phase).
WAKE_PHASES = 4
_phase_counter = itertools.count()


def _phase_start(now: float, period_s: float = FRAME_S) -> float:
    """The first instant at or after `now` on the next track's phase of the process's grid of `period_s`."""
    offset = (next(_phase_counter) % WAKE_PHASES) * period_s / WAKE_PHASES
    return math.ceil((now - offset) / period_s) * period_s + offset


def check_packet_ms(packet_ms: int) -> int:
    if isinstance(packet_ms, bool) or not isinstance(packet_ms, int) or packet_ms not in PACKET_MS_CHOICES:
        raise ValueError(f"packet_ms must be one of {PACKET_MS_CHOICES}, got {packet_ms!r}")
    return packet_ms


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _check_turn(turn: int) -> int:
    if isinstance(turn, bool) or not isinstance(turn, int | np.integer):
        raise ValueError(f"turn must be an int, got {turn!r}")
    return int(turn)


@dataclass
class PacingStats:
    """How far each packet's actual return time was from its due time on the track's schedule."""

    frames: int = 0  # packets returned (20 ms frames when the track's packets are 20 ms)
    late_frames: int = 0  # packets returned more than `late_threshold_s` after they were due
    reanchors: int = 0  # stalls after which the schedule was moved to the present
    skipped_frames: int = 0  # packet slots skipped by re-anchoring (the pts jumps by as many)
    max_lateness_s: float = 0.0
    total_lateness_s: float = 0.0
    late_threshold_s: float = 0.005
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=3000), repr=False)

    def record(self, lateness_s: float) -> None:
        self.frames += 1
        self.total_lateness_s += lateness_s
        self.max_lateness_s = max(self.max_lateness_s, lateness_s)
        if lateness_s > self.late_threshold_s:
            self.late_frames += 1
        self.recent.append(lateness_s)

    @property
    def mean_lateness_s(self) -> float:
        return self.total_lateness_s / self.frames if self.frames else 0.0

    def percentile(self, q: float) -> float:
        """Percentile `q` (0-100) of the lateness of the most recent frames (up to 3000)."""
        if not self.recent:
            return 0.0
        return float(np.percentile(np.fromiter(self.recent, dtype=np.float64), q))


class SpeechTrack(MediaStreamTrack):
    """A paced 48 kHz mono audio track that plays pushed speech and silence when idle, one packet (`packet_ms`)
    per `recv()`."""

    kind = "audio"

    def __init__(
        self,
        input_rate: int = SPEECH_RATE,
        max_buffer_s: float = 10.0,
        reanchor_after_s: float = 0.2,
        encode: bool = False,
        compression_level: int = DEFAULT_COMPRESSION_LEVEL,
        packet_ms: int = 20,
    ) -> None:
        super().__init__()
        packet_ms = check_packet_ms(packet_ms)
        if not encode and packet_ms != 20:
            # aiortc's own encoder cuts raw frames into 20 ms packets that would all carry the frame's timestamp
            raise ValueError(f"packet_ms {packet_ms} needs encode=True (raw frames are 20 ms)")
        if isinstance(input_rate, bool) or not isinstance(input_rate, int) or input_rate <= 0:
            raise ValueError(f"input_rate must be a positive int, got {input_rate!r}")
        if not max_buffer_s >= packet_ms / 1000:
            raise ValueError(
                f"max_buffer_s must be at least one packet ({packet_ms} ms), got {max_buffer_s!r}"
            )
        if not reanchor_after_s > 0:
            raise ValueError(f"reanchor_after_s must be > 0, got {reanchor_after_s!r}")
        self.input_rate = input_rate
        self.max_buffer_s = float(max_buffer_s)
        self.reanchor_after_s = float(reanchor_after_s)
        self.packet_ms = packet_ms
        self.packet_samples = WEBRTC_RATE * packet_ms // 1000
        self._packet_s = packet_ms / 1000
        self._packet_frames = self.packet_samples // WEBRTC_FRAME_SAMPLES
        self.turn = 0
        self.frames_out = 0  # 20 ms frames of audio returned (packets x `packet_ms` / 20)
        self.packets_out = 0
        self.speech_frames_out = 0  # 20 ms frames of the packets that carried queued speech (possibly padded)
        self.played_samples = 0  # 48 kHz speech samples handed to the sender
        self.dropped_samples = 0  # 48 kHz samples lost to overflow (oldest first)
        self.overflows = 0
        self.flushed_samples = 0  # 48 kHz samples dropped by flush()
        self.flushes = 0
        self.stale_pushes = 0
        self.pacing = PacingStats()

        self._capacity = int(round(self.max_buffer_s * WEBRTC_RATE))
        self._ring = np.zeros(self._capacity, dtype=np.int16)
        self._read = 0
        self._fill = 0
        self._resampler: AudioResampler | None = None
        self._scratch = np.zeros((1, self.packet_samples), dtype=np.int16)
        self._silence = np.zeros((1, self.packet_samples), dtype=np.int16)
        self._start: float | None = None
        self._pts = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.compression_level = compression_level
        self._encoder = self._new_encoder() if encode else None
        self.tap: Callable[[np.ndarray], None] | None = None  # sees each packet's samples as sent (recording)

    # ----- producer side -----

    @property
    def buffered_s(self) -> float:
        """Seconds of speech queued and not yet returned by `recv()`."""
        return self._fill / WEBRTC_RATE

    def push(self, pcm: np.ndarray, turn: int, end_of_turn: bool = False) -> bool:
        """Queue float32 mono speech at `input_rate` for `turn`; False (and nothing queued) if stale.

        A newer `turn` becomes the current one (audio already queued keeps playing). With
        `end_of_turn`, the resampler's last few samples are released instead of waiting for more input.
        """
        turn = _check_turn(turn)
        samples = np.asarray(pcm)
        if samples.ndim == 2 and samples.shape[0] == 1:
            samples = samples[0]
        if samples.ndim != 1:
            raise ValueError(f"expected 1-D mono PCM, got shape {samples.shape}")
        if not np.issubdtype(samples.dtype, np.floating):
            raise ValueError(f"expected float PCM in [-1, 1], got dtype {samples.dtype}")
        if turn < self.turn:
            self.stale_pushes += 1
            return False
        if turn > self.turn:
            self._drain_resampler()
            self.turn = turn
        samples = np.ascontiguousarray(samples, dtype=np.float32)
        if not np.isfinite(samples).all():
            samples = np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0)
        if samples.size:
            if self._resampler is None:
                self._resampler = AudioResampler(format="s16", layout="mono", rate=WEBRTC_RATE)
            frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="flt", layout="mono")
            frame.sample_rate = self.input_rate
            for out in self._resampler.resample(frame):
                self._write(out.to_ndarray().reshape(-1))
        if end_of_turn:
            self._drain_resampler()
        return True

    def flush(self, turn: int | None = None) -> None:
        """Drop all queued speech (the next frame is silence); with `turn`, make it the current turn."""
        if turn is not None:
            turn = _check_turn(turn)
            if turn < self.turn:
                raise ValueError(f"flush turn {turn} is older than the current turn {self.turn}")
            self.turn = turn
        self.flushed_samples += self._fill
        self.flushes += 1
        self._read = 0
        self._fill = 0
        self._resampler = None
        if self._encoder is not None:
            # A fresh encoder: CELT codes each frame's band energies relative to the previous frame's, so after
            # a cut the old one lets the speech fade out over ~150 ms; a new one goes silent at once.
            self._encoder = self._new_encoder()
        self._wake_waiters()

    def _new_encoder(self) -> OpusFrameEncoder:
        return OpusFrameEncoder(compression_level=self.compression_level, frame_ms=self.packet_ms)

    async def wait_buffered_below(self, seconds: float) -> None:
        """Wait until at most `seconds` of speech is queued (back-pressure for the producer)."""
        if not seconds >= 0:
            raise ValueError(f"seconds must be >= 0, got {seconds!r}")
        threshold = int(seconds * WEBRTC_RATE)
        if self._fill <= threshold or self.readyState != "live":
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((threshold, future))
        await future

    def _drain_resampler(self) -> None:
        if self._resampler is not None:
            for out in self._resampler.resample(None):
                self._write(out.to_ndarray().reshape(-1))
            self._resampler = None

    def _write(self, data: np.ndarray) -> None:
        n = data.size
        cap = self._capacity
        excess = self._fill + n - cap
        if excess > 0:
            self.overflows += 1
            self.dropped_samples += excess
            from_queue = min(excess, self._fill)
            self._read = (self._read + from_queue) % cap
            self._fill -= from_queue
            if n > cap:
                data = data[n - cap :]
                n = cap
        start = (self._read + self._fill) % cap
        first = min(n, cap - start)
        self._ring[start : start + first] = data[:first]
        self._ring[: n - first] = data[first:]
        self._fill += n

    def _wake_waiters(self) -> None:
        if not self._waiters:
            return
        waiting = []
        for threshold, future in self._waiters:
            if future.done():
                continue
            if self._fill <= threshold or self.readyState != "live":
                future.set_result(None)
            else:
                waiting.append((threshold, future))
        self._waiters = waiting

    # ----- consumer side (aiortc's RTP sender) -----

    def _read_frame(self) -> np.ndarray:
        n = min(self.packet_samples, self._fill)
        if n == 0:
            return self._silence
        out = self._scratch[0]
        cap = self._capacity
        first = min(n, cap - self._read)
        out[:first] = self._ring[self._read : self._read + first]
        out[first:n] = self._ring[: n - first]
        out[n:] = 0
        self._read = (self._read + n) % cap
        self._fill -= n
        self.speech_frames_out += self._packet_frames
        self.played_samples += n
        self._wake_waiters()
        return self._scratch

    async def recv(self) -> av.AudioFrame | av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._start is None:
            self._start = _phase_start(now, self._packet_s)
        due = self._start + self._pts / WEBRTC_RATE
        wait = due - now
        if wait > 0:
            # at `due` exactly (the loop's clock is time.monotonic()): tracks of one phase wake together
            loop = asyncio.get_running_loop()
            woken: asyncio.Future[None] = loop.create_future()
            handle = loop.call_at(due, _wake, woken)
            try:
                await woken
            finally:
                handle.cancel()
            if self.readyState != "live":
                raise MediaStreamError
        elif -wait > self.reanchor_after_s:
            # The sender stalled: skip the missed slots instead of bursting to catch up.
            skip = math.floor(-wait / self._packet_s)
            self._pts += skip * self.packet_samples
            due += skip * self._packet_s
            self.pacing.reanchors += 1
            self.pacing.skipped_frames += skip
        self.pacing.record(time.monotonic() - due)

        samples = self._read_frame()
        if self.tap is not None:
            self.tap(samples[0] if samples.ndim == 2 else samples)
        pts = self._pts
        self._pts += self.packet_samples
        self.frames_out += self._packet_frames
        self.packets_out += 1
        encoder = self._encoder
        silent = encoder is not None and (samples is self._silence or not samples.any())
        if silent:
            assert encoder is not None
            packet = encoder.repeat_silence(pts)
            if packet is not None:
                return packet
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = WEBRTC_RATE
        frame.time_base = TIME_BASE
        frame.pts = pts
        if encoder is None:
            return frame
        return encoder.encode(frame, silent=silent)

    def stop(self) -> None:
        super().stop()
        self._encoder = None  # frees the libopus context now
        self._resampler = None  # frees its filter graph now, not when the call's objects are next collected
        self._wake_waiters()


class OpusFrameEncoder:
    """Frames of `frame_ms` (20, 40 or 60) of 48 kHz s16 mono → one Opus packet each, stamped with the frame's own
    timestamp.

    Silence is not encoded again and again: once libopus has coded `SILENCE_REPEATS` all-zero frames in a row as
    one same packet (its state has decayed to silence; the packet is 3 bytes), further all-zero frames get a copy
    of that packet without running the encoder (`repeat_silence`), until a frame with sound comes.
    """

    def __init__(
        self, bit_rate: int = 48000, compression_level: int = DEFAULT_COMPRESSION_LEVEL, frame_ms: int = 20
    ) -> None:
        if isinstance(compression_level, bool) or not isinstance(compression_level, int):
            raise ValueError(f"compression_level must be an int 0-10, got {compression_level!r}")
        if not 0 <= compression_level <= 10:
            raise ValueError(f"compression_level must be 0-10, got {compression_level}")
        self.compression_level = compression_level
        self.frame_ms = check_packet_ms(frame_ms)
        codec = av.CodecContext.create("libopus", "w")
        codec.bit_rate = bit_rate
        codec.format = "s16"
        codec.layout = "mono"
        codec.sample_rate = WEBRTC_RATE
        codec.time_base = TIME_BASE
        codec.thread_count = 1
        # CELT only ("lowdelay"): measured on speech at 48 kbps against "voip" (SILK/hybrid), 2.2x less CPU per
        # frame (the biggest cost of a shard's loop), 2.5 ms codec delay instead of 6.5 ms, and a closer
        # waveform (SNR 18.7 dB vs 12.9); nothing here uses SILK's in-band FEC
        codec.options = {
            "application": "lowdelay",
            "frame_duration": str(frame_ms),
            "vbr": "constrained",
            "compression_level": str(compression_level),
        }
        self.codec = codec
        self.encoded_frames = 0  # frames that ran through libopus
        self.repeated_silence = 0  # all-zero frames answered with the repeated silence packet
        self._silent_packet: bytes | None = None  # the packet of the last all-zero frames
        self._silent_run = 0  # how many all-zero frames in a row libopus coded as `_silent_packet`

    def encode(self, frame: av.AudioFrame, silent: bool = False) -> av.Packet:
        """Encode `frame`; `silent`: every sample of it is zero (counts towards `repeat_silence`)."""
        packets = self.codec.encode(frame)
        if not packets:  # libopus holds its first frame (look-ahead): nothing to send is not an option
            packets = self.codec.encode(frame)
        packet = packets[-1]
        self.encoded_frames += 1
        if silent:
            data = bytes(packet)
            self._silent_run = self._silent_run + 1 if data == self._silent_packet else 1
            self._silent_packet = data
        else:
            self._silent_run = 0
            self._silent_packet = None
        # RTP time follows the track's clock, not the encoder's delayed one
        packet.pts = frame.pts
        packet.time_base = TIME_BASE
        return packet

    def repeat_silence(self, pts: int) -> av.Packet | None:
        """The packet of an all-zero frame at `pts` without running libopus, once its state has settled on
        silence; None: encode the frame."""
        if self._silent_run < SILENCE_REPEATS or self._silent_packet is None:
            return None
        self.repeated_silence += 1
        packet = av.Packet(self._silent_packet)
        packet.pts = pts
        packet.time_base = TIME_BASE
        return packet
