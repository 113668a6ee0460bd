"""Voice-prompt front end: mel parity with the fixture, Kaldi fbank, resampling, WAV reading, ONNX wrappers
(on tiny random ONNX networks with the real interfaces) and the per-reference cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from MiniCPMO45.audio.filterbank import _kaldi_mel
from MiniCPMO45.audio.wav import pcm16_wav
from MiniCPMO45.token2wav.features import flow_prompt_mel, kaldi_fbank, s3_log_mel
from MiniCPMO45.token2wav.model import fit_prompt_mel
from MiniCPMO45.token2wav.prompt_frontend import PromptFrontend
from MiniCPMO45.token2wav.tiny_onnx import build_tiny_speaker, build_tiny_tokenizer

from .token2wav_assets import load_tiny_token2wav

TOL = {"atol": 1e-4, "rtol": 1e-4}


@pytest.fixture(scope="module")
def prep(token2wav_fixture_dir: Path) -> dict[str, np.ndarray]:
    return dict(np.load(token2wav_fixture_dir / "expected" / "prompt_prep.npz"))


def test_flow_prompt_mel_parity(prep: dict[str, np.ndarray]) -> None:
    mel = flow_prompt_mel(torch.from_numpy(prep["prompt_wav_24k"]))
    np.testing.assert_allclose(mel.numpy(), prep["flow_prompt_mel_raw"], **TOL)
    np.testing.assert_allclose(fit_prompt_mel(mel, 50).numpy(), prep["flow_prompt_mel"], **TOL)


def test_fit_prompt_mel_pads_with_last_frame() -> None:
    mel = torch.arange(6.0).reshape(1, 3, 2)
    assert torch.equal(fit_prompt_mel(mel, 5)[0, 3:], torch.tensor([[4.0, 5.0], [4.0, 5.0]]))
    assert fit_prompt_mel(mel, 2).shape == (1, 2, 2)


def test_s3_log_mel_parity(prep: dict[str, np.ndarray]) -> None:
    np.testing.assert_allclose(
        s3_log_mel(torch.from_numpy(prep["prompt_wav_16k"])).numpy(), prep["s3tokenizer_log_mel"], **TOL
    )


def test_kaldi_fbank_definition() -> None:
    rate = 16000
    t = np.arange(rate) / rate
    audio = (0.3 * np.sin(2 * np.pi * 1000 * t) + 0.05).astype(np.float32)
    feats = kaldi_fbank(torch.from_numpy(audio))
    assert feats.shape == (1 + (rate - 400) // 160, 80)
    # The tone lands in the band whose Kaldi-mel centre is nearest 1 kHz; the DC offset is removed.
    lo, hi = _kaldi_mel(20.0), _kaldi_mel(8000.0)
    centres = lo + (np.arange(80) + 1) * (hi - lo) / 81
    assert abs(int(feats[10].argmax()) - int(np.abs(centres - _kaldi_mel(1000.0)).argmin())) <= 1
    shifted = kaldi_fbank(torch.from_numpy(audio + 0.2))
    np.testing.assert_allclose(shifted.numpy(), feats.numpy(), atol=1e-3)

    # One frame by hand with numpy (Kaldi's recipe, written out step by step).
    frame = audio[160:560].astype(np.float64)
    frame = frame - frame.mean()
    frame = frame - 0.97 * np.concatenate([[frame[0]], frame[:-1]])
    n = np.arange(400)
    frame = frame * (0.5 - 0.5 * np.cos(2 * np.pi * n / 399)) ** 0.85
    power = np.abs(np.fft.rfft(frame, 512)) ** 2
    mel_of_bin = _kaldi_mel(np.arange(256) * rate / 512)
    delta = (hi - lo) / 81
    expected = []
    for b in range(80):
        left, centre, right = lo + b * delta, lo + (b + 1) * delta, lo + (b + 2) * delta
        w = np.clip(
            np.minimum((mel_of_bin - left) / (centre - left), (right - mel_of_bin) / (right - centre)),
            0,
            None,
        )
        expected.append(np.log(max(float(w @ power[:256]), 1.1920929e-07)))
    np.testing.assert_allclose(feats[1].numpy(), expected, atol=1e-3)
    with pytest.raises(ValueError, match="shorter"):
        kaldi_fbank(torch.zeros(100))


@pytest.fixture(scope="module")
def frontend(tmp_path_factory: pytest.TempPathFactory) -> PromptFrontend:
    folder = tmp_path_factory.mktemp("onnx")
    return PromptFrontend(
        build_tiny_tokenizer(folder / "speech_tokenizer_v2_25hz.onnx"),
        build_tiny_speaker(folder / "campplus.onnx"),
        cache_size=2,
    )


def _voice_wav(seconds: float, rate: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    audio = 0.3 * np.sin(2 * np.pi * 180 * t) * (
        1 + 0.5 * np.sin(2 * np.pi * 3 * t)
    ) + 0.01 * rng.standard_normal(t.size)
    return pcm16_wav(audio.astype(np.float32), rate)


def test_frontend_features_and_cache(frontend: PromptFrontend) -> None:
    wav = _voice_wav(1.0, 24000, 0)
    features = frontend.prepare(wav)
    assert features.tokens.shape == (25,) and features.tokens.dtype == np.int64
    assert features.tokens.max() < 6561
    assert features.prompt_mel.shape == (1, 50, 80) and features.spk_embedding.shape == (1, 192)
    assert np.abs(features.spk_embedding).sum() > 0
    assert frontend.prepare(wav) is features  # cached by content
    other = frontend.prepare(_voice_wav(1.0, 24000, 1))
    assert other is not features
    frontend.prepare(_voice_wav(0.8, 16000, 2))
    assert frontend.prepare(wav) is not features  # evicted (cache holds 2)
    with pytest.raises(ValueError, match="RIFF"):
        frontend.prepare(b"garbage")


def test_frontend_feeds_the_vocoder(
    frontend: PromptFrontend, token2wav_fixture_dir: Path, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    model = load_tiny_token2wav(token2wav_fixture_dir, tmp_path / "t2w")
    features = frontend.prepare(_voice_wav(1.2, 44100, 3))
    voice = model.prepare_prompt(features.tokens, features.prompt_mel, features.spk_embedding)
    assert voice.prompt_frames == 2 * features.tokens.size
    turn = model.start_turn(voice)
    pieces = model.push_codes(turn, list(range(100, 130)), end_of_turn=True)
    # 3 silence + 30 tokens -> 66 mel frames -> 66 * 480 samples in total, plus the 3840-sample zero prefix.
    assert sum(p.size for p in pieces) == 66 * 480 + 3840
    assert all(np.isfinite(p).all() for p in pieces)
