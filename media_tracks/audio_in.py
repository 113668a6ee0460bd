"""Inbound audio: an aiortc audio track → 16 kHz mono float32 → exact model units.

`UnitCutter` regroups a stream of 16 kHz samples into fixed-length units (the first one may have
another length, for the duplex model's first-chunk rule). `InboundAudio` reads the remote track on
the event loop, resamples every decoded frame with one persistent PyAV resampler, fills RTP gaps
with silence so units stay aligned to real time, drops what arrives faster than real time
(`RealTimePolicer`), and hands each finished unit to a callback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from MiniCPMO45.audio.rates import DUPLEX_UNIT_SAMPLES, MODEL_INPUT_RATE
from MiniCPMO45.audio.resample import AudioResampler

from .reader import TrackReader

logger = logging.getLogger(__name__)

# A gap in the inbound timestamps longer than this is not filled (a clock jump, not lost packets).
MAX_GAP_FILL_S = 1.0
# With float output, libswresample's stereo→mono matrix sums both channels at −3 dB each, so a browser's
# mono-as-stereo Opus stream would come out 3 dB louder. Capping the matrix at 1 makes it a plain average.
_DOWNMIX_AVERAGE = {"rematrix_maxval": "1.0"}
# Inbound audio may run this far ahead of the wall clock before frames are dropped (a sender's clock drift,
# packets released together by a jitter buffer) ...
MAX_AHEAD_S = 0.5
# ... and a stall may be made up by this much audio arriving at once (packets held up in the network).
MAX_BEHIND_S = 2.0


@dataclass
class AudioUnit:
    index: int  # 0-based unit number within the session
    pcm: np.ndarray  # float32 mono 16 kHz, exactly the unit length
    completed_at: float  # time.monotonic() when the unit's last sample arrived


def _check_length(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class UnitCutter:
    """Regroups 16 kHz float32 samples into units of exactly `unit_samples` samples.

    The first unit has `first_unit_samples` samples when given (else `unit_samples`).
    """

    def __init__(
        self, unit_samples: int = DUPLEX_UNIT_SAMPLES, first_unit_samples: int | None = None
    ) -> None:
        self.unit_samples = _check_length("unit_samples", unit_samples)
        self._first_override = (
            None if first_unit_samples is None else _check_length("first_unit_samples", first_unit_samples)
        )
        self._buf = np.zeros(0, dtype=np.float32)
        self._filled = 0
        self.next_index = 0
        self._alloc()

    @property
    def first_unit_samples(self) -> int:
        return self.unit_samples if self._first_override is None else self._first_override

    @property
    def pending_samples(self) -> int:
        """Samples received that do not yet form a complete unit."""
        return self._filled

    def _current_length(self) -> int:
        return self.first_unit_samples if self.next_index == 0 else self.unit_samples

    def _alloc(self) -> None:
        self._buf = np.zeros(max(self.unit_samples, self.first_unit_samples), dtype=np.float32)
        self._filled = 0

    def push(self, samples: np.ndarray, arrived_at: float) -> list[AudioUnit]:
        """Append samples; return the units they complete (possibly none), in index order."""
        samples = np.asarray(samples)
        if samples.ndim == 2 and samples.shape[0] == 1:
            samples = samples[0]
        if samples.ndim != 1:
            raise ValueError(f"expected 1-D mono samples, got shape {samples.shape}")
        if not np.issubdtype(samples.dtype, np.floating):
            raise ValueError(f"expected float samples, got dtype {samples.dtype}")
        units: list[AudioUnit] = []
        pos = 0
        n = samples.shape[0]
        while pos < n:
            length = self._current_length()
            take = min(length - self._filled, n - pos)
            self._buf[self._filled : self._filled + take] = samples[pos : pos + take]
            self._filled += take
            pos += take
            if self._filled == length:
                units.append(AudioUnit(self.next_index, self._buf[:length].copy(), arrived_at))
                self.next_index += 1
                self._filled = 0
        return units

    def reset(
        self, unit_samples: int | None = None, first_unit_samples: int | None = None, lead_in_samples: int = 0
    ) -> None:
        """Drop the partial unit and restart at index 0.

        Arguments left as None keep their current setting (a first-unit length that was never set
        keeps following `unit_samples`). `lead_in_samples` of silence start the first unit (it then
        completes that much earlier; see `grid_lead_in`).
        """
        if unit_samples is not None:
            self.unit_samples = _check_length("unit_samples", unit_samples)
        if first_unit_samples is not None:
            self._first_override = _check_length("first_unit_samples", first_unit_samples)
        self.next_index = 0
        self._alloc()
        if not 0 <= lead_in_samples < self.first_unit_samples:
            raise ValueError(f"lead_in_samples must lie in 0..{self.first_unit_samples - 1}")
        self._filled = lead_in_samples  # the buffer is zeros


def grid_lead_in(
    now: float,
    first_unit_samples: int,
    unit_samples: int,
    rate: int = MODEL_INPUT_RATE,
    offset_s: float = 0.0,
) -> int:
    """Silence (samples) to put before a live stream's first unit so that it completes on a grid line of the
    monotonic clock: the lines lie `offset_s` past the multiples of the unit duration. With every call of a
    worker's phase on one grid, their units arrive together and run in one batch."""
    unit_s = unit_samples / rate
    natural_end = now + first_unit_samples / rate
    late = (natural_end - offset_s) % unit_s  # how far the first unit would end past the last grid line
    return min(int(round(late * rate)), first_unit_samples - 1)


class _MonoResampler:
    """One PyAV resampler to 16 kHz mono float32 that survives input format changes and RTP gaps."""

    def __init__(self, rate: int = MODEL_INPUT_RATE, fill_gaps: bool = True) -> None:
        self.rate = rate
        self.fill_gaps = fill_gaps
        self._resampler: AudioResampler | None = None
        self._source: tuple[str, str, int] | None = None
        self._next_pts: int | None = None
        self.gap_samples = 0  # output-rate samples of silence inserted for timestamp gaps
        self.unfilled_gap_s = 0.0  # timestamp jumps too long to fill: audio the model never hears

    def _convert(self, frames: list[av.AudioFrame]) -> list[np.ndarray]:
        # the resampler's frames are packed mono float32: a view of the plane (which keeps the frame alive) saves
        # `to_ndarray`'s copy and stacking; the cutter copies the samples into its unit at once
        return [np.frombuffer(f.planes[0], dtype=np.float32, count=f.samples) for f in frames if f.samples]

    def _gap_silence(self, frame: av.AudioFrame) -> np.ndarray | None:
        pts, tb = frame.pts, frame.time_base
        if pts is None or tb is None or not frame.sample_rate:
            self._next_pts = None
            return None
        expected = self._next_pts
        # the frame's duration in `tb` ticks, rounded as round() would (integers: Fraction arithmetic cost more
        # than the rest of this per-frame check)
        ticks, rest = divmod(frame.samples * tb.denominator, frame.sample_rate * tb.numerator)
        twice, divisor = 2 * rest, frame.sample_rate * tb.numerator
        self._next_pts = pts + ticks + (twice > divisor or (twice == divisor and ticks % 2 == 1))
        if expected is None or pts <= expected:
            return None
        gap_s = float((pts - expected) * tb)
        if gap_s > MAX_GAP_FILL_S:
            logger.warning("inbound audio timestamp jumped by %.3f s; not filled", gap_s)
            self.unfilled_gap_s += gap_s
            return None
        n = int(round(gap_s * self.rate))
        if n <= 0 or not self.fill_gaps:
            return None
        self.gap_samples += n
        return np.zeros(n, dtype=np.float32)

    def resample(self, frame: av.AudioFrame) -> np.ndarray:
        parts: list[np.ndarray] = []
        source = (frame.format.name, frame.layout.name, frame.sample_rate)
        silence = self._gap_silence(frame)
        if silence is not None or source != self._source:
            # The resampler still holds the end of the previous frame: release it before the gap.
            parts += self.flush()
        if silence is not None:
            parts.append(silence)
        if self._resampler is None:
            self._resampler = AudioResampler(
                format="flt", layout="mono", rate=self.rate, options=_DOWNMIX_AVERAGE
            )
            self._source = source
        parts += self._convert(self._resampler.resample(frame))
        return _concat(parts)

    def flush(self) -> list[np.ndarray]:
        """Drain the samples held back by the resampler's filter delay; the next frame starts fresh."""
        if self._resampler is None:
            return []
        tail = self._convert(self._resampler.resample(None))
        self.close()
        return tail

    def close(self) -> None:
        """Free the resampler now, dropping what it holds back."""
        if self._resampler is not None:
            self._resampler.close()
        self._resampler = None
        self._source = None


class RealTimePolicer:
    """Admits audio no faster than real time: the admitted timeline may run at most `max_ahead_s` ahead of
    the wall clock, and after a stall at most `max_behind_s` of it can arrive at once."""

    def __init__(
        self, rate: int, max_ahead_s: float = MAX_AHEAD_S, max_behind_s: float = MAX_BEHIND_S
    ) -> None:
        self.rate = rate
        self.max_ahead_s = max_ahead_s
        self.max_behind_s = max_behind_s
        self._origin: float | None = None  # wall time of sample 0 of the admitted timeline
        self._admitted = 0

    def admit(self, samples: int, now: float) -> bool:
        """Whether `samples` more samples that arrived at `now` fit; they count only if they do."""
        if self._origin is None:
            self._origin = now
        due = self._origin + self._admitted / self.rate  # when the next sample would play in real time
        if now - due > self.max_behind_s:
            self._origin += now - due - self.max_behind_s  # a long silence earns no credit for a later burst
            due = now - self.max_behind_s
        if due + samples / self.rate - now > self.max_ahead_s:
            return False
        self._admitted += samples
        return True


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype=np.float32)
    if len(parts) == 1:
        return parts[0].astype(np.float32, copy=False)
    return np.concatenate(parts).astype(np.float32, copy=False)


class InboundAudio(TrackReader):
    """Reads an aiortc audio track → 16 kHz mono float32 → `UnitCutter` → `on_unit(unit)`.

    The reader consumes every frame as soon as it is decoded, so the remote track's unbounded queue
    stays empty. `on_unit` runs on the event loop and must only hand the unit off; an exception it
    raises is logged and reading goes on. With `fill_gaps`, a jump in the inbound timestamps (lost
    packets, DTX) of up to 1 s becomes silence, so unit boundaries stay aligned with real time. Audio that
    runs more than `max_ahead_s` ahead of real time (an unpaced sender, or timestamps that jump ahead) is
    dropped and counted; None reads as fast as the track delivers (a file, a test).
    """

    task_name = "inbound-audio"

    def __init__(
        self,
        track: MediaStreamTrack,
        cutter: UnitCutter,
        on_unit: Callable[[AudioUnit], None],
        fill_gaps: bool = True,
        max_ahead_s: float | None = MAX_AHEAD_S,
    ) -> None:
        super().__init__()
        if track.kind != "audio":
            raise ValueError(f"InboundAudio needs an audio track, got kind {track.kind!r}")
        self.track = track
        self.cutter = cutter
        self.on_unit = on_unit
        self.frames_in = 0
        self.samples_out = 0  # 16 kHz samples handed to the cutter
        self.frames_dropped = 0  # frames that ran ahead of real time (`RealTimePolicer`)
        self.samples_dropped = 0  # their 16 kHz samples, gap silence included
        self.ended = False  # the track ended (MediaStreamError); the resampler tail was delivered
        self._resampler = _MonoResampler(fill_gaps=fill_gaps)
        self._policer = None if max_ahead_s is None else RealTimePolicer(MODEL_INPUT_RATE, max_ahead_s)

    @property
    def gap_samples(self) -> int:
        """16 kHz samples of silence inserted where inbound timestamps skipped (lost packets)."""
        return self._resampler.gap_samples

    @property
    def unfilled_gap_s(self) -> float:
        """Seconds of inbound timestamps skipped by jumps too long to fill (counted, and told to the caller)."""
        return self._resampler.unfilled_gap_s

    def _deliver(self, samples: np.ndarray, arrived_at: float) -> None:
        if samples.size == 0:
            return
        self.samples_out += samples.size
        for unit in self.cutter.push(samples, arrived_at):
            try:
                self.on_unit(unit)
            except Exception:
                logger.exception("on_unit callback failed for unit %d", unit.index)

    async def _run(self) -> None:
        try:
            while True:
                frame = await self.track.recv()
                self.frames_in += 1
                now = time.monotonic()
                samples = self._resampler.resample(frame)
                if self._policer is None or self._policer.admit(samples.size, now):
                    self._deliver(samples, now)
                else:
                    self.frames_dropped += 1
                    self.samples_dropped += samples.size
        except MediaStreamError:
            self._deliver(_concat(self._resampler.flush()), time.monotonic())
            self.ended = True

    async def stop(self) -> None:
        """Stop reading and free the resampler now (not when the call's objects are next collected)."""
        await super().stop()
        self._resampler.close()
