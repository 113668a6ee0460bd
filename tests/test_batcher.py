"""The batcher (static steps run eagerly on the CPU, batched encoders and decisions) against the per-session
reference path: a batch of three sessions with different prompt lengths, omni and audio-only units and a
forced listen gives every session the same tokens, KV lengths and TTS conditions as running it alone (the reference
path feeds each unit's tail with a separate finalize; a batcher tick folds it into the next prefill and runs no
finalize step), and the fixture session still matches the golden duplex outputs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from MiniCPMO45.audio.load import load_audio
from MiniCPMO45.engine import half_duplex as hd
from MiniCPMO45.engine.batcher import DuplexBatcher
from MiniCPMO45.engine.core import Engine
from MiniCPMO45.engine.duplex import (
    DuplexConfig,
    SchemaItem,
    UnitInput,
    context_length,
    pending_tail,
    prepare,
)
from MiniCPMO45.engine.graphs import pick_bucket
from MiniCPMO45.engine.session import Mode
from MiniCPMO45.engine.static_decode import GATHERED
from tests.engine_fixtures import fixture_duplex_config, load_manifest, load_npz
from tests.reference_engine import finalize_units, generate_units, prefill_units, tts_condition

UNITS = 6


def _plan(fixture_dir: Path):
    manifest = load_manifest(fixture_dir)
    cfg = fixture_duplex_config(manifest)
    inputs = fixture_dir / "inputs"
    audio = load_audio(inputs / "duplex_audio.wav")
    ref = load_audio(inputs / "ref_audio.wav")
    prompt = manifest["duplex_prepare_prompt"].split("\n")[1]
    frames = [Image.open(inputs / f"frame_{k}.png").convert("RGB") for k in range(UNITS)]
    sessions = [
        # the golden fixture session: omni units
        (
            prompt,
            ref,
            cfg,
            [UnitInput(audio[k * 16000 : (k + 1) * 16000], [frames[k]]) for k in range(UNITS)],
            [rec["force_listen_override"] for rec in manifest["duplex_steps"]],
        ),
        # audio-only, shorter prompt, no forced listens at the start
        (
            "Short.",
            None,
            cfg.model_copy(update={"force_listen_count": 0}),
            [UnitInput(audio[(k + 1) * 16000 : (k + 2) * 16000]) for k in range(UNITS)],
            [False] * UNITS,
        ),
        # audio-only with a frame in one unit, a forced listen in unit 3
        (
            "A much longer system prompt for the third session of this batch.",
            None,
            cfg.model_copy(update={"force_listen_count": 1}),
            [
                UnitInput(audio[k * 8000 : k * 8000 + 16000], [frames[0]] if k == 2 else [])
                for k in range(UNITS)
            ],
            [k == 3 for k in range(UNITS)],
        ),
    ]
    return sessions


@pytest.fixture(scope="module")
def engines(tiny_model_dir: Path) -> tuple[Engine, Engine]:
    a = Engine.from_pretrained(tiny_model_dir, dtype=torch.float32, max_sessions=8, max_len=512)
    b = Engine.from_pretrained(tiny_model_dir, dtype=torch.float32, max_sessions=8, max_len=512)
    return a, b


# the second tick phase's sessions sit on the highest slots: the static LLM, TTS and audio encoder steps then
# run a bucket of slots from the top (`row_window`), here slots 4..7. `ahead`: the units' frames go through the
# vision tower before their tick (`encode_frames`, as the worker does when a frame comes ahead of its unit), and
# the units carry only what it gave; `opened`: then the units are opened with them (`open_units`: the previous
# tail, `<unit>` and the image blocks into the KV before the tick), and the units carry their audio alone (the
# fixture session's first unit has too little audio for the encoder: its tick feeds nothing more)
@pytest.mark.parametrize(
    ("top", "ahead", "opened"),
    [(False, False, False), (True, False, False), (False, True, False), (True, True, True)],
    ids=["low-slots", "top-slots", "ahead", "opened"],
)
def test_batcher_matches_per_session_path(
    engines: tuple[Engine, Engine], tiny_fixture_dir: Path, top: bool, ahead: bool, opened: bool
) -> None:
    ref_engine, fast_engine = engines
    plan = _plan(tiny_fixture_dir)
    golden = load_npz(tiny_fixture_dir, "e_duplex")

    ref_results = []
    ref_sessions = []
    ref_after: list[list[int]] = []  # KV length after each unit's finalize
    for prompt, ref_audio, cfg, units, forces in plan:
        s = ref_engine.open_session(Mode.DUPLEX)
        prepare(ref_engine, s, prompt, ref_audio, cfg)
        rows, after = [], []
        for k in range(UNITS):
            pre = prefill_units(ref_engine, [s], [units[k]])
            rows.append(generate_units(ref_engine, [s], [forces[k]], pre)[0])
            finalize_units(ref_engine, [s])
            after.append(ref_engine.kv_length(s))
        ref_results.append(rows)
        ref_after.append(after)
        ref_sessions.append(s)

    batcher = DuplexBatcher(fast_engine, use_graphs=False)
    assert not batcher.llm.use_graphs
    feeds: list[dict[int, int]] = []  # every StaticLLM.feed of a tick: tokens per slot
    static_feed = batcher.llm.feed

    def counting_feed(slots, pieces, lengths=None, hidden=True):
        feeds.append({s: int(p.shape[0]) for s, p in zip(slots, pieces, strict=True)})
        return static_feed(slots, pieces, lengths, hidden)

    batcher.llm.feed = counting_feed  # type: ignore[method-assign]
    host_reads: list[int] = []  # device values read on the host during each tick's generate
    generate = batcher.generate

    def counting_generate(*args, **kwargs):
        with _count_host_reads() as reads:
            out = generate(*args, **kwargs)
        host_reads.append(reads[0])
        return out

    batcher.generate = counting_generate  # type: ignore[method-assign]
    sessions = []
    for prompt, ref_audio, cfg, _, _ in plan:
        s = fast_engine.open_session(Mode.DUPLEX, top_slot=top)
        prepare(fast_engine, s, prompt, ref_audio, cfg)
        sessions.append(s)
    lengths = [fast_engine.kv_length(s) for s in sessions]
    assert len(set(lengths)) == 3  # three different context lengths in one batch
    spoke = 0
    for k in range(UNITS):
        tails = [len(pending_tail(fast_engine, s)) for s in sessions]
        units_before = [len(s.duplex.schema) for s in sessions]
        ids_before = [len(s.duplex.total_ids) for s in sessions]
        units = [p[3][k] for p in plan]
        opened_feed: dict[int, int] = {}
        if ahead:
            framed = [i for i, u in enumerate(units) if u.frames]
            encoded = batcher.encode_frames([sessions[i] for i in framed], [units[i].frames for i in framed])
            for i, enc in zip(framed, encoded, strict=True):
                assert enc.views == [1] and enc.rows.shape[0] == 1  # an unsliced frame: one view
                units[i] = replace(units[i], frames=[], encoded=None if opened else enc)
            if opened and framed:
                feeds.clear()
                batcher.open_units([sessions[i] for i in framed], encoded)
                [opened_feed] = feeds  # one step for every session it opened
                assert set(opened_feed) == {sessions[i].slot for i in framed}
                assert all(sessions[i].duplex.open_unit is not None for i in framed)
        feeds.clear()
        outs = batcher.run_units(sessions, units, [p[4][k] for p in plan])
        assert all(s.duplex.open_unit is None for s in sessions)  # each opened unit was completed by its tick
        _check_tick_feeds(
            feeds, sessions, tails, units_before, ids_before, fast_engine.special.turn_eos, opened_feed
        )
        # the unit sizes the worker's warm-up captures steps for (`unit_positions`) bound what a tick feeds; a unit
        # opened ahead feeds no more in its tick than an audio unit
        audio_positions, omni_positions = batcher.unit_positions()
        omni_slot, audio_slot = sessions[0].slot, sessions[1].slot
        prefill = _prefill_feed(feeds)
        if omni_slot in prefill or omni_slot in opened_feed:
            fed = prefill.get(omni_slot, 0) + opened_feed.get(omni_slot, 0)
            assert omni_positions - 2 <= fed <= omni_positions
            assert not opened or prefill.get(omni_slot, 0) <= audio_positions
        if audio_slot in prefill:
            assert audio_positions - 2 <= prefill[audio_slot] <= audio_positions
        # one read of the KV lengths per unit, then at most one per decode step (the decision's tokens); the
        # last decision may end every unit without a step
        decode_steps = len(feeds) - 1
        assert 0 < host_reads[-1] <= decode_steps + 2, (host_reads[-1], decode_steps)
        for i, out in enumerate(outs):
            want, got = ref_results[i][k], out.result
            assert got.is_listen == want.is_listen, (i, k)
            assert got.decoded_ids == want.decoded_ids, (i, k)
            assert got.text == want.text and got.end_of_turn == want.end_of_turn
            assert got.tts_token_ids == want.tts_token_ids
            assert got.kv_length == want.kv_length
            assert context_length(fast_engine, sessions[i]) == ref_after[i][k]
            assert got.closed_turn_by_force == want.closed_turn_by_force
            if not want.is_listen:
                spoke += 1
                cond = batcher.conditions([got])[0]
                assert torch.allclose(cond, tts_condition(ref_engine, want), atol=1e-4, rtol=1e-4)
                assert out.speech is not None and 0 < len(out.speech.codes) <= 25
            else:
                assert out.speech is None
    assert spoke > 0
    if top:  # every step ran a bucket of the top slots only (slots 4..7, or fewer), or named its slots
        assert [s.slot for s in sessions] == [7, 6, 5]
        assert batcher.tts is not None
        for steps in (batcher.tts.steps, batcher.audio.steps, batcher.llm.steps):
            windows = [k for k in steps if steps is not batcher.llm.steps or k[0] not in (0, GATHERED)]
            assert all(k[0] + k[1] == 8 for k in windows)
        assert {k[:2] for k in batcher.llm.steps if k[0]} >= {(4, 4)}
    assert all(pending_tail(fast_engine, s) for s in sessions)
    feeds.clear()
    batcher.finalize(sessions)  # flush the last tails: one more step, outside the tick
    assert len(feeds) == 1 and set(feeds[0].values()) == {2}
    for s, r in zip(sessions, ref_sessions, strict=True):
        assert s.duplex.total_ids == r.duplex.total_ids
        assert fast_engine.kv_length(s) == ref_engine.kv_length(r)
        assert not pending_tail(fast_engine, s)
    assert sessions[0].duplex.total_ids == golden["total_ids"].tolist()
    for s, r in zip(sessions, ref_sessions, strict=True):  # the engines serve every case of this test
        fast_engine.close_session(s)
        ref_engine.close_session(r)


@contextmanager
def _count_host_reads() -> Iterator[list[int]]:
    """Count the ways a tensor's value reaches the host (`tolist`, `item`, `int()`, `float()`, `bool()`)."""
    count = [0]
    names = ("tolist", "item", "__int__", "__float__", "__bool__", "__index__")
    originals = {n: getattr(torch.Tensor, n) for n in names}

    def counted(fn):  # noqa: ANN001, ANN202
        def inner(self, *args, **kwargs):  # noqa: ANN001, ANN202
            count[0] += 1
            return fn(self, *args, **kwargs)

        return inner

    for n, fn in originals.items():
        setattr(torch.Tensor, n, counted(fn))
    try:
        yield count
    finally:
        for n, fn in originals.items():
            setattr(torch.Tensor, n, fn)


def _positions(schema: list[SchemaItem]) -> int:
    return sum(item[1] if isinstance(item, tuple) else 1 for item in schema)


def _prefill_feed(feeds: list[dict[int, int]]) -> dict[int, int]:
    """The tick's prefill step (its first; none when each unit was opened ahead and brought nothing more): the one
    that feeds more than a token a row (every row of a prefill takes at least `<unit>` and a piece, or audio)."""
    return feeds[0] if feeds and set(feeds[0].values()) != {1} else {}


def _check_tick_feeds(
    feeds: list[dict[int, int]],
    sessions: list,
    tails: list[int],
    units_before: list[int],
    ids_before: list[int],
    turn_eos: int,
    opened: dict[int, int] | None = None,
) -> None:
    """A tick is one prefill step (each unit led by its session's pending tail), then single-token steps
    only (decode, or `<|turn_eos|>` closing an interrupted turn): no separate finalize step. `opened`: the
    positions of each unit opened before the tick (`open_units`), which its prefill does not feed again."""
    opened = opened or {}
    prefill = _prefill_feed(feeds)
    steps = feeds[1:] if prefill else feeds
    for s, tail, n_units in zip(sessions, tails, units_before, strict=True):
        if len(s.duplex.schema) > n_units:  # prefilled this tick
            assert prefill.get(s.slot, 0) + opened.get(s.slot, 0) == tail + _positions(s.duplex.schema[-1])
        else:
            assert s.slot not in prefill and s.slot not in opened
    assert all(set(f.values()) == {1} for f in steps)
    # a session that ran listed: [<|turn_eos|> closing a turn], fed tokens, terminator, </unit>
    closers = [
        bool(new) and new[0] == turn_eos
        for new in (s.duplex.total_ids[b:] for s, b in zip(sessions, ids_before, strict=True))
    ]
    for s, before in zip(sessions, ids_before, strict=True):
        new = s.duplex.total_ids[before:]
        assert sum(s.slot in f for f in steps) == max(len(new) - 2, 0)
    decode = [
        max(len(s.duplex.total_ids) - b - 2, 0) - c
        for s, b, c in zip(sessions, ids_before, closers, strict=True)
    ]
    assert len(steps) == any(closers) + max(decode)


def test_the_warm_up_captures_the_grids_of_live_camera_frames(engines: tuple[Engine, Engine]) -> None:
    """The vision graphs the warm-up captures (`camera_grids`) are those of the frames a live omni unit slices
    (the prefill's own preprocessing at the duplex default `max_slice_nums`): a 640x480 camera meets no eager
    tower in a live tick."""
    engine = engines[1]
    batcher = DuplexBatcher(engine, use_graphs=False)
    grids = batcher.camera_grids()
    assert len(grids) == 2  # the 4:3 and the 16:9 cameras slice to different grids
    for size in ((640, 480), (1280, 720)):
        live = engine.images.preprocess(Image.new("RGB", size, "gray"), DuplexConfig().max_slice_nums, False)
        assert {(int(r), int(c)) for r, c in live.tgt_sizes} <= set(grids)


def test_a_typed_chat_turns_prefill_runs_on_a_warm_up_step(tiny_model_dir: Path) -> None:
    """The warm-up builds the static LLM steps a chat turn's prefill takes in each tick phase (the user's text
    and the assistant prefix, one step per phase), from a one-word typed turn to a spoken one: the first turns
    after start build no step in a live tick (on a GPU a graph capture, a few 100 ms for every call)."""
    engine = Engine.from_pretrained(tiny_model_dir, dtype=torch.float32, max_sessions=8, max_len=512)
    batcher = DuplexBatcher(engine, use_graphs=False)
    assert batcher.unit_positions() == (13, 19)  # its duplex units would warm the 16 and 32 buckets up anyway
    batcher.warm_up(8, prefill_tokens=(79, 13), phases=2)  # the real model's units: 80 and 16
    built = set(batcher.llm.steps)
    prefix = engine.model.embed_ids(hd.assistant_prefix(engine, use_tts_template=True))
    low = [engine.open_session(Mode.CHAT) for _ in range(2)]
    high = [engine.open_session(Mode.CHAT, top_slot=True) for _ in range(2)]
    lengths = []
    for text in ("Hi", "Tell me something about the weather today.", "Tides? " * 12, "Tides? " * 24):
        for group in (low, high):  # one step per phase, as `ChatMode.start_replies` runs them
            pieces = []
            for s in group:
                engine.reset_session(s)
                user = hd.user_turn_embeddings(engine, s, None, text, None)
                pieces.append(torch.cat([user, prefix.to(user.dtype)]))
            lengths.append(pieces[0].shape[0])
            engine.feed_for_logits(group, pieces)
    # one-word and one-sentence typed turns, a long one, one as long as ~7 s of speech
    assert [pick_bucket(batcher.llm.token_buckets, n) for n in lengths[::2]] == [16, 32, 64, 96]
    assert set(batcher.llm.steps) == built


def test_the_warm_up_builds_the_gathered_chat_steps(tiny_model_dir: Path) -> None:
    """64 sessions in two phases: besides each phase's 32-row windows, the warm-up builds the gathered steps a
    tick's chat turns take (up to `CHAT_TURN_ROWS` rows at the chat turn token buckets)."""
    from MiniCPMO45.engine.batcher import CHAT_TURN_ROWS, CHAT_TURN_TOKENS

    engine = Engine.from_pretrained(tiny_model_dir, dtype=torch.float32, max_sessions=64, max_len=160)
    batcher = DuplexBatcher(engine, use_graphs=False)
    batcher.warm_up(64, prefill_tokens=(79, 13), phases=2)
    steps = set(batcher.llm.steps)
    assert {(0, 32, 80), (32, 32, 80), (0, 32, 16), (32, 32, 16)} <= steps
    gathered = {(r, t) for first, r, t in steps if first == GATHERED}
    rows = [r for r in batcher.llm.row_buckets if r <= CHAT_TURN_ROWS]
    assert gathered == {(r, t) for r in rows for t in CHAT_TURN_TOKENS}


def test_the_warm_up_builds_the_steps_of_calls_that_just_joined(tiny_model_dir: Path) -> None:
    """Calls that join together open (each prompt's prefill: its last piece can take any token bucket) and then
    have their first units in the same ticks, which feed fewer positions than later ones (no previous tail; an
    omni call's first units may come before its camera's first frame). The warm-up builds the kernels of those
    steps at every row bucket: on a GPU a shape first met live is a compile, seconds of a tick while the calls
    join, and their units back up behind it."""
    engine = Engine.from_pretrained(tiny_model_dir, dtype=torch.float32, max_sessions=8, max_len=512)
    batcher = DuplexBatcher(engine, use_graphs=False)
    batcher.warm_up(8, phases=2)
    built = set(batcher.llm.built_shapes)
    cfg = DuplexConfig(force_listen_count=0)
    audio = load_audio(Path(__file__).parent / "fixtures/minicpmo45-tiny/inputs/duplex_audio.wav")
    prompts = ["Short.", "A prompt of a few more words than that.", "Talk like a pirate. " * 9]
    for joining in (1, 3):
        sessions = []
        for k in range(joining):
            s = engine.open_session(Mode.DUPLEX)
            prepare(engine, s, prompts[k], None, cfg)
            sessions.append(s)
        for k in range(2):  # the first and the second unit, no frame yet
            units = [UnitInput(audio[k * 16000 : (k + 1) * 16000])] * joining
            batcher.run_units(sessions, units, [True] * joining)
        live = {(rows, tokens) for first, rows, tokens in batcher.llm.steps if first != GATHERED}
        assert live <= built, (joining, live - built)
        for s in sessions:
            engine.close_session(s)


def test_an_opened_unit_decides_from_the_same_logits(
    engines: tuple[Engine, Engine], tiny_fixture_dir: Path
) -> None:
    """Two sessions with the same prompt, frames and audio in one batch, one with each unit opened ahead
    (`open_units`): after each prefill both wait with the same next-token logits, also for a unit that brings no
    audio (the first here), whose logits are the ones the open step left."""
    engine = engines[1]
    batcher = DuplexBatcher(engine, use_graphs=False)
    manifest = load_manifest(tiny_fixture_dir)
    cfg = fixture_duplex_config(manifest)
    inputs = tiny_fixture_dir / "inputs"
    audio = load_audio(inputs / "duplex_audio.wav")
    frames = [Image.open(inputs / f"frame_{k}.png").convert("RGB") for k in range(3)]
    opened, inline = sessions = [engine.open_session(Mode.DUPLEX) for _ in range(2)]
    try:
        for s in sessions:
            prepare(engine, s, "Same prompt.", None, cfg)
        for k in range(3):
            unit_audio = audio[k * 16000 : (k + 1) * 16000] if k else None  # a frame alone, then both
            [enc_opened, enc_inline] = batcher.encode_frames(sessions, [[frames[k]], [frames[k]]])
            batcher.open_units([opened], [enc_opened])
            with pytest.raises(RuntimeError, match="not complete"):  # one open unit at a time
                batcher.open_units([opened], [enc_opened])
            units = [UnitInput(unit_audio), UnitInput(unit_audio, encoded=enc_inline)]
            results = batcher.prefill(sessions, units)
            assert [r.prefilled for r in results] == [True, True]
            assert opened.duplex.open_unit is None
            assert opened.duplex.schema[-1] == inline.duplex.schema[-1]
            assert engine.kv_length(opened) == engine.kv_length(inline)
            a, b = opened.duplex.pending_logits, inline.duplex.pending_logits
            assert a is not None and b is not None
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (k, (a - b).abs().max())
            with_audio = any(
                item[0] == "audio" for item in inline.duplex.schema[-1] if isinstance(item, tuple)
            )
            assert with_audio == (k > 0)
            batcher.generate(sessions, results, force_listen=[True, True])
    finally:
        for s in sessions:
            engine.close_session(s)
