"""Audio features: batch and half-duplex streaming parity with the fixtures, full-duplex streaming rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from MiniCPMO45.audio.filterbank import mel_filter_bank
from MiniCPMO45.audio.load import AudioFileError, load_audio
from MiniCPMO45.audio.mel import (
    DYNAMIC_FLOOR,
    FIXED_FLOOR_MODE,
    audio_token_count,
    batch_features,
    chunked_audio_token_counts,
    clip_features,
    cnn_frame_count,
    log_mel,
    mel_frame_count,
    pooled_count,
)
from MiniCPMO45.audio.mel_stream import ExactStreamingMel, HalfDuplexStreamingMel, StreamingMel
from MiniCPMO45.audio.resample import resample

TOL = {"atol": 1e-4, "rtol": 1e-4}


def _npz(fixture_dir: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(fixture_dir / "expected" / f"{name}.npz") as data:
        return {k: data[k] for k in data.files}


def test_batch_features_match_a_processor(tiny_fixture_dir: Path) -> None:
    a = _npz(tiny_fixture_dir, "a_processor")
    audio = load_audio(tiny_fixture_dir / "inputs" / "chat_audio.wav")
    feats, lens = batch_features([audio])
    assert feats.shape == a["audio_features"].shape and feats.dtype == np.float32
    np.testing.assert_array_equal(lens, a["audio_feature_lens"])
    np.testing.assert_allclose(feats, a["audio_features"], **TOL)


def test_half_duplex_stream_matches_d_streaming(tiny_fixture_dir: Path) -> None:
    d = _npz(tiny_fixture_dir, "d_streaming")
    audio = load_audio(tiny_fixture_dir / "inputs" / "duplex_audio.wav")
    stream = HalfDuplexStreamingMel()
    for i in range(3):
        feats, n_samples = stream.push(audio[i * 16000 : (i + 1) * 16000])
        expected = d[f"prefill{i + 1}_audio_features"][0]
        assert feats.shape == expected.shape
        np.testing.assert_allclose(feats, expected, **TOL)
        assert n_samples == (16560 if i == 0 else 16000)
        assert audio_token_count(n_samples) == 10  # the placeholder count in prefill{i}_input_ids


def test_token_count_formulas() -> None:
    assert [mel_frame_count(16000), cnn_frame_count(100), pooled_count(50)] == [100, 50, 10]
    assert audio_token_count(16000) == 10
    assert audio_token_count(24000) == 15  # the a_processor audio span
    assert audio_token_count(16560) == 10
    assert mel_frame_count(16001) == 101
    assert chunked_audio_token_counts(24000) == [10, 5]
    assert chunked_audio_token_counts(16000) == [10]


def test_mel_filter_bank_shape_and_area() -> None:
    fb = mel_filter_bank(16000, 400, 80).T
    assert fb.shape == (201, 80)
    assert (fb >= 0).all() and (fb.max(axis=0) > 0).all()
    # Slaney normalisation: area (in Hz) of each triangle is 1
    areas = fb.sum(axis=0) * (8000 / 200)
    np.testing.assert_allclose(areas, 1.0, rtol=0.1)


def _signal(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * 300 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


def test_full_duplex_units_follow_the_first_chunk_rule() -> None:
    audio = _signal(4.0)
    mel = StreamingMel()
    units = [mel.push(audio[i * 16000 : (i + 1) * 16000]) for i in range(4)]
    assert all(u is not None for u in units)
    first = units[0]
    assert first is not None
    assert first.features.shape == (80, 102) and (first.prefix_frames, first.suffix_frames) == (0, 2)
    assert first.samples_consumed == 16480
    for k, u in enumerate(units[1:], start=1):
        assert u is not None and u.index == k
        assert u.features.shape == (80, 104) and (u.prefix_frames, u.suffix_frames) == (2, 2)
        assert u.core_frames == 100 and u.samples_consumed == 16000
    assert mel.pending.size == 80  # the permanent 5 ms lag


def test_full_duplex_frames_equal_offline_frames_under_5s() -> None:
    """Exact mode: each emitted frame equals the same frame of the offline mel (fixed floor under 5 s)."""
    audio = _signal(4.0, seed=1)
    mel = StreamingMel()
    stream_input = np.concatenate([np.zeros(560, np.float32), audio])  # first unit left-padded to 1035 ms
    offline = log_mel(stream_input, FIXED_FLOOR_MODE)
    for i in range(4):
        unit = mel.push(audio[i * 16000 : (i + 1) * 16000])
        assert unit is not None
        start = i * 100 - unit.prefix_frames
        np.testing.assert_allclose(
            unit.features, offline[:, start : start + unit.features.shape[1]], atol=1e-5
        )


def test_floor_switches_to_dynamic_at_5s_and_window_slides() -> None:
    audio = _signal(36.0, seed=2)
    mel = StreamingMel()
    floors, sizes = [], []
    for i in range(36):
        unit = mel.push(audio[i * 16000 : (i + 1) * 16000])
        assert unit is not None and unit.features.shape[1] == (102 if i == 0 else 104)
        floors.append(mel.mel.last_floor)
        sizes.append(mel.mel.buffer.size)
    assert floors[3] == FIXED_FLOOR_MODE and floors[5] == DYNAMIC_FLOOR
    assert max(sizes) < 30 * 16000 and mel.mel.base_frame > 0
    # global frame indices survive the slide: the last unit's core starts at frame 3500
    assert mel.mel.emitted_frames == 3600


def test_cached_frames_equal_a_full_recompute() -> None:
    """The incremental path must give the official full-recompute output, through the 5 s floor switch, loud
    passages that move the dynamic maximum, and buffer slides."""
    audio = _signal(34.0, seed=5)
    audio[6 * 16000 : 8 * 16000] *= 3.0
    audio[20 * 16000 : 21 * 16000] = 0.0
    # A loud click just before where the buffer starts after its first slide (stream sample 160000, i.e. audio
    # sample 159440 after the 560-sample first-unit padding): the recomputed edge frame reflects and misses it.
    audio[159300:159420] = 40.0 * (-1.0) ** np.arange(120)
    fast, reference = StreamingMel(), StreamingMel()
    reference.mel.recompute = True
    for i in range(34):
        a = fast.push(audio[i * 16000 : (i + 1) * 16000])
        b = reference.push(audio[i * 16000 : (i + 1) * 16000])
        assert a is not None and b is not None
        assert (a.prefix_frames, a.suffix_frames) == (b.prefix_frames, b.suffix_frames)
        np.testing.assert_allclose(a.features, b.features, atol=1e-6, rtol=0)
    assert fast.mel.base_frame == reference.mel.base_frame > 0


def test_sessions_do_not_share_floor_state(tiny_fixture_dir: Path) -> None:
    """A long streaming session must not change how another session or the batch path encodes audio."""
    clip = load_audio(tiny_fixture_dir / "inputs" / "chat_audio.wav")
    before, _ = batch_features([clip])
    long_session, short_session, alone = StreamingMel(), StreamingMel(), StreamingMel()
    audio = _signal(7.0, seed=3)
    for i in range(7):
        long_session.push(audio[i * 16000 : (i + 1) * 16000])
    assert long_session.mel.last_floor == DYNAMIC_FLOOR
    short = short_session.push(audio[:16000])
    ref = alone.push(audio[:16000])
    assert short is not None and ref is not None
    np.testing.assert_array_equal(short.features, ref.features)
    after, _ = batch_features([clip])
    np.testing.assert_array_equal(before, after)


def test_streaming_waits_for_enough_audio() -> None:
    mel = ExactStreamingMel(chunk_ms=1000, first_chunk_ms=1035, redundancy_ms=20)
    feats, _, _ = mel.process(_signal(0.5))
    assert feats.shape == (80, 0)
    session = StreamingMel()
    assert session.push(_signal(0.5)) is not None  # the first unit is padded up to 1035 ms
    assert session.push(_signal(0.5)) is None  # later units need a full second
    assert session.push(_signal(0.5)) is not None


def test_bad_audio_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        log_mel(np.zeros(100, np.float32))
    with pytest.raises(ValueError):
        log_mel(np.zeros((2, 1000), np.float32))
    with pytest.raises(AudioFileError):
        load_audio(tmp_path / "missing.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    with pytest.raises(AudioFileError):
        load_audio(bad)


def test_load_audio_resamples_int16_stereo(tmp_path: Path) -> None:
    import wave

    rate, seconds = 48000, 0.5
    t = np.arange(int(rate * seconds)) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    path = tmp_path / "stereo.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.stack([tone, tone], axis=1).tobytes())
    out = load_audio(path)
    assert out.dtype == np.float32 and abs(out.size - 8000) <= 32
    assert 0.45 < np.abs(out).max() < 0.55
    np.testing.assert_array_equal(resample(out, 16000, 16000), out)
    # a 440 Hz tone keeps its pitch through the 48 kHz -> 16 kHz resampling
    spectrum = np.abs(np.fft.rfft(out[1000:7000]))
    assert abs(np.argmax(spectrum) * 16000 / 6000 - 440) < 5


def test_push_drains_one_unit_at_a_time() -> None:
    mel = StreamingMel()
    assert mel.push(np.zeros(0, np.float32)) is None  # nothing pushed, no padded unit of silence
    audio = _signal(3.0, seed=4)
    first = mel.push(audio)
    assert first is not None and first.index == 0
    second = mel.push(np.zeros(0, np.float32))
    assert second is not None and second.index == 1
    assert mel.push(np.zeros(0, np.float32)) is None  # 48000 - 16480 - 16000 < 16000 (no padding: >= 1035 ms)
    assert mel.pending.size == 48000 - 16480 - 16000


@pytest.mark.parametrize("n_samples", [401, 16000, 24001, 160_799, 479_700, 480_000])
def test_short_padding_equals_the_30s_padding(n_samples: int) -> None:
    rng = np.random.default_rng(n_samples)
    clip = (0.2 * rng.standard_normal(n_samples)).astype(np.float32)
    clip[-50:] *= 20  # a loud tail: frames past the clip end see it and can hold the maximum
    fast, full = clip_features(clip), clip_features(clip, full_pad=True)
    assert fast.shape == full.shape == (80, mel_frame_count(n_samples))
    np.testing.assert_allclose(fast, full, atol=1e-6, rtol=0)
    quiet = np.zeros(n_samples, np.float32)
    np.testing.assert_array_equal(clip_features(quiet), clip_features(quiet, full_pad=True))
