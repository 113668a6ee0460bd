"""Random-weight asset folders (embedded default, benchmarks) load through the real loader and speak."""

from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from MiniCPMO45.token2wav import Token2Wav, detect_layout
from MiniCPMO45.token2wav.prompt_frontend import PromptFrontend
from MiniCPMO45.token2wav.random_assets import config_yaml, flow_yaml, write_random_assets


def test_real_size_yaml_matches_the_spec(tmp_path: Path) -> None:
    from MiniCPMO45.token2wav.hparams import causal_hift_params_from_yaml, flow_params_from_yaml

    (tmp_path / "flow.yaml").write_text(flow_yaml("real"))
    (tmp_path / "config.yaml").write_text(config_yaml("real"))
    flow = flow_params_from_yaml(tmp_path / "flow.yaml")
    assert (flow.encoder.num_blocks, flow.encoder.num_up_blocks, flow.encoder.linear_units) == (6, 4, 2048)
    assert (flow.estimator.depth, flow.estimator.hidden_size, flow.estimator.num_heads) == (16, 512, 8)
    hift, _ = causal_hift_params_from_yaml(tmp_path / "config.yaml")
    assert hift.base_channels == 512 and hift.f0_predictor.cond_channels == 512


def test_tiny_random_assets_run_end_to_end(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    folder = write_random_assets(tmp_path / "token2wav", size="tiny", seed=3)
    layout = detect_layout(folder)
    assert layout.kind == "new" and layout.flow_weights.suffix == ".pt" and layout.speaker_onnx is not None
    model = Token2Wav.from_assets(folder, source_noise_table=torch.rand(1, 24000, 9))
    frontend = PromptFrontend.from_layout(layout)
    t = np.arange(24000) / 24000
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(24000)
        w.writeframes((0.3 * np.sin(2 * np.pi * 200 * t) * 32767).astype("<i2").tobytes())
    features = frontend.prepare(buf.getvalue())
    voice = model.prepare_prompt(features.tokens, features.prompt_mel, features.spk_embedding)
    turn = model.start_turn(voice, rule="duplex")
    pieces = model.push_codes(turn, list(range(1000, 1050)), end_of_turn=True)
    audio = np.concatenate(pieces)
    assert audio.size == (3 + 50) * 960 + 3840 and np.isfinite(audio).all()
    assert 0 < np.abs(audio).max() <= 0.99
    wav = model.synthesize(list(range(1000, 1010)), voice)
    assert wav.shape == (9600,) and np.isfinite(wav).all()


def test_frontend_needs_onnx_files(tmp_path: Path) -> None:
    folder = write_random_assets(tmp_path / "token2wav", size="tiny", with_onnx=False)
    with pytest.raises(FileNotFoundError, match="campplus.onnx"):
        PromptFrontend.from_layout(detect_layout(folder))
    with pytest.raises(ValueError, match="'tiny' or 'real'"):
        write_random_assets(tmp_path / "x", size="huge")  # type: ignore[arg-type]
