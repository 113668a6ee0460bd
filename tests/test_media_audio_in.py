"""UnitCutter and InboundAudio on generated PyAV frames (no network)."""

from __future__ import annotations

import fractions

import av
import numpy as np
import pytest

from inference.protocol import Opened, UnitDone, UnitMetrics
from media_tracks import AudioUnit, InboundAudio, UnitCutter, grid_lead_in
from tests.media_helpers import FramesTrack, dominant_frequency


def _random_chunks(rng: np.random.Generator, x: np.ndarray, max_len: int) -> list[np.ndarray]:
    chunks, pos = [], 0
    while pos < x.size:
        n = int(rng.integers(0, max_len + 1))  # zero-length chunks included
        chunks.append(x[pos : pos + n])
        pos += n
    return chunks


def test_cutter_exact_units_from_arbitrary_chunks() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal(50_000).astype(np.float32)
    cutter = UnitCutter(unit_samples=1000, first_unit_samples=1030)
    units: list[AudioUnit] = []
    for i, chunk in enumerate(_random_chunks(rng, x, 777)):
        units += cutter.push(chunk, arrived_at=float(i))
    assert [u.index for u in units] == list(range(len(units)))
    assert units[0].pcm.size == 1030
    assert all(u.pcm.size == 1000 for u in units[1:])
    assert all(u.pcm.dtype == np.float32 for u in units)
    assert len(units) == 1 + (x.size - 1030) // 1000
    joined = np.concatenate([u.pcm for u in units])
    np.testing.assert_array_equal(joined, x[: joined.size])
    assert cutter.pending_samples == x.size - joined.size
    assert cutter.next_index == len(units)


def test_cutter_units_are_independent_copies_and_carry_completion_time() -> None:
    cutter = UnitCutter(unit_samples=4)
    units = cutter.push(np.arange(3, dtype=np.float32), arrived_at=1.0)
    assert units == []
    units = cutter.push(np.arange(3, 10, dtype=np.float32), arrived_at=2.0)
    assert [u.completed_at for u in units] == [2.0, 2.0]
    np.testing.assert_array_equal(units[0].pcm, [0, 1, 2, 3])
    np.testing.assert_array_equal(units[1].pcm, [4, 5, 6, 7])
    more = cutter.push(np.full(2, 9.0, dtype=np.float32), arrived_at=3.0)
    np.testing.assert_array_equal(more[0].pcm, [8, 9, 9, 9])
    np.testing.assert_array_equal(units[1].pcm, [4, 5, 6, 7])  # not overwritten by later pushes
    assert more[0].completed_at == 3.0


def test_cutter_accepts_float64_and_row_vectors() -> None:
    cutter = UnitCutter(unit_samples=3)
    units = cutter.push(np.arange(6, dtype=np.float64).reshape(1, 6), arrived_at=0.0)
    assert [u.pcm.dtype for u in units] == [np.float32, np.float32]
    np.testing.assert_array_equal(units[1].pcm, [3, 4, 5])


def test_cutter_reset() -> None:
    cutter = UnitCutter(unit_samples=10, first_unit_samples=15)
    cutter.push(np.ones(27, dtype=np.float32), 0.0)
    assert (cutter.next_index, cutter.pending_samples) == (2, 2)
    cutter.reset()
    assert (cutter.next_index, cutter.pending_samples) == (0, 0)
    units = cutter.push(np.arange(15, dtype=np.float32), 1.0)
    assert [u.pcm.size for u in units] == [15]  # first-unit rule applies again
    np.testing.assert_array_equal(units[0].pcm, np.arange(15))

    cutter.reset(unit_samples=4)
    assert (cutter.unit_samples, cutter.first_unit_samples) == (4, 15)
    cutter.reset(unit_samples=4, first_unit_samples=6)
    units = cutter.push(np.zeros(14, dtype=np.float32), 2.0)
    assert [u.pcm.size for u in units] == [6, 4, 4]

    plain = UnitCutter(unit_samples=5)
    plain.reset(unit_samples=7)
    assert plain.first_unit_samples == 7  # an unset first length follows unit_samples


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"unit_samples": 0}, "unit_samples"),
        ({"unit_samples": 16000, "first_unit_samples": -1}, "first_unit_samples"),
        ({"unit_samples": 1.5}, "unit_samples"),
    ],
)
def test_cutter_rejects_bad_lengths(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UnitCutter(**kwargs)


def test_cutter_rejects_bad_samples() -> None:
    cutter = UnitCutter(unit_samples=4)
    with pytest.raises(ValueError, match="1-D"):
        cutter.push(np.zeros((2, 4), dtype=np.float32), 0.0)
    with pytest.raises(ValueError, match="float"):
        cutter.push(np.zeros(4, dtype=np.int16), 0.0)


def _s16_frames(
    signal: np.ndarray, frame_samples: int, layout: str, first_pts: int = 0
) -> list[av.AudioFrame]:
    """Slice a 48 kHz float signal into s16 frames with consecutive pts."""
    frames = []
    channels = 2 if layout == "stereo" else 1
    for i, start in enumerate(range(0, signal.size, frame_samples)):
        chunk = np.round(signal[start : start + frame_samples] * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(
            np.repeat(chunk, channels).reshape(1, -1), format="s16", layout=layout
        )
        frame.sample_rate = 48000
        frame.time_base = fractions.Fraction(1, 48000)
        frame.pts = first_pts + i * frame_samples
        frames.append(frame)
    return frames


async def test_inbound_audio_resamples_exactly_and_flushes_the_tail_on_end() -> None:
    t = np.arange(48000 * 2) / 48000
    signal = 0.5 * np.sin(2 * np.pi * 1000 * t)
    frames = _s16_frames(signal, 960, "stereo")
    units: list[AudioUnit] = []
    track = FramesTrack("audio", frames)
    inbound = InboundAudio(track, UnitCutter(unit_samples=8000), units.append, max_ahead_s=None)
    inbound.start()
    await inbound.wait_ended()
    assert inbound.ended and inbound.frames_in == len(frames)
    # every input sample is accounted for, including the resampler's held-back tail
    assert inbound.samples_out == 32000
    assert [u.index for u in units] == [0, 1, 2, 3]
    assert all(u.pcm.size == 8000 for u in units)
    for u in units:
        assert abs(dominant_frequency(u.pcm, 16000) - 1000) <= 2
    expected = (0.5 * np.sin(2 * np.pi * 1000 * np.arange(32000) / 16000)).astype(np.float32)
    got = np.concatenate([u.pcm for u in units])
    # aligned with the input in time (no lag), away from the resampler's edge effects
    assert np.max(np.abs(got[100:-100] - expected[100:-100])) < 0.01
    await inbound.stop()  # idempotent after the end


async def test_inbound_audio_fills_timestamp_gaps_and_survives_a_layout_change() -> None:
    ones = np.full(48000, 0.25)
    first = _s16_frames(ones[:9600], 960, "stereo")  # 0.2 s
    # 0.1 s of packets lost, then mono 10 ms frames
    second = _s16_frames(ones[:9600], 480, "mono", first_pts=9600 + 4800)
    units: list[AudioUnit] = []
    inbound = InboundAudio(FramesTrack("audio", first + second), UnitCutter(unit_samples=800), units.append)
    inbound.start()
    await inbound.wait_ended()
    got = np.concatenate([u.pcm for u in units] + [np.zeros(0, np.float32)])
    assert inbound.gap_samples == 1600
    assert inbound.samples_out == 3200 + 1600 + 3200
    assert got.size == 8000  # ten complete units of 800; 0.2 s of remainder stays pending
    # the silence sits exactly where the lost packets were: the resampler's held-back samples of the
    # frame before the gap come out before it, not after it
    np.testing.assert_allclose(got[:3200], 0.25, atol=0.01)
    np.testing.assert_array_equal(got[3200:4800], 0.0)
    np.testing.assert_allclose(got[4800:], 0.25, atol=0.01)


async def test_inbound_audio_rejects_a_video_track_and_double_start() -> None:
    with pytest.raises(ValueError, match="audio track"):
        InboundAudio(FramesTrack("video", []), UnitCutter(), lambda u: None)
    inbound = InboundAudio(FramesTrack("audio", []), UnitCutter(), lambda u: None)
    inbound.start()
    with pytest.raises(RuntimeError, match="already started"):
        inbound.start()
    await inbound.stop()
    await inbound.stop()


async def test_gap_filling_can_be_switched_off() -> None:
    ones = np.full(9600, 0.25)
    frames = _s16_frames(ones, 960, "stereo")
    del frames[3:5]  # two lost packets
    inbound = InboundAudio(FramesTrack("audio", frames), UnitCutter(), lambda u: None, fill_gaps=False)
    inbound.start()
    await inbound.wait_ended()
    assert inbound.gap_samples == 0
    assert inbound.samples_out == 8 * 320


async def test_a_failing_callback_does_not_stop_the_reader() -> None:
    frames = _s16_frames(np.full(48000, 0.1), 960, "mono")
    seen: list[int] = []

    def on_unit(unit: AudioUnit) -> None:
        seen.append(unit.index)
        if unit.index == 0:
            raise RuntimeError("consumer bug")

    inbound = InboundAudio(
        FramesTrack("audio", frames), UnitCutter(unit_samples=4000), on_unit, max_ahead_s=None
    )
    inbound.start()
    await inbound.wait_ended()
    assert seen == [0, 1, 2, 3]
    assert inbound.ended and inbound.frames_in == 50


@pytest.mark.parametrize("now", [1000.0, 1000.25, 1000.9999, 1234.5678])
@pytest.mark.parametrize("first", [16000, 16560])
@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_grid_lead_in_puts_the_first_unit_end_on_its_phase_grid(
    now: float, first: int, offset: float
) -> None:
    lead = grid_lead_in(now, first, 16000, offset_s=offset)
    assert 0 <= lead < first
    # the stream starts now; the first unit needs first - lead live samples
    past = (now + (first - lead) / 16000 - offset) % 1.0
    assert min(past, 1.0 - past) <= 1 / 16000 + 1e-9


def test_unit_metrics_say_how_far_off_its_phase_grid_a_unit_ended() -> None:
    """`grid_ms`: signed ms from the nearest line of the session's grid (the half-second phase here) to the unit's
    end; a session whose units are not cut on a grid has none."""
    opened = Opened(
        session_id="s", mode="audio_duplex", unit_samples=16000, align_units=True, grid_offset_s=0.5
    )
    grid = opened.unit_grid()
    assert grid is not None and grid.unit_s == 1.0
    ends = {100.5: 0.0, 100.53: 30.0, 100.47: -30.0, 101.02: -480.0, 7.999: 499.0, 9.001: -499.0}
    for completed_at, want in ends.items():
        done = UnitDone(session_id="s", index=3, completed_at=completed_at, metrics=UnitMetrics(queue_ms=2.0))
        metrics = done.at_server(completed_at + 0.25, grid)
        assert metrics.grid_ms == pytest.approx(want, abs=1e-6)
        assert metrics.roundtrip_ms == pytest.approx(250.0) and metrics.lag_ms == pytest.approx(2.0)
        assert done.at_server(completed_at + 0.25).grid_ms is None
    # the first unit of a live stream, cut with `grid_lead_in`, ends on the grid
    lead = grid_lead_in(1234.5678, 16000, 16000, offset_s=0.5)
    assert abs(grid.distance_ms(1234.5678 + (16000 - lead) / 16000)) < 0.1
    assert Opened(session_id="s", mode="chat", unit_samples=5120).unit_grid() is None


def test_cutter_lead_in_is_silence_before_the_first_unit() -> None:
    cutter = UnitCutter(unit_samples=1600)
    cutter.reset(first_unit_samples=2000, lead_in_samples=500)
    ramp = np.arange(1, 4001, dtype=np.float32)
    units = cutter.push(ramp, arrived_at=1.0)
    assert [len(u.pcm) for u in units] == [2000, 1600]
    assert not units[0].pcm[:500].any() and units[0].pcm[500] == 1.0  # silence, then the caller's audio
    assert units[1].pcm[0] == 1501.0  # nothing of the caller's audio is lost
    with pytest.raises(ValueError, match="lead_in_samples"):
        cutter.reset(lead_in_samples=2000)
