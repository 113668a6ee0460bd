"""The audio package's small modules: rates, the filter bank, the resampler and the WAV reader/writer."""

from __future__ import annotations

import struct
from pathlib import Path

import av
import numpy as np
import pytest

from MiniCPMO45.audio import rates
from MiniCPMO45.audio.filterbank import hz_to_mel, mel_filter_bank, mel_to_hz
from MiniCPMO45.audio.resample import AudioResampler, resample
from MiniCPMO45.audio.wav import pcm16_header, pcm16_wav, read_mono, read_wav, wav_header, write_wav


def test_rates_are_consistent() -> None:
    assert (rates.MODEL_INPUT_RATE, rates.SPEECH_RATE, rates.WEBRTC_RATE) == (16000, 24000, 48000)
    assert rates.WEBRTC_FRAME_SAMPLES == round(rates.WEBRTC_RATE * rates.WEBRTC_FRAME_S)
    assert rates.DUPLEX_UNIT_SAMPLES == rates.MODEL_INPUT_RATE and rates.CHAT_UNIT_SAMPLES % 512 == 0


@pytest.mark.parametrize("scale", ["slaney", "htk"])
def test_mel_scales_invert(scale: str) -> None:
    hz = np.array([0.0, 100.0, 999.0, 1000.0, 1001.0, 4000.0, 12000.0])
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(hz, scale), scale), hz, rtol=1e-12, atol=1e-9)  # type: ignore[arg-type]
    assert np.all(np.diff(hz_to_mel(hz, scale)) > 0)  # type: ignore[arg-type]


def test_slaney_filter_bank_shape_and_area() -> None:
    bank = mel_filter_bank(24000, 1920, 80, 0.0, 8000.0)
    assert bank.shape == (80, 961) and bank.dtype == np.float64 and not bank.flags.writeable
    assert (bank >= 0).all() and (bank[:, 641:] == 0).all()  # nothing above 8 kHz (bin 640)
    # Slaney normalisation: each triangle has area ~1 in Hz units (height 2 / width).
    np.testing.assert_allclose(bank.sum(axis=1)[5:] * (24000 / 1920), 1.0, rtol=0.05)
    # the triangles peak at their centres, which are evenly spaced in mels
    peaks = mel_filter_bank(16000, 4096, 40, slaney_norm=False).argmax(axis=1) * 16000 / 4096
    steps = np.diff(hz_to_mel(peaks[peaks > 1500]))
    np.testing.assert_allclose(steps, steps.mean(), rtol=0.05)


def test_htk_filter_bank_has_unit_height_triangles() -> None:
    bank = mel_filter_bank(16000, 512, 26, 0.0, None, scale="htk", slaney_norm=False)
    assert bank.shape == (26, 257)
    assert 0.8 < bank.max(axis=1).min() <= bank.max() <= 1.0  # centres fall between bins
    assert not np.array_equal(bank, mel_filter_bank(16000, 512, 26, slaney_norm=False))


def _tone(rate: int, hz: float, seconds: float, level: float) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (level * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.argmax(spectrum) * rate / x.size)


@pytest.mark.parametrize(("src", "dst"), [(48000, 16000), (24000, 48000), (24000, 16000), (16000, 22050)])
def test_resample_keeps_frequency_and_level(src: int, dst: int) -> None:
    tone = _tone(src, 440.0, 1.0, 0.5)
    out = resample(tone, src, dst)
    assert out.dtype == np.float32 and abs(out.size - dst) <= 64
    middle = out[out.size // 4 : 3 * out.size // 4]
    assert abs(_peak_hz(middle, dst) - 440.0) < 3
    np.testing.assert_allclose(np.sqrt(np.mean(middle**2)), 0.5 / np.sqrt(2), rtol=0.02)
    assert np.shares_memory(resample(tone, src, src), tone)  # nothing to do: no copy


def test_streaming_resampler_equals_the_one_shot_resample() -> None:
    signal = _tone(48000, 1000.0, 0.5, 0.3)
    resampler = AudioResampler(format="flt", layout="mono", rate=16000)
    parts = []
    for i in range(0, signal.size, 960):  # 20 ms frames, as WebRTC delivers them
        frame = av.AudioFrame.from_ndarray(signal[None, i : i + 960], format="flt", layout="mono")
        frame.sample_rate = 48000
        parts += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    parts += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    np.testing.assert_allclose(np.concatenate(parts), resample(signal, 48000, 16000), atol=1e-6)


def test_wav_round_trip_and_formats(tmp_path: Path) -> None:
    stereo = np.stack([np.linspace(-0.5, 0.5, 100), np.full(100, 0.25)], axis=1)
    channels, rate = read_wav(pcm16_wav(stereo, 22050))
    assert rate == 22050 and channels.shape == (2, 100) and channels.dtype == np.float32
    np.testing.assert_allclose(channels[1], 0.25, atol=1e-4)
    np.testing.assert_allclose(channels[0], np.linspace(-0.5, 0.5, 100), atol=1e-4)
    floats = np.array([0.5, -0.25], "<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, 16000, 64000, 4, 32)
    data = b"RIFF" + struct.pack("<I", 4 + 24 + 8 + len(floats)) + b"WAVE"
    data += b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(floats)) + floats
    channels, rate = read_wav(data)
    assert rate == 16000 and channels.tolist() == [[0.5, -0.25]]
    with pytest.raises(ValueError, match="RIFF"):
        read_wav(b"not a wav file")
    write_wav(tmp_path / "sub" / "mono.wav", np.array([2.0, -0.5, 0.0]), 8000)  # clipped to [-1, 1]
    mono, rate = read_mono(tmp_path / "sub" / "mono.wav")
    assert rate == 8000 and mono.dtype == np.float32
    np.testing.assert_allclose(mono, [32767 / 32768, -0.5, 0.0], atol=1e-4)
    mono, _ = read_mono(pcm16_wav(stereo, 22050))
    np.testing.assert_allclose(mono, stereo.mean(axis=1), atol=1e-4)


def test_pcm16_wav_is_what_the_wave_module_writes(tmp_path: Path) -> None:
    import io
    import wave

    rng = np.random.default_rng(0)
    for samples, rate in [(rng.uniform(-1.2, 1.2, 333), 24000), (rng.uniform(-1, 1, (50, 2)), 8000)]:
        pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:
            w.setnchannels(1 if pcm.ndim == 1 else pcm.shape[1])
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(pcm.tobytes())
        assert pcm16_wav(samples, rate) == buf.getvalue()
        path = tmp_path / f"{rate}.wav"
        write_wav(path, samples, rate)
        assert wav_header(path) == (rate, 1 if pcm.ndim == 1 else 2, pcm.shape[0])
    assert pcm16_header(16000, 0) + b"" == pcm16_wav(np.zeros(0), 16000)
