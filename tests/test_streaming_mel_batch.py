"""`push_many`: many sessions' streaming mels in one batched transform, equal to pushing each session alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from MiniCPMO45.audio.mel import (
    FIXED_FLOOR_MODE,
    frame_windows,
    log_mel,
    log_mel_of_windows,
    raw_log_mel,
    reflected_stretch,
)
from MiniCPMO45.audio.mel_stream import MelUnit, StreamingMel, push_many


def _audio(rng: np.random.Generator, n: int, loud: bool = False) -> np.ndarray:
    t = np.arange(n) / 16000
    x = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 3000) * t) + 0.05 * rng.standard_normal(n)
    return (x * (8.0 if loud else 1.0)).astype(np.float32)


def _assert_same_unit(got: MelUnit | None, want: MelUnit | None) -> None:
    assert (got is None) == (want is None)
    if got is None or want is None:
        return
    assert (got.index, got.prefix_frames, got.suffix_frames, got.samples_consumed) == (
        want.index,
        want.prefix_frames,
        want.suffix_frames,
        want.samples_consumed,
    )
    assert got.features.dtype == np.float32 and got.features.flags.c_contiguous
    np.testing.assert_array_equal(got.features, want.features)


def _schedule(rng: np.random.Generator, session: int, tick: int) -> np.ndarray | None:
    """Session i joins at tick 3 * (i % 5) and then sends: 1 s, sometimes nothing (None), half a second, an empty
    push (drains a buffered unit), or 2.5 s at once; loud passages and clicks move the dynamic floor."""
    if tick < 3 * (session % 5):
        return None
    kind = (session + tick) % 9
    if kind == 4:
        return None
    if kind == 5:  # a click at the end of the buffer: the frames reflected there hold the dynamic maximum
        chunk = _audio(rng, 16000)
        chunk[-260:-100] = 30.0 * (-1.0) ** np.arange(160)
        return chunk
    if kind == 6:
        return _audio(rng, 8000)
    if kind == 7:
        return np.zeros(0, np.float32)
    if kind == 8:
        return _audio(rng, 40000, loud=session % 2 == 0)
    return _audio(rng, 16000, loud=(tick % 7 == session % 7))


def test_push_many_equals_pushing_each_session_alone() -> None:
    """Sessions at different points: fresh (the padded 1035 ms first unit), mid-stream, across the 30 s slide,
    not enough audio yet (None), no audio this tick (None, session untouched), and an empty push."""
    rng = np.random.default_rng(11)
    n_sessions, ticks = 10, 42
    batched = [StreamingMel() for _ in range(n_sessions)]
    alone = [StreamingMel() for _ in range(n_sessions)]
    reference = [StreamingMel() for _ in range(n_sessions)]  # the plain full recompute
    for ref in reference:
        ref.mel.recompute = True
    seen = {"first": 0, "none_waiting": 0, "none_absent": 0, "slid": 0}
    for tick in range(ticks):
        chunks = [_schedule(rng, i, tick) for i in range(n_sessions)]
        before = [(m.units, m.pending.size, m.mel.buffered_samples) for m in batched]
        got = push_many(batched, chunks)
        for i, chunk in enumerate(chunks):
            want = alone[i].push(chunk) if chunk is not None else None
            _assert_same_unit(got[i], want)
            ref = reference[i].push(chunk) if chunk is not None else None
            assert (ref is None) == (got[i] is None)
            if got[i] is not None and ref is not None:
                np.testing.assert_allclose(got[i].features, ref.features, atol=1e-6, rtol=0)
            if chunk is None:
                seen["none_absent"] += 1
                assert (batched[i].units, batched[i].pending.size, batched[i].mel.buffered_samples) == before[
                    i
                ]
            elif got[i] is None:
                seen["none_waiting"] += 1
            else:
                seen["first"] += got[i].index == 0
                seen["slid"] += batched[i].mel.base_frame > 0
            assert (
                batched[i].mel.emitted_frames == 100 * batched[i].units
            )  # global frame index of the next core
    assert seen["first"] == n_sessions and min(seen.values()) > 0, seen
    assert all(m.mel.base_frame == a.mel.base_frame for m, a in zip(batched, alone, strict=True))


def test_units_hold_the_right_frames_of_the_stream() -> None:
    """Frame bookkeeping: under 5 s each unit is exactly frames [100 k - 2, 100 k + 102) of the offline mel of the
    padded stream (the first unit [0, 102)), for sessions pushed together at different offsets."""
    rng = np.random.default_rng(5)
    streams = [_audio(rng, 64000) for _ in range(3)]
    mels = [StreamingMel() for _ in streams]
    offline = [log_mel(np.concatenate([np.zeros(560, np.float32), s]), FIXED_FLOOR_MODE) for s in streams]
    for tick in range(6):
        chunks = [
            s[(tick - i) * 16000 : (tick - i + 1) * 16000] if 0 <= tick - i < 4 else None
            for i, s in enumerate(streams)
        ]
        for i, unit in enumerate(push_many(mels, chunks)):
            if chunks[i] is None:
                assert unit is None
                continue
            assert unit is not None
            k = tick - i
            start = max(0, 100 * k - 2)
            assert (unit.prefix_frames, unit.suffix_frames) == ((0, 2) if k == 0 else (2, 2))
            want = offline[i][:, start : 100 * k + 102]
            assert unit.features.shape == want.shape
            np.testing.assert_allclose(unit.features, want, atol=1e-5, rtol=0)


def test_push_many_does_not_depend_on_the_thread_count() -> None:
    rng = np.random.default_rng(2)
    audio = [[_audio(rng, 16000) for _ in range(8)] for _ in range(24)]
    outputs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            mels = [StreamingMel() for _ in audio]
            units = [push_many(mels, [a[t] for a in audio]) for t in range(8)]
            outputs.append([u.features for tick in units for u in tick if u is not None])
    finally:
        torch.set_num_threads(threads)
    assert len(outputs[0]) == len(outputs[1]) == 24 * 8
    for a, b in zip(*outputs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_each_run_is_transformed_as_if_alone() -> None:
    """Rows of a run equal the transform of that run alone (the product's rounding may depend on its size),
    whether its segment is batched with equal segments or not."""
    rng = np.random.default_rng(4)
    segments = [(1,), (2,), (2,), (100,), (100,), (2, 98, 1), (2, 98, 1), (0, 100, 1), (37,)]
    rows = sum(sum(seg) for seg in segments)
    windows = torch.from_numpy(rng.standard_normal((rows, 400)).astype(np.float32))
    got = log_mel_of_windows(windows, segments)
    at = 0
    for size in [size for seg in segments for size in seg]:
        np.testing.assert_array_equal(got[at : at + size], log_mel_of_windows(windows[at : at + size]))
        at += size
    with pytest.raises(ValueError):
        log_mel_of_windows(windows, segments[:-1])


def test_push_many_rejects_bad_calls() -> None:
    a, b = StreamingMel(), StreamingMel()
    with pytest.raises(ValueError):
        push_many([a, b], [np.zeros(16000, np.float32)])
    with pytest.raises(ValueError):
        push_many([a, a], [np.zeros(16000, np.float32), np.zeros(16000, np.float32)])
    assert push_many([], []) == []
    assert push_many([a, b], [None, None]) == [None, None]


@pytest.mark.parametrize("n", [401, 560, 16480, 16559])
def test_reflected_stretch_matches_reflect_padding(n: int) -> None:
    signal = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    padded = np.pad(signal, 200, mode="reflect")
    total = n // 160
    for first, stop in [(0, 1), (0, 2), (1, 3), (0, total), (total - 2, total), (2, total - 1)]:
        if not 0 <= first < stop <= total:
            continue
        got = reflected_stretch(lambda a, b: signal[a:b], n, first, stop)
        np.testing.assert_array_equal(got, padded[first * 160 : (stop - 1) * 160 + 400])


def test_frames_from_windows_equal_the_centred_stft() -> None:
    signal = np.random.default_rng(0).standard_normal(20000).astype(np.float32)
    total = signal.size // 160
    windows = torch.empty(total, 400)
    frame_windows(signal, 0, total, windows)
    got = log_mel_of_windows(windows, [(2, total - 4, 2)])
    np.testing.assert_allclose(got.T, raw_log_mel(signal).numpy(), atol=1e-6, rtol=0)


def test_push_many_on_a_device_matches_the_host_path() -> None:
    """The device path (framing by an index gather, one product for every row), run here on the CPU: the same
    units as the per-session pushes, the features within float32 rounding, across the schedule above (first
    units, waiting sessions, empty pushes, the 30 s slide, a moving dynamic floor)."""
    rng = np.random.default_rng(5)
    n_sessions, ticks = 6, 40
    device = torch.device("cpu")
    on_device = [StreamingMel() for _ in range(n_sessions)]
    alone = [StreamingMel() for _ in range(n_sessions)]
    units = 0
    for tick in range(ticks):
        chunks = [_schedule(rng, i, tick) for i in range(n_sessions)]
        got = push_many(on_device, chunks, device=device)
        for i, chunk in enumerate(chunks):
            want = alone[i].push(chunk) if chunk is not None else None
            assert (got[i] is None) == (want is None)
            if got[i] is None or want is None:
                continue
            units += 1
            assert (got[i].index, got[i].prefix_frames, got[i].suffix_frames, got[i].samples_consumed) == (
                want.index,
                want.prefix_frames,
                want.suffix_frames,
                want.samples_consumed,
            )
            # the features stay where the transform ran (a tensor on the device), never copied to numpy
            features = got[i].features
            assert isinstance(features, torch.Tensor) and features.device == device
            assert features.dtype == torch.float32 and features.is_contiguous()
            np.testing.assert_allclose(features.numpy(), want.features, atol=1e-5, rtol=0)
    assert units > 3 * ticks and max(m.mel.base_frame for m in on_device) > 0
    # so do the frames each stream keeps for its next units
    for m in on_device:
        assert isinstance(m.mel._edge, torch.Tensor) and m.mel._cache.on_device


def test_a_stream_moves_between_the_host_and_a_device() -> None:
    """A session pushed on the host, then on a device, then on the host again (e.g. moved between the
    per-session path and the batcher) brings its cached frames along: the units equal a host-only session's."""
    rng = np.random.default_rng(11)
    moving, host = StreamingMel(), StreamingMel()
    for tick in range(12):
        chunk = _audio(rng, 16000, loud=tick == 7)
        device = torch.device("cpu") if 3 <= tick < 9 else None
        got = push_many([moving], [chunk], device=device)[0]
        want = host.push(chunk)
        assert got is not None and want is not None and got.index == want.index
        assert isinstance(got.features, torch.Tensor) == (device is not None)
        np.testing.assert_allclose(np.asarray(got.features), want.features, atol=1e-5, rtol=0)
    assert not isinstance(moving.mel._edge, torch.Tensor) and not moving.mel._cache.on_device
