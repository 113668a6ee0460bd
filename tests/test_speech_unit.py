"""Speech output end to end on the embedded tiny model (issue 4): a forced speaking duplex unit becomes 1 s of
finite, audible 24 kHz float32 PCM, and a reference voice is prepared once and reused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference import protocol as p
from inference.engine_host import get_host
from inference.modes import create_mode
from inference.modes.base import ModeUnit, SessionOptions
from MiniCPMO45.audio.wav import pcm16_wav
from tests.worker_helpers import embedded

SETTINGS = embedded(max_sessions=4)


@pytest.fixture(scope="module")
def host():
    torch.set_num_threads(1)
    return get_host(SETTINGS)


def test_forced_speaking_unit_gives_one_second_of_audible_pcm(host) -> None:
    rng = np.random.default_rng(7)
    mode = create_mode("audio_duplex", SETTINGS)
    setup, _ = mode.open(SessionOptions("speech-1", extra={"force": "speak", "seed": 11}))
    try:
        assert setup.output_rate == 24000
        per_unit: list[list[p.AudioOut]] = []
        for i in range(6):
            audio = (0.05 * rng.standard_normal(16000)).astype(np.float32)
            per_unit.append(
                [o for o in mode.on_unit(ModeUnit(i, audio, 0.0), None) if isinstance(o, p.AudioOut)]
            )
        spoken = [u for u in per_unit if u]
        assert spoken, "no speaking unit in six forced-speak units"
        pcm = np.concatenate([s.pcm for s in spoken[0]])
        assert pcm.dtype == np.float32
        assert (
            pcm.size == 24000
        )  # a unit that does not end the turn is exactly 1 s (left-padded like the reference)
        assert np.isfinite(pcm).all()
        assert float(np.sqrt(np.mean(pcm[-12000:] ** 2))) > 1e-3  # not silent
        assert float(np.abs(pcm).max()) <= 1.0
    finally:
        mode.close()


def test_reference_voice_is_prepared_once(host, tmp_path) -> None:
    frontend = host.frontend
    assert frontend is not None
    rng = np.random.default_rng(3)
    t = np.arange(16000 * 2) / 16000
    clip = (0.3 * np.sin(2 * np.pi * 180 * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
    wav = pcm16_wav(clip)
    calls = 0
    original = frontend.features

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 (spy on the real method)
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    frontend.features = counting  # type: ignore[method-assign]
    try:
        first = frontend.prepare(wav)
        second = frontend.prepare(wav)
    finally:
        frontend.features = original  # type: ignore[method-assign]
    assert calls == 1
    assert np.array_equal(np.asarray(first.tokens), np.asarray(second.tokens))
