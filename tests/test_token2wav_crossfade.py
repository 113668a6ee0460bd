"""Old-layout streaming vocoder: original HiFT, 8-frame mel / 3840-sample source caches, Hamming cross-fade."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from MiniCPMO45.loader import load_weights
from MiniCPMO45.token2wav.crossfade_vocoder import CrossfadeVocoder, hamming
from MiniCPMO45.token2wav.hift import HiFTGenerator
from MiniCPMO45.token2wav.hparams import F0PredictorParams, HiFTParams


@pytest.fixture(scope="module")
def hift(token2wav_fixture_dir: Path) -> HiFTGenerator:
    torch.set_num_threads(1)
    kwargs = json.loads((token2wav_fixture_dir / "manifest.json").read_text())["original_hift_kwargs"]
    model = HiFTGenerator(
        HiFTParams(
            base_channels=kwargs["base_channels"], f0_predictor=F0PredictorParams(**kwargs["f0_predictor"])
        )
    ).eval()
    load_weights(model, load_file(str(token2wav_fixture_dir / "weights" / "hift_original.safetensors")))
    return model


def test_hamming_matches_numpy() -> None:
    np.testing.assert_allclose(hamming(7680).numpy(), np.hamming(7680), atol=1e-12)


def test_crossfade_rule(hift: HiFTGenerator, token2wav_fixture_dir: Path) -> None:
    st = np.load(token2wav_fixture_dir / "expected" / "stream.npz")
    mels = [torch.from_numpy(st[f"call{i}_mel"]) for i in range(3)]
    vocoder = CrossfadeVocoder(hift)
    state = vocoder.new_state(seed=7)
    out = [vocoder.stream(state, mel, final=i == 2) for i, mel in enumerate(mels)]
    assert [o.shape[1] for o in out] == [24000, 24000, 6720]

    # The same audio composed by hand from whole-utterance calls with the same random stream.
    gen = torch.Generator().manual_seed(7)
    window = torch.from_numpy(np.hamming(7680))
    speech0, source0, _ = hift(mels[0], generator=gen)
    np.testing.assert_array_equal(out[0][0, :3840].numpy(), 0)
    np.testing.assert_allclose(out[0][0, 3840:].numpy(), speech0[0, :-3840].numpy(), atol=1e-6)
    full1 = torch.cat([mels[0][:, :, -8:], mels[1]], dim=2)
    speech1, source1, _ = hift(full1, cached_source=source0[:, :, -3840:], generator=gen)
    np.testing.assert_allclose(source1[0, 0, :3840].numpy(), source0[0, 0, -3840:].numpy())
    faded = speech1[0, :3840].double() * window[:3840] + speech0[0, -3840:].double() * window[3840:]
    np.testing.assert_allclose(out[1][0, :3840].numpy(), faded.float().numpy(), atol=1e-6)
    np.testing.assert_allclose(out[1][0, 3840:].numpy(), speech1[0, 3840:-3840].numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="finalized"):
        vocoder.stream(state, mels[2])


def test_state_clone_replays_the_same_noise(hift: HiFTGenerator, token2wav_fixture_dir: Path) -> None:
    mel = torch.from_numpy(np.load(token2wav_fixture_dir / "expected" / "stream.npz")["call0_mel"])
    vocoder = CrossfadeVocoder(hift)
    state = vocoder.new_state()
    vocoder.stream(state, mel[:, :, :20])
    copy = state.clone()
    assert torch.equal(vocoder.stream(state, mel[:, :, 20:]), vocoder.stream(copy, mel[:, :, 20:]))
