"""token2wav asset folder: layout detection, .pt/.safetensors weights, YAML tags, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from MiniCPMO45.loader import CheckpointError
from MiniCPMO45.token2wav import AssetLayoutError, Token2Wav, detect_layout, read_weights
from MiniCPMO45.token2wav.crossfade_vocoder import CrossfadeVocoder
from MiniCPMO45.token2wav.hift import SourceNoise
from MiniCPMO45.token2wav.hparams import (
    HParamsError,
    causal_hift_params_from_yaml,
    flow_params_from_yaml,
    load_tagged_yaml,
)

from .token2wav_assets import build_asset_folder


def test_new_layout(token2wav_fixture_dir: Path, tmp_path: Path) -> None:
    folder = build_asset_folder(token2wav_fixture_dir, tmp_path / "t2w", "new")
    layout = detect_layout(folder)
    assert layout.kind == "new"
    assert layout.hift_original_weights == folder / "hift_original.safetensors"
    assert layout.tokenizer_onnx is None and layout.speaker_onnx is None


def test_old_layout_loads_original_hift_and_streams_with_crossfade(
    token2wav_fixture_dir: Path, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    folder = build_asset_folder(token2wav_fixture_dir, tmp_path / "t2w", "old")
    # The old hift.pt is a torch pickle whose keys carry the "generator." prefix.
    state = load_file(str(folder / "hift.safetensors"))
    (folder / "hift.safetensors").unlink()
    torch.save({f"generator.{k}": v for k, v in state.items()}, folder / "hift.pt")
    assert detect_layout(folder).kind == "old"
    inputs = np.load(token2wav_fixture_dir / "inputs" / "inputs.npz")
    model = Token2Wav.from_assets(folder, flow_noise=torch.from_numpy(inputs["rand_noise_prefix"]))
    assert model.layout == "old" and isinstance(model.streaming, CrossfadeVocoder)
    voice = model.prepare_prompt(inputs["prompt_tokens"], inputs["prompt_mel"], inputs["spk_embedding"])
    ns = np.load(token2wav_fixture_dir / "expected" / "nonstream.npz")
    noise = SourceNoise(torch.from_numpy(ns["sinegen_rand_ini"]), torch.from_numpy(ns["sinegen_noise"]))
    wav = model.synthesize(ns["gen_tokens"], voice, source_noise=noise)
    np.testing.assert_allclose(wav, ns["wav"][0], atol=5e-4, rtol=0)
    turn = model.start_turn(voice)
    pieces = model.push_codes(turn, [int(t) for t in ns["gen_tokens"]], end_of_turn=True)
    assert [p.shape[0] for p in pieces] == [24000, 24000, 6720]
    assert not pieces[0][:3840].any() and np.abs(pieces[0][3840:]).max() > 0


@pytest.mark.parametrize("remove", ["config.yaml", "hift_original.safetensors"])
def test_mixed_layout_is_rejected(token2wav_fixture_dir: Path, tmp_path: Path, remove: str) -> None:
    folder = build_asset_folder(token2wav_fixture_dir, tmp_path / "t2w", "new")
    (folder / remove).unlink()
    with pytest.raises(AssetLayoutError, match="mixes the two token2wav layouts"):
        detect_layout(folder)


def test_missing_files_are_named(token2wav_fixture_dir: Path, tmp_path: Path) -> None:
    folder = build_asset_folder(token2wav_fixture_dir, tmp_path / "t2w", "new")
    (folder / "flow.safetensors").unlink()
    with pytest.raises(AssetLayoutError, match="flow.pt"):
        detect_layout(folder)
    with pytest.raises(AssetLayoutError, match="does not exist"):
        detect_layout(tmp_path / "nowhere")


def test_pt_weights_equal_safetensors(token2wav_fixture_dir: Path, tmp_path: Path) -> None:
    src = token2wav_fixture_dir / "weights" / "flow.safetensors"
    state = load_file(str(src))
    torch.save(state, tmp_path / "flow.pt")
    loaded = read_weights(tmp_path / "flow.pt")
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    torch.save({"not": "tensors"}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="state dict"):
        read_weights(tmp_path / "bad.pt")
    (tmp_path / "x.bin.gz").write_bytes(b"")
    with pytest.raises(CheckpointError, match="unsupported"):
        read_weights(tmp_path / "x.bin.gz")


def test_weight_shape_mismatch_is_named(token2wav_fixture_dir: Path, tmp_path: Path) -> None:
    folder = build_asset_folder(token2wav_fixture_dir, tmp_path / "t2w", "new")
    yaml_text = (folder / "flow.yaml").read_text().replace("hidden_size: 32", "hidden_size: 64")
    (folder / "flow.yaml").write_text(yaml_text)
    with pytest.raises(CheckpointError, match="decoder.estimator"):
        Token2Wav.from_assets(folder)


def test_yaml_tags(token2wav_fixture_dir: Path, tmp_path: Path) -> None:
    params, mel = causal_hift_params_from_yaml(token2wav_fixture_dir / "hparams" / "config.yaml")
    assert params.sampling_rate == 24000 and params.hop_samples == 480 and params.conv_pre_look_right == 4
    assert mel.n_fft == 1920 and mel.fmax == 8000 and mel.center is False
    flow = flow_params_from_yaml(token2wav_fixture_dir / "hparams" / "flow.yaml")
    assert flow.encoder.pre_lookahead_len == 3 and flow.estimator.in_channels == 320

    evil = tmp_path / "evil.yaml"
    evil.write_text("flow: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(HParamsError, match="not valid YAML"):
        load_tagged_yaml(evil)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("hift: !new:some.other.Generator\n  in_channels: 80\n")
    with pytest.raises(HParamsError, match="CausalHiFTGenerator"):
        causal_hift_params_from_yaml(wrong)
    dangling = tmp_path / "ref.yaml"
    dangling.write_text("a: !ref <missing>\n")
    with pytest.raises(HParamsError, match="missing"):
        load_tagged_yaml(dangling)
    bad_mel = tmp_path / "config.yaml"
    bad_mel.write_text(
        (token2wav_fixture_dir / "hparams" / "config.yaml").read_text().replace("fmax: 8000", "fmax: 7600")
    )
    with pytest.raises(HParamsError, match="feat_extractor"):
        causal_hift_params_from_yaml(bad_mel)
