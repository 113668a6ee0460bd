"""Batched vocoder windows (one flow batch per window shape, HiFT per session) give each turn the audio that
`Token2Wav.push_codes` gives it alone, over mid-turn units, a turn end and sessions at different points."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from MiniCPMO45.engine.batched_vocoder import push_codes_batched
from MiniCPMO45.token2wav import Token2Wav
from MiniCPMO45.token2wav.random_assets import write_random_assets


@pytest.fixture(scope="module")
def vocoder(tmp_path_factory: pytest.TempPathFactory) -> Token2Wav:
    folder = write_random_assets(tmp_path_factory.mktemp("t2w"), size="tiny", with_onnx=False)
    return Token2Wav.from_assets(folder, n_timesteps=3)


def test_batched_push_matches_per_turn(vocoder: Token2Wav) -> None:
    rng = np.random.default_rng(0)
    voice = vocoder.prepare_prompt(
        rng.integers(0, 6561, size=20),
        rng.standard_normal((1, 40, 80)).astype(np.float32) * 0.5,
        rng.standard_normal((1, 192)).astype(np.float32),
    )
    # three turns: two in lockstep (batched together), one a unit behind; unit 2 ends turn 0
    plan = [
        [(25, False), (25, False), (25, True)],
        [(25, False), (25, False), (25, False)],
        [(0, False), (25, False), (12, False)],
    ]
    codes = [[rng.integers(0, 6561, size=n).tolist() for n, _ in row] for row in plan]
    solo = [vocoder.start_turn(voice, rule="duplex") for _ in plan]
    together = [vocoder.start_turn(voice, rule="duplex") for _ in plan]
    got_any = 0
    for u in range(3):
        want = [vocoder.push_codes(t, codes[i][u], plan[i][u][1]) for i, t in enumerate(solo)]
        got = push_codes_batched(vocoder, together, [codes[i][u] for i in range(3)], [p[u][1] for p in plan])
        for w, g in zip(want, got, strict=True):
            assert len(w) == len(g)
            for a, b in zip(w, g, strict=True):
                assert a.shape == b.shape
                np.testing.assert_allclose(b, a, rtol=1e-3, atol=2e-4)
                got_any += 1
    assert got_any >= 6
    assert together[0].finished and not together[1].finished
    for a, b in zip(solo, together, strict=True):
        assert a.buffer == b.buffer and a.windows == b.windows
        assert torch.allclose(a.flow_cache.estimator_kv, b.flow_cache.estimator_kv, atol=1e-4, rtol=1e-3)
