"""Folded weight norms and the padded static flow path (`flow_graphs`) give the same audio as before.

On CPU `use_graphs=True` runs the exact code that CUDA captures, eagerly: batches padded to buckets with
static buffers, the estimator keys kept in the `EstimatorStore`. Both are compared with the plain batched path
(caches through `Token2Wav.flow_cache_of`, which gathers a turn's store keys in the official stored order).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from MiniCPMO45.token2wav import PromptCache, PushRequest, Token2Wav
from MiniCPMO45.token2wav.flow import FlowCache
from MiniCPMO45.token2wav.flow_graphs import BATCH_BUCKETS, ChunkShape, WindowRow, batch_bucket
from MiniCPMO45.token2wav.fold import has_parametrizations
from MiniCPMO45.token2wav.kv_store import EstimatorStore
from MiniCPMO45.token2wav.padded_graphs import PaddedGraphs
from MiniCPMO45.token2wav.streaming_vocoder import StreamingVocoder

from .token2wav_assets import build_asset_folder, load_tiny_token2wav

ATOL = 1e-5
# Two of our own paths with other batch shapes: their mels and caches are held to ATOL, but the waveform carries
# the phase drift that the vocoder's F0 integration grows from their ~1e-6 mel rounding along a stream
# (docs/token2wav.md: up to ~1e-3 on the tiny weights; 5.6e-4 seen with AVX-512 kernels, under 5e-4 with AVX2)
DRIFT_ATOL = 2e-3


def _load(fixture: Path, folder: Path, **kwargs: object) -> Token2Wav:
    return load_tiny_token2wav(fixture, folder, **kwargs)


@pytest.fixture(scope="module")
def folder(token2wav_fixture_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return build_asset_folder(token2wav_fixture_dir, tmp_path_factory.mktemp("t2w") / "token2wav")


def _voice(model: Token2Wav, fixture: Path) -> PromptCache:
    inputs = np.load(fixture / "inputs" / "inputs.npz")
    return model.prepare_prompt(inputs["prompt_tokens"][0], inputs["prompt_mel"], inputs["spk_embedding"])


def _codes(seed: int, n: int, vocab: int) -> list[int]:
    return [int(c) for c in np.random.default_rng(seed).integers(0, vocab, n)]


def _run_ticks(
    model: Token2Wav, fixture: Path, opening: int, single: bool = False, phase: int | None = None
) -> tuple[list[list[np.ndarray]], list[FlowCache]]:
    """The duplex batcher's pattern: 2-unit turns (open: 25 codes -> one 28-token window; end: 25 codes +
    end of turn -> a window and the final flush), `opening` turns per group, plus turns starting a tick later
    (so one call mixes cache shapes) and a short duplex flush window. Returns the audio and the caches of the
    turns still open after the second tick. `single`: each request through `push_codes` alone (the reference).
    `phase`: the turns are a tick phase's, in a store of 16 turns split in two phases' halves."""
    voice = _voice(model, fixture)
    vocab = model.flow.p.vocab_size
    if phase is not None:
        model.reserve_turns(voice, 16, phases=2)
    turns = [model.start_turn(voice, rule="duplex", phase=phase) for _ in range(2 * opening)]
    late = model.start_turn(voice, rule="duplex", phase=phase)
    short = model.start_turn(voice, rule="duplex", phase=phase)
    first, second = turns[:opening], turns[opening:]
    out: list[list[np.ndarray]] = []
    ticks = [
        [PushRequest(t, _codes(i, 25, vocab)) for i, t in enumerate(turns)],
        [PushRequest(t, _codes(100 + i, 25, vocab), end_of_turn=True) for i, t in enumerate(first)]
        + [PushRequest(late, _codes(200, 25, vocab)), PushRequest(short, _codes(201, 9, vocab), flush=True)],
        [PushRequest(t, _codes(300 + i, 25, vocab), end_of_turn=True) for i, t in enumerate(second)]
        + [
            PushRequest(late, _codes(400, 20, vocab), end_of_turn=True),
            PushRequest(short, [], end_of_turn=True),
        ],
    ]
    caches: list[FlowCache] = []
    for k, requests in enumerate(ticks):
        if single:
            out += [model.push_codes(r.state, r.codes, r.end_of_turn, r.flush) for r in requests]
        else:
            out += model.push_codes_batch(requests)
        if k == 1:
            caches = [model.flow_cache_of(t) for t in [*second, late, short]]
    return out, caches


def _assert_same(got: list[list[np.ndarray]], want: list[list[np.ndarray]], atol: float = ATOL) -> None:
    assert [[p.shape for p in r] for r in got] == [[p.shape for p in r] for r in want]
    assert sum(p.size for r in want for p in r) > 0
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g, w, strict=True):
            np.testing.assert_allclose(a, b, atol=atol, rtol=0)


def test_weight_norms_are_folded_and_audio_is_unchanged(folder: Path, token2wav_fixture_dir: Path) -> None:
    plain = _load(token2wav_fixture_dir, folder, fold_weights=False)
    folded = _load(token2wav_fixture_dir, folder)
    assert isinstance(plain.streaming, StreamingVocoder) and isinstance(folded.streaming, StreamingVocoder)
    for module in (plain.streaming.model, plain.original_hift):
        assert has_parametrizations(module)
    for module in (folded.streaming.model, folded.streaming.f0_model, folded.original_hift, folded.flow):
        assert not has_parametrizations(module)
    # The vocoder's private float64 F0 copy is always folded (after the cast, so in float64).
    assert folded.streaming.f0_model.classifier.weight.dtype == torch.float64
    reference = copy.deepcopy(plain.streaming.model.f0_predictor).double()  # never folded: safe to copy
    assert has_parametrizations(reference)
    mel = torch.randn(2, reference.condnet[0].in_channels, 40, dtype=torch.float64)
    for final in (True, False):
        torch.testing.assert_close(
            folded.streaming.f0_model(mel, final), reference(mel, final), atol=1e-12, rtol=0
        )
    _assert_same(
        _run_ticks(folded, token2wav_fixture_dir, 3)[0], _run_ticks(plain, token2wav_fixture_dir, 3)[0]
    )
    tokens = _codes(5, 40, plain.flow.p.vocab_size)
    voice_a, voice_b = _voice(plain, token2wav_fixture_dir), _voice(folded, token2wav_fixture_dir)
    torch.manual_seed(0)  # the original HiFT draws its source noise
    want = plain.synthesize(tokens, voice_a)
    torch.manual_seed(0)
    np.testing.assert_allclose(folded.synthesize(tokens, voice_b), want, atol=ATOL, rtol=0)


def test_static_flow_path_matches_plain_batches(folder: Path, token2wav_fixture_dir: Path) -> None:
    plain = _load(token2wav_fixture_dir, folder)
    static = _load(token2wav_fixture_dir, folder, use_graphs=True)
    assert plain.flow_graphs is None and static.flow_graphs is not None
    assert not static.flow_graphs.graphs  # CPU: the padded code runs eagerly
    # Every round is one padded batch (windows of other sizes and cache lengths included): the matmuls
    # round differently in the last bits (~2e-6 on mel and caches); the vocoder integrates F0 into a
    # phase, which grows that in the waveform (plain batches vs single turns differ as much), so the
    # audio is held to DRIFT_ATOL.
    got, got_caches = _run_ticks(static, token2wav_fixture_dir, 2)
    want, want_caches = _run_ticks(plain, token2wav_fixture_dir, 2, single=True)
    _assert_same(got, want, atol=DRIFT_ATOL)
    for a, b in zip(got_caches, want_caches, strict=True):
        for x, y in zip(vars(a).values(), vars(b).values(), strict=True):
            torch.testing.assert_close(x, y, atol=ATOL, rtol=0)


def test_padded_flow_batches_match_plain_batches(folder: Path, token2wav_fixture_dir: Path) -> None:
    plain = _load(token2wav_fixture_dir, folder)
    static = _load(token2wav_fixture_dir, folder, use_graphs=True)
    # Rounds of 3 to 6 windows, each padded to the 8 rows of every open turn: the padded matmuls may round the mel differently in the
    # last bit (~1e-6, like any change of batch size on CPU); flow state stays within 1e-5. The vocoder
    # integrates F0 into a phase, so such rounding grows to ~1e-4 in the waveform (see docs/token2wav.md):
    # the audio is held to DRIFT_ATOL.
    got, got_caches = _run_ticks(static, token2wav_fixture_dir, 3)
    want, want_caches = _run_ticks(plain, token2wav_fixture_dir, 3, single=True)
    assert static.flow_graphs is not None
    assert {shape.bucket for shape in static.flow_graphs.seen} == {8}
    for a, b in zip(got_caches, want_caches, strict=True):
        for x, y in zip(vars(a).values(), vars(b).values(), strict=True):
            torch.testing.assert_close(x, y, atol=ATOL, rtol=0)
    _assert_same(got, want, atol=DRIFT_ATOL)
    # the causal HiFT's decoder network ran on padded batches too
    assert isinstance(static.streaming, StreamingVocoder) and static.streaming._spectrum is not None
    batches = {key[1][0][0] for key in static.streaming._spectrum.seen}  # type: ignore[index]
    assert batches <= set(BATCH_BUCKETS) and max(batches) >= 4
    # ... the finals too: the ending turns (last windows of 25, 20 and 0 codes) share decoder batches of the one
    # final width that the warm-up captures, not one batch per exact length
    finals = {key[1][0][2] for key in static.streaming._spectrum.seen if key[0]}  # type: ignore[index]
    assert finals == {static.streaming.final_width}


def test_static_buffers_match_eager_padding(folder: Path, token2wav_fixture_dir: Path) -> None:
    """What CUDA captures (views of the shared static buffers, padding slots holding stale values, the round's
    rows at their store slots with live turns' rows idle in between) run eagerly on CPU equals the eager padded
    path (fresh zero padding); idle rows' keys are untouched, and the caches handed to turns never alias the
    buffers. Garbage in the padding slots proves every padded key is masked out."""
    from MiniCPMO45.token2wav.flow_graphs import split_rows

    model = _load(token2wav_fixture_dir, folder, use_graphs=True)
    graphs = model.flow_graphs
    assert graphs is not None
    voice = _voice(model, token2wav_fixture_dir)
    vocab = model.flow.p.vocab_size
    turns = [model.start_turn(voice, rule="duplex") for _ in range(3)]
    model.push_codes_batch([PushRequest(t, _codes(i, 25, vocab)) for i, t in enumerate(turns[:2])])
    model.push_codes_batch([PushRequest(turns[0], _codes(9, 25, vocab))])
    twins = [t.clone() for t in turns]  # slots 3, 4, 5: the same keys at the same positions
    assert [t.kv_slot.index for t in twins if t.kv_slot] == [3, 4, 5]

    def make_rows(
        ts: list,
    ) -> list[WindowRow]:  # three cache lengths, a full window, a short one, a last chunk
        return [
            WindowRow(
                _codes(50 + i, n, vocab),
                last,
                t.flow_cache,
                voice.spk_embedding,
                voice.prompt_frames + 100,
                t.kv_slot,
                voice.prompt_frames,
            )
            for i, (t, n, last) in enumerate(zip(ts, (28, 11, 5), (False, False, True), strict=True))
        ]

    lengths = [t.kv_slot.length for t in turns]
    rows = make_rows(turns)
    want = graphs.run(rows, 5)  # CPU: fresh zero-padded inputs, rows 0..2
    assert all(row.cache is None for row in rows)
    want_keys = [t.kv_slot.keys() for t in turns]
    rows = make_rows(twins)
    first, end = graphs.rows_of_batch(twins[0].kv_slot.index)
    shape = graphs.shape_of(rows, first, end, 5)
    rows_of = [t.kv_slot.index - first for t in twins]
    assert (first, shape.bucket, shape.token_slots) == (0, 8, 25)
    big = graphs._static_inputs(ChunkShape(8, 28, shape.cache_slots, 5))
    assert big is not None and big.rows == 8
    for tensor in vars(graphs.buffers[shape.cache_slots]).values():
        if tensor.dtype == torch.bool:
            tensor.copy_(torch.rand(tensor.shape) < 0.5)
        elif tensor.dtype == torch.long:
            tensor.copy_(torch.randint_like(tensor, 0, 7))
        else:
            tensor.copy_(torch.randn_like(tensor))
    inputs = graphs._static_inputs(shape)
    assert inputs is not None and inputs.rows == 8
    assert inputs.tokens.untyped_storage().data_ptr() == big.tokens.untyped_storage().data_ptr()  # shared
    low = len(model.flow.encoder.encoders)
    up_rate = model.flow.up_rate
    lookahead = model.flow.lookahead
    claimed = inputs.fill(rows, rows_of, lookahead, low, up_rate)
    store = graphs.store
    assert store.kv is not None
    outputs = inputs.forward(model.flow, 5, store.kv[:, :, : 2 * shape.bucket])
    for row, positions in zip(rows, claimed, strict=True):
        row.slot.commit(positions)
    got = split_rows(outputs, rows, rows_of, lookahead, low, up_rate)
    buffers = {t.untyped_storage().data_ptr() for t in vars(graphs.buffers[shape.cache_slots]).values()}
    for (mel_a, cache_a), (mel_b, cache_b) in zip(got, want, strict=True):
        torch.testing.assert_close(mel_a, mel_b, atol=ATOL, rtol=0)
        for x, y in zip(vars(cache_a).values(), vars(cache_b).values(), strict=True):
            torch.testing.assert_close(x, y, atol=ATOL, rtol=0)
            assert x.untyped_storage().data_ptr() not in buffers
    for twin, keys in zip(twins, want_keys, strict=True):
        torch.testing.assert_close(twin.kv_slot.keys(), keys, atol=ATOL, rtol=0)
    # the originals (idle rows 0..2 of the twins' batch) kept their keys; each gained its window's frames
    for turn, keys in zip(turns, want_keys, strict=True):
        assert torch.equal(turn.kv_slot.keys(), keys)
    for (mel, cache), turn, frames, before in zip(got, turns, (50, 16, 10), lengths, strict=True):
        assert mel.shape[2] == frames and cache.conformer_att.shape[1] == 1
        assert turn.kv_slot.length == min(before + frames, voice.prompt_frames + 100)
        joined = turn.flow_cache.conformer_att.shape[3] + frames  # then cut to prompt + 100 frames
        assert cache.conformer_att.shape[3] == min(joined, voice.prompt_frames + 100)


def test_store_keys_follow_the_official_cut_over_a_long_turn(
    folder: Path, token2wav_fixture_dir: Path
) -> None:
    """Seven windows of one turn (the cut starts at the third): after each, the store keys gathered in
    stored order equal the plain path's trimmed estimator cache (same frames, same order). The audio matches
    for the first windows; later the vocoder's phase integration grows the ~1e-6 rounding of the reordered
    attention sums past the drift tolerance (the keys and mels stay within 1e-5)."""
    plain = _load(token2wav_fixture_dir, folder)
    static = _load(token2wav_fixture_dir, folder, use_graphs=True)
    vocab = plain.flow.p.vocab_size
    turns = [m.start_turn(_voice(m, token2wav_fixture_dir), rule="duplex") for m in (plain, static)]
    for k in range(7):
        flush = k % 3 == 1  # a short duplex flush window now and then
        codes = _codes(700 + k, 12 if flush else 25, vocab)
        a = plain.push_codes(turns[0], codes, flush=flush)
        b = static.push_codes(turns[1], codes, flush=flush)
        if k < 4:
            _assert_same([b], [a], atol=DRIFT_ATOL)
        want, got = plain.flow_cache_of(turns[0]), static.flow_cache_of(turns[1])
        assert got.estimator_kv.shape == want.estimator_kv.shape
        for x, y in zip(vars(got).values(), vars(want).values(), strict=True):
            torch.testing.assert_close(x, y, atol=ATOL, rtol=0)
    slot = turns[1].kv_slot
    assert slot is not None and slot.length == turns[1].prompt.prompt_frames + 100


def test_batch_buckets() -> None:
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9, 33, 64)] == [1, 2, 4, 8, 8, 16, 64, 64]
    assert BATCH_BUCKETS == (1, 2, 4, 8, 16, 32, 64)
    with pytest.raises(ValueError):
        batch_bucket(65)


def test_static_path_rejects_bad_tokens(folder: Path, token2wav_fixture_dir: Path) -> None:
    model = _load(token2wav_fixture_dir, folder, use_graphs=True)
    turn = model.start_turn(_voice(model, token2wav_fixture_dir))
    with pytest.raises(ValueError, match="speech tokens"):
        model.stream_window(turn, [model.flow.p.vocab_size] * 28, last_chunk=False)


def test_padded_graphs_pads_and_returns_real_rows() -> None:
    calls: list[tuple[int, ...]] = []

    def fn(x: torch.Tensor, y: torch.Tensor, flag: bool) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(tuple(x.shape))
        return x * 2 + y, (x - y) if flag else x

    padded = PaddedGraphs(fn, graphs=True)  # CPU: eager
    x, y = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    a, b = padded((x, y), True)
    assert calls == [(4, 5, 7)] and a.shape == (3, 5, 7)
    torch.testing.assert_close(a, x * 2 + y, atol=0, rtol=0)
    torch.testing.assert_close(b, x - y, atol=0, rtol=0)
    padded((torch.randn(65, 2), torch.randn(65, 2)), False)  # over the largest bucket: unpadded
    assert calls[-1] == (65, 2)


def test_padded_graphs_pad_up_to_a_captured_bucket() -> None:
    """Once a bucket of 8 rows is captured (seen twice), batches of 1-7 rows of the same shapes replay it instead
    of capturing buckets of their own (in a live tick on a GPU), and larger batches replay it on parts of 8 rows;
    other shapes are unchanged."""
    calls: list[tuple[int, ...]] = []

    def fn(x: torch.Tensor, flag: bool) -> tuple[torch.Tensor]:
        calls.append(tuple(x.shape))
        return (x * 3,)

    padded = PaddedGraphs(fn, graphs=True)  # CPU: eager, padded as CUDA would pad
    padded((torch.randn(2, 5),), False)
    assert calls == [(2, 5)]
    for _ in range(2):
        padded((torch.randn(7, 5),), False)
    x = torch.randn(1, 5)
    (out,) = padded((x,), False)
    torch.testing.assert_close(out, x * 3, atol=0, rtol=0)
    padded((torch.randn(3, 5),), False)
    padded((torch.randn(3, 6),), False)  # other shapes: their own bucket
    padded((torch.randn(3, 5),), True)  # other flag: likewise
    x = torch.randn(19, 5)
    (out,) = padded((x,), False)  # more rows than the captured bucket: parts of 8, 8 and 3 (padded to 8)
    torch.testing.assert_close(out, x * 3, atol=0, rtol=0)
    assert calls[3:] == [(8, 5), (8, 5), (4, 6), (4, 5), (8, 5), (8, 5), (8, 5)]
    padded((torch.randn(9, 6),), False)  # no captured bucket of its shapes: its own bucket
    assert calls[-1] == (16, 6)


def test_tick_speech_warm_up_runs_a_full_ticks_vocoder_shapes_and_frees_its_turns(
    folder: Path, token2wav_fixture_dir: Path
) -> None:
    """The batcher's warm-up speaks random codes in as many vocoder turns as sessions: the padded flow sees the
    tick's largest batch, each steady shape at least `capture_after` times (on a GPU: captured then, not in a
    live tick), and every turn's store slot is free afterwards."""
    from MiniCPMO45.engine.tick_speech import TickSpeech

    model = _load(token2wav_fixture_dir, folder, use_graphs=True)
    flow = model.flow_graphs
    assert flow is not None and not flow.seen
    speech = TickSpeech(None, None, model, _voice(model, token2wav_fixture_dir))  # type: ignore[arg-type]
    speech.warm_up(5)
    assert max(shape.bucket for shape in flow.seen) == batch_bucket(5)
    assert max(flow.seen.values()) >= flow.capture_after
    assert flow.store.owners and not any(flow.store.owners), "a warm-up turn kept its store slot"


def test_a_second_phases_turns_batch_over_their_half_of_the_store(
    folder: Path, token2wav_fixture_dir: Path
) -> None:
    """A store of 16 turns in two tick phases' halves: the second phase's turns take rows 8.. (packed from 8) and
    run in buckets based at row 8 that never reach the first half, and sound as each turn alone."""
    plain = _load(token2wav_fixture_dir, folder)
    static = _load(token2wav_fixture_dir, folder, use_graphs=True)
    got, got_caches = _run_ticks(static, token2wav_fixture_dir, 2, phase=1)
    want, want_caches = _run_ticks(plain, token2wav_fixture_dir, 2, single=True)
    assert static.flow_graphs is not None
    shapes = static.flow_graphs.seen
    assert {shape.base for shape in shapes} == {8} and max(shape.bucket for shape in shapes) == 8
    _assert_same(got, want, atol=DRIFT_ATOL)
    for a, b in zip(got_caches, want_caches, strict=True):
        for x, y in zip(vars(a).values(), vars(b).values(), strict=True):
            torch.testing.assert_close(x, y, atol=ATOL, rtol=0)


def test_a_round_of_ending_turns_keeps_the_shape_of_its_phases_open_turns(
    folder: Path, token2wav_fixture_dir: Path
) -> None:
    """While 6 turns of a phase are open, a round in which only the turns at rows 1 and 3 run (their last
    windows) pads to the bucket of all 6, so it replays the main round's graph instead of capturing a shape of
    its own; without phases the rounds batch from row 0 over every open turn."""
    model = _load(token2wav_fixture_dir, folder, use_graphs=True)
    voice = _voice(model, token2wav_fixture_dir)
    model.reserve_turns(voice, 32, phases=2)
    flow = model.flow_graphs
    assert flow is not None
    vocab = model.flow.p.vocab_size
    for phase, base in ((0, 0), (1, 16)):
        turns = [model.start_turn(voice, rule="duplex", phase=phase) for _ in range(6)]
        assert [t.kv_slot.index for t in turns if t.kv_slot] == list(range(base, base + 6))
        flow.seen.clear()
        model.push_codes_batch([PushRequest(t, _codes(i, 25, vocab)) for i, t in enumerate(turns)])
        model.push_codes_batch([PushRequest(t, _codes(9, 25, vocab)) for t in (turns[1], turns[3])])
        assert {(shape.base, shape.bucket, shape.token_slots) for shape in flow.seen} == {(base, 8, 25)}
        assert max(flow.seen.values()) == 2  # one shape, seen twice: captured on a GPU
        for t in turns:
            model.push_codes(t, [], end_of_turn=True)
        assert not any(flow.store.owners[base : base + 16])


def test_tick_speech_warm_up_of_the_second_phase_uses_its_half_of_the_store(
    folder: Path, token2wav_fixture_dir: Path
) -> None:
    """The warm-up of the second tick phase speaks in that phase's half of the store (rows 8.. of 16), so the
    flow shapes its live ticks use (base 8, a bucket of 4) are the ones captured at start-up, the round in which
    the turns end included."""
    from MiniCPMO45.engine.tick_speech import TickSpeech

    model = _load(token2wav_fixture_dir, folder, use_graphs=True)
    voice = _voice(model, token2wav_fixture_dir)
    model.reserve_turns(voice, 16, phases=2)
    flow = model.flow_graphs
    assert flow is not None
    speech = TickSpeech(None, None, model, voice)  # type: ignore[arg-type]
    speech.warm_up(4, phase=1)
    assert {(shape.base, shape.bucket) for shape in flow.seen} == {(8, 4)}
    assert {shape.token_slots for shape in flow.seen} == {25, 4}
    assert min(flow.seen.values()) >= flow.capture_after
    assert not any(flow.store.owners)


def test_while_calls_join_their_rounds_replay_the_warmed_up_graph(
    folder: Path, token2wav_fixture_dir: Path
) -> None:
    """Once the warm-up has captured a phase's full round (8 turns of a 16-turn store), the rounds of the first two
    turns to join pad up to that bucket instead of capturing buckets of 1 and 2 of their own (on a GPU each capture
    stalls a live tick for 0.3-0.6 s), and each still sounds as that turn alone."""
    from MiniCPMO45.engine.tick_speech import TickSpeech

    plain = _load(token2wav_fixture_dir, folder)
    model = _load(token2wav_fixture_dir, folder, use_graphs=True)
    voice = _voice(model, token2wav_fixture_dir)
    model.reserve_turns(voice, 16, phases=2)
    flow = model.flow_graphs
    assert flow is not None
    TickSpeech(None, None, model, voice).warm_up(8, phase=1)  # type: ignore[arg-type]
    warmed = set(flow.captured)
    assert {(shape.base, shape.bucket) for shape in warmed} == {(8, 8)}
    vocab = model.flow.p.vocab_size
    got: list[list[np.ndarray]] = []
    want: list[list[np.ndarray]] = []
    for engine, out in ((model, got), (plain, want)):
        v = voice if engine is model else _voice(plain, token2wav_fixture_dir)
        first = engine.start_turn(v, rule="duplex", phase=1 if engine is model else None)
        rounds = [[first], [first], [first]]
        second = engine.start_turn(v, rule="duplex", phase=1 if engine is model else None)
        rounds[1].append(second)
        rounds[2].append(second)
        for k, turns in enumerate(rounds):
            requests = [
                PushRequest(t, _codes(10 * k + i, 25, vocab), end_of_turn=k == 2) for i, t in enumerate(turns)
            ]
            if engine is model:
                out += engine.push_codes_batch(requests)
            else:
                out += [engine.push_codes(r.state, r.codes, r.end_of_turn) for r in requests]
    assert set(flow.seen) == warmed, "a round while calls joined ran a shape that the warm-up did not capture"
    _assert_same(got, want, atol=DRIFT_ATOL)


def test_covering_shape_takes_the_smallest_captured_bucket_within_the_half() -> None:
    """A shape with no graph replays the smallest captured one with the same windows, caches and base and a larger
    bucket, never one that reaches past its half of the store."""
    from MiniCPMO45.token2wav.flow_graphs import FlowGraphs

    graphs = FlowGraphs.__new__(FlowGraphs)
    graphs.graphs = False
    small = ChunkShape(2, 25, 160, 5, base=16)
    graphs._eager_captured = {
        ChunkShape(8, 25, 160, 5, base=16),
        ChunkShape(16, 25, 160, 5, base=16),
        ChunkShape(32, 25, 160, 5, base=16),  # past row 32
        ChunkShape(8, 4, 160, 5, base=16),  # other windows
        ChunkShape(8, 25, 176, 5, base=16),  # other caches
        ChunkShape(8, 25, 160, 5, base=0),  # other half
    }
    assert graphs.covering_shape(small, end=32) == ChunkShape(8, 25, 160, 5, base=16)
    captured, uncovered = ChunkShape(16, 25, 160, 5, base=16), ChunkShape(4, 8, 160, 5, base=16)
    assert graphs.covering_shape(captured, end=32) == captured
    assert graphs.covering_shape(uncovered, end=32) == uncovered
    graphs._eager_captured = {ChunkShape(32, 25, 160, 5, base=16)}
    assert graphs.covering_shape(small, end=32) == small


def test_rows_of_batch() -> None:
    """The rows a flow batch may cover: a tick phase's half of the store, in groups of 64 rows."""
    from MiniCPMO45.token2wav.flow_graphs import FlowGraphs

    graphs = FlowGraphs.__new__(FlowGraphs)
    graphs.store = EstimatorStore(window_frames=8)
    base = torch.randn(1, 1, 2, 1, 5, 2)
    graphs.store.reserve(base, 5, 10, 59, phases=2)  # 30 rows a phase, 64 held
    assert graphs.store.phase_rows == 30 and graphs.store.rows == 64
    assert graphs.rows_of_batch(0) == (0, 30) and graphs.rows_of_batch(29) == (0, 30)
    assert graphs.rows_of_batch(30) == (30, 60) and graphs.rows_of_batch(63) == (60, 64)
    graphs.store = EstimatorStore(window_frames=8)
    graphs.store.reserve(base, 5, 10, 200, phases=2)  # 100 rows a phase: groups of 64 within each
    assert graphs.rows_of_batch(70) == (64, 100) and graphs.rows_of_batch(100) == (100, 164)
    assert graphs.rows_of_batch(170) == (164, 200)
    graphs.store = EstimatorStore(window_frames=8)
    graphs.store.reserve(base, 5, 10, 80)  # no phases: groups of 64
    assert graphs.rows_of_batch(63) == (0, 64) and graphs.rows_of_batch(64) == (64, 80)
