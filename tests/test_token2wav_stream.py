"""The streaming session API end to end on the tiny fixture: prompt setup, turn windows, audio parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from MiniCPMO45.token2wav import PromptCache, PushRequest, Token2Wav, duplex_unit_audio, pcm16_roundtrip
from MiniCPMO45.token2wav.hift import SourceNoise

from .token2wav_assets import load_tiny_token2wav

TOL = {"atol": 1e-4, "rtol": 1e-4}
# Flow -> vocoder chain: each stage matches the fixture to 1e-4 on its own (test_token2wav_flow/hift). Chained,
# float32 rounding in the mel (~2e-6, the same size as the package's own error against float64) moves F0 by
# ~1e-4 Hz, and the float64 phase integrates that over the stream, so the waveform drifts by up to ~1.1e-4.
CHAIN_ATOL = 5e-4
# Our batched path against our single turns: the same drift grown from their batch-size rounding (~1e-6 on the
# mel), with no fixture at the end to bound it; 5.6e-4 seen with AVX-512 kernels (see test_token2wav_graphs)
DRIFT_ATOL = 2e-3


@pytest.fixture(scope="module")
def model(token2wav_fixture_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Token2Wav:
    torch.set_num_threads(1)
    return load_tiny_token2wav(token2wav_fixture_dir, tmp_path_factory.mktemp("t2w") / "token2wav")


@pytest.fixture(scope="module")
def voice(model: Token2Wav, token2wav_fixture_dir: Path) -> PromptCache:
    inputs = np.load(token2wav_fixture_dir / "inputs" / "inputs.npz")
    return model.prepare_prompt(inputs["prompt_tokens"][0], inputs["prompt_mel"], inputs["spk_embedding"])


@pytest.fixture(scope="module")
def expected(token2wav_fixture_dir: Path) -> dict[str, np.ndarray]:
    return dict(np.load(token2wav_fixture_dir / "expected" / "stream.npz"))


@pytest.fixture(scope="module")
def gen_tokens(token2wav_fixture_dir: Path) -> list[int]:
    return [int(t) for t in np.load(token2wav_fixture_dir / "inputs" / "inputs.npz")["gen_tokens"]]


def test_prompt_cache_matches_setup(voice: PromptCache, expected: dict[str, np.ndarray]) -> None:
    np.testing.assert_allclose(
        voice.flow_cache.conformer_att.numpy(), expected["setup_conformer_att_cache"], **TOL
    )
    np.testing.assert_allclose(
        voice.flow_cache.estimator_kv.numpy(), expected["setup_estimator_att_cache"][:5], **TOL
    )


@pytest.mark.parametrize(("rule", "flush"), [("turn", False), ("duplex", False), ("duplex", True)])
def test_turn_matches_official_stream(
    model: Token2Wav,
    voice: PromptCache,
    expected: dict[str, np.ndarray],
    gen_tokens: list[int],
    rule: str,
    flush: bool,
) -> None:
    # 3 silence + 50 tokens: every rule gives windows of 28, 28 and a final 3 for this input.
    turn = model.start_turn(voice, rule=rule)  # type: ignore[arg-type]
    pieces = model.push_codes(turn, gen_tokens, end_of_turn=False, flush=flush)
    pieces += model.push_codes(turn, [], end_of_turn=True)
    assert [p.shape[0] for p in pieces] == [24000, 24000, 6720]
    for i, piece in enumerate(pieces):
        assert piece.dtype == np.float32
        np.testing.assert_allclose(piece, expected[f"call{i}_wav"][0], atol=CHAIN_ATOL, rtol=0)
    assert not pieces[0][:3840].any()
    np.testing.assert_allclose(np.concatenate(pieces), expected["wav_concat"], atol=CHAIN_ATOL, rtol=0)
    with pytest.raises(ValueError, match="flushed"):
        model.push_codes(turn, [1])


def test_turns_do_not_share_state(
    model: Token2Wav, voice: PromptCache, expected: dict[str, np.ndarray], gen_tokens: list[int]
) -> None:
    before = voice.flow_cache.estimator_kv.clone()
    first = model.start_turn(voice)
    second = model.start_turn(voice)
    # Interleave two turns of the same voice unit by unit (25 codes each, as the duplex TTS produces).
    a = model.push_codes(first, gen_tokens[:25])
    b = model.push_codes(second, gen_tokens[:25])
    a += model.push_codes(first, gen_tokens[25:], end_of_turn=True)
    b += model.push_codes(second, gen_tokens[25:], end_of_turn=True)
    for got in (a, b):
        np.testing.assert_allclose(np.concatenate(got), expected["wav_concat"], atol=CHAIN_ATOL, rtol=0)
    np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
    assert torch.equal(voice.flow_cache.estimator_kv, before)


def test_duplex_short_windows(model: Token2Wav, voice: PromptCache, gen_tokens: list[int]) -> None:
    turn = model.start_turn(voice, rule="duplex")
    assert model.push_codes(turn, gen_tokens[:4], flush=True) == []  # 7 buffered: below the 8-token minimum
    assert model.push_codes(turn, gen_tokens[4:10]) == []  # 13 buffered, no flush: wait for 28
    first = model.push_codes(turn, [], flush=True)  # flush: one window of 13, advance 10
    assert turn.buffer == gen_tokens[7:10] and turn.windows == 1
    # 10 new tokens -> 20 mel frames; 20 - 8 delayed frames + the 8-frame zero prefix = 20 frames.
    assert [p.shape[0] for p in first] == [20 * 480]
    tail = model.push_codes(turn, [], end_of_turn=True)
    assert sum(p.shape[0] for p in tail) == (3 * 2 + 8) * 480


def test_turn_rule_waits_for_full_window(model: Token2Wav, voice: PromptCache, gen_tokens: list[int]) -> None:
    turn = model.start_turn(voice, rule="turn")
    assert model.push_codes(turn, gen_tokens[:24]) == []  # 27 buffered
    assert len(model.push_codes(turn, gen_tokens[24:25])) == 1  # 28 -> one window
    assert len(turn.buffer) == 3


def test_whole_utterance(model: Token2Wav, voice: PromptCache, token2wav_fixture_dir: Path) -> None:
    ns = np.load(token2wav_fixture_dir / "expected" / "nonstream.npz")
    noise = SourceNoise(torch.from_numpy(ns["sinegen_rand_ini"]), torch.from_numpy(ns["sinegen_noise"]))
    wav = model.synthesize(ns["gen_tokens"], voice, source_noise=noise)
    assert wav.shape == (48000,) and wav.dtype == np.float32
    np.testing.assert_allclose(wav, ns["wav"][0], atol=CHAIN_ATOL, rtol=0)
    with pytest.raises(ValueError, match="at least one"):
        model.synthesize([], voice)


def test_bad_input(model: Token2Wav, voice: PromptCache) -> None:
    turn = model.start_turn(voice)
    with pytest.raises(ValueError, match="outside"):
        model.push_codes(turn, [6561])
    with pytest.raises(ValueError, match="more than 3"):
        model.stream_window(turn, [1, 2, 3], last_chunk=False)
    with pytest.raises(ValueError, match="rule"):
        model.start_turn(voice, rule="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="speaker"):
        model.prepare_prompt([1, 2, 3, 4], np.zeros((8, 80), np.float32), np.zeros(10, np.float32))


def test_duplex_unit_audio() -> None:
    assert duplex_unit_audio([], last_unit=False) is None
    short = duplex_unit_audio([np.full(100, 0.5, np.float32), np.full(50, -0.5, np.float32)], last_unit=False)
    assert short is not None and short.shape == (24000,) and not short[:23850].any()
    np.testing.assert_allclose(short[-150:-50], 16383 / 32768)
    last = duplex_unit_audio([np.full(100, 0.5, np.float32)], last_unit=True)
    assert last is not None and last.shape == (100,)


def test_pcm16_roundtrip() -> None:
    wav = np.array([-2.0, -1.0, -0.5, 0.0, 0.25, 1.0, 3.0], dtype=np.float32)
    out = pcm16_roundtrip(wav)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out * 32768, [-32767, -32767, -16383, 0, 8191, 32767, 32767])


def test_long_turn_stays_bounded(model: Token2Wav, voice: PromptCache) -> None:
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 6561, 230).tolist()
    turn = model.start_turn(voice, rule="duplex")
    total = 0
    for start in range(0, len(codes), 25):
        for piece in model.push_codes(turn, codes[start : start + 25]):
            total += piece.size
        # Prompt (50 frames) + 100 frames of history, however long the turn gets.
        assert turn.flow_cache.estimator_kv.shape[4] <= 150
        assert turn.flow_cache.conformer_att.shape[3] <= 150
        assert turn.vocoder.mel.shape[2] <= 55  # type: ignore[union-attr]
    total += sum(p.size for p in model.push_codes(turn, [], end_of_turn=True))
    assert total == (3 + 230) * 2 * 480 + 3840


def test_small_windows_keep_the_timeline(model: Token2Wav, voice: PromptCache, gen_tokens: list[int]) -> None:
    # Windows of 4 tokens (1 new + 3 look-ahead) are legal; each adds exactly 2 mel frames.
    turn = model.start_turn(voice)
    total = 0
    for i in range(6):
        total += model.stream_window(turn, gen_tokens[i : i + 4], last_chunk=False).size
    total += model.stream_window(turn, gen_tokens[6:9], last_chunk=True).size
    assert total == (6 + 3) * 2 * 480 + 3840


def test_batched_turns_match_single_turns(
    model: Token2Wav, voice: PromptCache, gen_tokens: list[int], token2wav_fixture_dir: Path
) -> None:
    inputs = np.load(token2wav_fixture_dir / "inputs" / "inputs.npz")
    other_voice = model.prepare_prompt(
        inputs["prompt_tokens"][0, :20], inputs["prompt_mel"][:, :40], inputs["spk_embedding"] * -1
    )
    rng = np.random.default_rng(11)
    plans = [  # (voice, rule, codes per unit, flush on unit k)
        (voice, "duplex", rng.integers(0, 6561, 75).tolist(), False),
        (voice, "duplex", rng.integers(0, 6561, 75).tolist(), False),
        (voice, "duplex", gen_tokens + gen_tokens[:10], True),
        (other_voice, "turn", rng.integers(0, 6561, 75).tolist(), False),
    ]
    units = [[codes[k : k + 25] for k in range(0, len(codes), 25)] for _, _, codes, _ in plans]

    single = []
    for (v, rule, _, flush), turn_units in zip(plans, units, strict=True):
        turn = model.start_turn(v, rule=rule)  # type: ignore[arg-type]
        pieces: list[np.ndarray] = []
        for k, unit in enumerate(turn_units):
            pieces += model.push_codes(turn, unit, end_of_turn=k == len(turn_units) - 1, flush=flush)
        single.append(np.concatenate(pieces))

    turns = [model.start_turn(v, rule=rule) for v, rule, _, _ in plans]  # type: ignore[arg-type]
    batched: list[list[np.ndarray]] = [[] for _ in plans]
    for k in range(max(len(u) for u in units)):
        requests = [
            PushRequest(turn, u[k], end_of_turn=k == len(u) - 1, flush=plan[3])
            for turn, u, plan in zip(turns, units, plans, strict=True)
            if k < len(u)
        ]
        for request, pieces in zip(requests, model.push_codes_batch(requests), strict=True):
            batched[turns.index(request.state)] += pieces
    for got, want in zip(batched, single, strict=True):
        assert np.concatenate(got).shape == want.shape
        # Batched matmuls round differently (~1e-6 on the mel, see test_token2wav_flow); the vocoder's phase
        # integration grows that along the turn (docs/token2wav.md: up to ~1e-3 on the tiny weights).
        np.testing.assert_allclose(np.concatenate(got), want, atol=DRIFT_ATOL, rtol=0)
    with pytest.raises(ValueError, match="only once"):
        model.push_codes_batch([PushRequest(turns[0], []), PushRequest(turns[0], [])])


def test_turn_snapshot_replays_identically(
    model: Token2Wav, voice: PromptCache, gen_tokens: list[int]
) -> None:
    turn = model.start_turn(voice)
    model.push_codes(turn, gen_tokens[:30])
    snapshot = turn.clone()
    after = model.push_codes(turn, gen_tokens[30:], end_of_turn=True)
    replay = model.push_codes(snapshot, gen_tokens[30:], end_of_turn=True)
    assert len(after) == len(replay) and all(np.array_equal(a, b) for a, b in zip(after, replay, strict=True))


def test_fused_snakes_sound_the_same(
    model: Token2Wav, voice: PromptCache, gen_tokens: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The HiFT's Snake activations through one traced `snake` (what `fuse_snakes` compiles on a GPU): the
    same audio, every Snake swapped, traced once at fusing for all their channel counts and lengths."""
    from MiniCPMO45.token2wav.hift_layers import Snake, fuse_snakes, snake

    def turn_audio() -> np.ndarray:
        turn = model.start_turn(voice)
        pieces = model.push_codes(turn, gen_tokens, end_of_turn=False)
        return np.concatenate(pieces + model.push_codes(turn, [], end_of_turn=True))

    want = turn_audio()
    torch._dynamo.reset()
    graphs, calls = [], []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return lambda *args: calls.append(1) or gm.forward(*args)

    hift = model.streaming.model
    snakes = [m for m in hift.modules() if isinstance(m, Snake)]
    try:
        assert fuse_snakes(hift, backend) == len(snakes) > 0
        traced_at_fuse, calls_at_fuse = len(graphs), len(calls)
        np.testing.assert_allclose(turn_audio(), want, atol=1e-6, rtol=0)
        # every Snake of the turn ran through the traced function, and nothing was traced during the turn
        assert len(calls) - calls_at_fuse >= len(snakes)
        assert len(graphs) == traced_at_fuse <= 4, (traced_at_fuse, len(graphs))
    finally:
        for m in snakes:
            m.kernel = snake
