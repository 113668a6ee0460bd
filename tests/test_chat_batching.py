"""Chat replies batched across sessions: the decoding rows, the TTS streamers and the chat tick give what each
session gets alone, and a barge-in in a batched reply cuts only its own session."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from inference import protocol as p
from inference.engine_host import get_host
from inference.modes import create_mode
from inference.modes.base import ModeUnit, SessionOptions
from inference.modes.chat import ChatMode
from MiniCPMO45.engine import half_duplex as hd
from MiniCPMO45.engine.batcher import enable_static_steps
from MiniCPMO45.engine.core import Engine
from MiniCPMO45.engine.generation import (
    ReplyRow,
    decode_step,
    decode_steps,
    reference_chunk_budget,
    start_row,
)
from MiniCPMO45.engine.sampling import ChatSampling
from MiniCPMO45.engine.session import Mode, Session
from MiniCPMO45.modules.tts import MiniCPMTTS
from MiniCPMO45.modules.tts_streamer import TTSStreamer, next_pieces
from tests.reference_engine import generate_reply, prefill_user_text
from tests.worker_helpers import embedded

GREEDY = ChatSampling(do_sample=False, repetition_penalty=1.05, length_penalty=1.1)
SETTINGS = embedded(max_sessions=4)
TURNS = ("Tell me about the sea.", "What is two and two?", "Hi")


def _engine(model_dir: Path, static: bool) -> Engine:
    engine = Engine.from_pretrained(model_dir, dtype=torch.float32, max_sessions=3, max_len=256)
    if static:  # the worker's path: static steps, the chosen ids fed on the device (eager steps on the CPU)
        enable_static_steps(engine, use_graphs=False)
    return engine


@pytest.fixture(scope="module", params=["eager", "static"])
def engine(tiny_model_dir: Path, request: pytest.FixtureRequest) -> Engine:
    return _engine(tiny_model_dir, request.param == "static")


def _prompted(engine: Engine, text: str) -> Session:
    s = engine.open_session(Mode.HALF_DUPLEX)
    hd.prefill_system(engine, s, ["You are a helpful assistant."])
    prefill_user_text(engine, s, text)
    return s


def _alone(engine: Engine, text: str, max_new: int) -> list[int]:
    """The per-session reference: `generate_reply` for this session only."""
    s = _prompted(engine, text)
    try:
        ids = []
        for step in generate_reply(engine, [s], GREEDY, max_new):
            ids += [e.token for e in step if e.token is not None]
        return ids
    finally:
        engine.close_session(s)


def _row(engine: Engine, s: Session, max_new: int) -> ReplyRow:
    hd.start_reply_state(s)
    prefix = hd.assistant_prefix(engine, use_tts_template=True)
    _, logits = engine.feed_for_logits([s], [engine.model.embed_ids(prefix)])
    budget = reference_chunk_budget(max_new)
    return start_row(engine, s, logits[0], GREEDY, budget, hd.reply_bans(engine), report_unfed_last=False)


def test_rows_that_start_apart_decode_as_each_alone(engine: Engine) -> None:
    """Three replies, the second joining after 3 steps and the third after 7 (as turns end in different ticks),
    decode in shared batched steps and give each session's own greedy reply token for token."""
    want = [_alone(engine, text, 20) for text in TURNS]
    assert len({tuple(w) for w in want}) == 3  # three different replies, so a mix-up would show
    sessions = [_prompted(engine, text) for text in TURNS]
    try:
        got: dict[int, list[int]] = {0: [], 1: [], 2: []}
        rows: list[ReplyRow] = []
        joins = {0: 0, 3: 1, 7: 2}
        step = 0
        while step < 200 and (len(rows) < 3 or not all(r.done for r in rows)):
            if step in joins:
                rows.append(_row(engine, sessions[joins[step]], 20))
            for event in decode_step(engine, rows):
                if event.token is not None:
                    got[next(i for i, s in enumerate(sessions) if s is event.session)].append(event.token)
            step += 1
        assert [got[i] for i in range(3)] == want
    finally:
        for s in sessions:
            engine.close_session(s)


def test_sampled_rows_repeat_with_their_seed_whatever_the_batch(engine: Engine) -> None:
    params = ChatSampling(seed=5)

    def reply(texts: tuple[str, ...]) -> list[int]:
        sessions = [_prompted(engine, t) for t in texts]
        try:
            rows = []
            for s in sessions:
                hd.start_reply_state(s)
                prefix = engine.model.embed_ids(hd.assistant_prefix(engine, use_tts_template=True))
                _, logits = engine.feed_for_logits([s], [prefix])
                rows.append(start_row(engine, s, logits[0], params, 12, hd.reply_bans(engine)))
            ids = []
            while not all(r.done for r in rows):
                ids += [e.token for e in decode_step(engine, rows) if e.session is sessions[0] and e.token]
            return ids
        finally:
            for s in sessions:
                engine.close_session(s)

    alone = reply(TURNS[:1])
    assert reply(TURNS[:2]) == alone


def test_static_decode_steps_match_the_eager_path(tiny_model_dir: Path) -> None:
    """`decode_steps` on static steps (the worker's path) gives the eager path's tokens, hidden states and KV
    lengths, the rows picked before each step; a reply that draws a terminator mid-way is not fed it, and the
    other reply goes on."""

    def run(engine: Engine) -> tuple[list[tuple[int, int | None]], list[torch.Tensor], list[int], str | None]:
        sessions = [_prompted(engine, text) for text in TURNS[:2]]
        try:
            rows = [_row(engine, s, 12) for s in sessions]
            step = 0

            def pick() -> list[ReplyRow]:
                nonlocal step
                if step == 3:  # the second reply's 4th token: its end of message
                    rows[1].logits[engine.special.im_end] = 1e4
                step += 1
                return rows

            tokens, hidden = [], []
            for events in decode_steps(engine, pick, 50):
                for e in events:
                    tokens.append((sessions.index(e.session), e.token))
                    if e.hidden is not None:
                        hidden.append(e.hidden.clone())
            return tokens, hidden, engine.kv_lengths(sessions), rows[1].stop_reason
        finally:
            for s in sessions:
                engine.close_session(s)

    eager = run(_engine(tiny_model_dir, static=False))
    static = run(_engine(tiny_model_dir, static=True))
    second = [t for i, t in eager[0] if i == 1]
    assert eager[3] == "terminator" and len(second) == 4 and second[-1] is None  # 3 tokens, then the end
    assert static[0] == eager[0] and static[2] == eager[2] and static[3] == eager[3]
    assert len(static[1]) == len(eager[1]) > 10
    for a, b in zip(static[1], eager[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_streamers_drawn_together_give_each_ones_codes(tiny_model_dir: Path, tiny_fixture_dir: Path) -> None:
    """Two turn-based streamers whose text chunks start at different draws share batched TTS steps and get the
    codes each gets alone (each draws with its own session's generator)."""
    tts = MiniCPMTTS.from_checkpoint(tiny_model_dir)
    e = dict(np.load(tiny_fixture_dir / "expected" / "e_duplex.npz"))
    conds = [torch.from_numpy(e[f"tts{k}_condition"]) for k in range(3)]
    plans = {0: [conds[0], conds[1]], 1: [conds[2], conds[0]]}

    def speak(which: list[int]) -> dict[int, list[list[int]]]:
        cache = tts.new_cache(num_slots=2, capacity=512)
        sessions = {i: tts.new_session(cache, seed=11 + i) for i in which}
        streamers = {i: TTSStreamer(tts, sessions[i], max_new_per_text_chunk=40 + 7 * i) for i in which}
        out: dict[int, list[list[int]]] = {i: [] for i in which}
        at = dict.fromkeys(which, 0)
        while any(at[i] < len(plans[i]) or streamers[i].feeding for i in which):
            for i in which:
                if not streamers[i].feeding and at[i] < len(plans[i]):
                    last = at[i] == len(plans[i]) - 1
                    streamers[i].begin(plans[i][at[i]], text_finished=last)
                    at[i] += 1
            for i, piece in zip(which, next_pieces([streamers[i] for i in which]), strict=True):
                if piece is not None:
                    out[i].append(piece[0].tolist())
        for i in which:
            out[i].append(streamers[i].finish().tolist())
        return out

    together = speak([0, 1])
    assert together[0] == speak([0])[0]
    assert together[1] == speak([1])[1]
    assert together[0] != together[1] and len(together[0][0]) == 25


# ---- the chat tick ---------------------------------------------------------------------------------------------
def _open_chat(sid: str) -> ChatMode:
    mode = create_mode("chat", SETTINGS)
    mode.open(SessionOptions(sid, extra={"force": "speak", "max_new_tokens": 40, "seed": 3}))
    assert isinstance(mode, ChatMode)
    return mode


def test_a_barge_in_cuts_only_its_own_batched_reply() -> None:
    host = get_host(SETTINGS)
    free_kv = len(host.engine.cache._free)
    a, b = _open_chat("batch-a"), _open_chat("batch-b")
    silence = np.zeros(5120, dtype=np.float32)
    try:
        a.on_control({"type": "text", "text": "tell me a story"})
        b.on_control({"type": "text", "text": "tell me another one"})
        outs: dict[str, list] = {"a": [], "b": []}
        sizes = []
        for i in range(3):
            got = ChatMode.on_units(
                [(a, ModeUnit(i, silence, 0.0), None), (b, ModeUnit(i, silence, 0.0), None)]
            )
            outs["a"] += got[0]
            outs["b"] += got[1]
            sizes.append(got[0][-1].batch_sessions)
        assert sizes[0] == 2.0  # both replies advanced in the same tick
        assert any(isinstance(o, p.AudioOut) for o in outs["a"]) and any(
            isinstance(o, p.AudioOut) for o in outs["b"]
        )
        cut = a.on_control({"type": "interrupt"})
        assert isinstance(cut[0], p.FlushOut) and cut[1] == p.StateOut(state="listening")
        after_cut: list = []
        for i in range(3, 60):
            got = ChatMode.on_units(
                [(a, ModeUnit(i, silence, 0.0), None), (b, ModeUnit(i, silence, 0.0), None)]
            )
            after_cut += got[0]
            outs["b"] += got[1]
            if p.StateOut(state="listening") in got[1]:
                break
        assert not any(
            isinstance(o, (p.AudioOut, p.TextOut)) for o in after_cut
        )  # nothing more of the cut reply
        states_b = [o.state for o in outs["b"] if isinstance(o, p.StateOut)]
        assert states_b == ["speaking", "listening"]  # b's reply went on to its end
        assert a.reply is None and b.reply is None
    finally:
        a.close()
        b.close()
    assert len(host.engine.cache._free) == free_kv


def test_batched_choice_applies_each_rows_own_adjustments() -> None:
    """Greedy rows with different bans, windows and penalties: the batched choice takes the argmax of what the
    single-row adjustments (`ban`, `penalize_repeats`, `penalize_length`) make of each row."""
    from MiniCPMO45.engine.sampling import (
        TokenChoice,
        ban,
        choose_chat_tokens,
        penalize_length,
        penalize_repeats,
    )

    gen = torch.Generator().manual_seed(3)
    vocab, terms = 50, [47, 48, 49]
    rows = []
    for i in range(6):
        logits = torch.randn(vocab, generator=gen) * 3
        top = torch.topk(logits, 4).indices.tolist()
        params = ChatSampling(do_sample=False, repetition_penalty=[1.0, 3.0, 0.5][i % 3], length_penalty=2.0)
        # each row bans or penalizes some of its own top ids, so a mix-up between rows changes the answer
        rows.append((logits, TokenChoice(params, top[:2] if i % 2 else [top[0], 77], [top[i % 3]])))
    want = []
    for logits, choice in rows:
        ref = logits.clone()
        ban(ref, choice.banned)
        penalize_repeats(ref, [t for t in choice.history if t < vocab], choice.params.repetition_penalty)
        penalize_length(ref, terms, choice.params.length_penalty)
        want.append(int(ref.argmax()))
    got = choose_chat_tokens(torch.stack([lg for lg, _ in rows]), [c for _, c in rows], terms)
    assert got == want
    assert len(set(got)) > 1


# ---- turn options: auto_respond (Realtime create_response) and barge_in (interrupt_response) -----------------
def _units(pcm: np.ndarray, start: int) -> list[ModeUnit]:
    padded = np.concatenate([pcm, np.zeros(-pcm.size % 5120, dtype=np.float32)])
    return [ModeUnit(start + i, padded[i * 5120 : (i + 1) * 5120], 0.0) for i in range(padded.size // 5120)]


def _feed(mode: ChatMode, units: list[ModeUnit]) -> list:
    out: list = []
    for unit in units:
        out += mode.on_unit(unit, None)
    return out


@pytest.fixture(scope="module")
def spoken(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    from bench.turn_end import speak

    pcm = speak("What will the weather be like tomorrow?", "en-us", 165, tmp_path_factory.mktemp("espeak"))
    return np.concatenate([np.zeros(3200, dtype=np.float32), pcm, np.zeros(16000 * 2, dtype=np.float32)])


def test_a_held_turn_waits_for_respond(spoken: np.ndarray) -> None:
    mode = create_mode("chat", SETTINGS)
    mode.open(SessionOptions("held", extra={"auto_respond": False, "force": "speak", "max_new_tokens": 12}))
    try:
        assert isinstance(mode, ChatMode)
        assert mode.on_control({"type": "respond"})[0].code == "empty_turn"  # nothing is waiting
        out = _feed(mode, _units(spoken, 0))
        turns = [o for o in out if isinstance(o, p.UserTurnOut)]
        # the VAD heard the caller begin (user_turn started), then ended the turn...
        assert [t.started for t in turns] == [True, False] and turns[1].seconds > 1.0
        assert p.StateOut(state="thinking") not in out and mode.reply is None  # ...and nothing answers it yet
        assert not any(isinstance(o, (p.AudioOut, p.TextOut)) for o in out)
        responded = time.monotonic()
        assert mode.on_control({"type": "respond"}) == [p.StateOut(state="thinking")]
        out = _feed(mode, _units(np.zeros(5120 * 4, dtype=np.float32), 100))
        assert mode.reply is not None or p.StateOut(state="listening") in out
        assert any(isinstance(o, p.AudioOut) for o in out)
        # the reply's turn end -> first speech counts from the `respond`, not from the turn held before it
        [first] = [o.turn_to_speech_ms for o in out if isinstance(o, p.UnitMetrics) and o.turn_to_speech_ms]
        assert 0 < first <= (time.monotonic() - responded) * 1000
    finally:
        mode.close()


def _held_pair(name: str) -> tuple[ChatMode, ChatMode]:
    """Two chat sessions whose turns wait for `respond` (no replies run): one fed unit by unit, one merged."""
    modes = []
    for sid in (f"{name}-alone", f"{name}-merged"):
        mode = create_mode("chat", SETTINGS)
        mode.open(SessionOptions(sid, extra={"auto_respond": False, "max_new_tokens": 12}))
        assert isinstance(mode, ChatMode)
        modes.append(mode)
    return modes[0], modes[1]


def _merge(units: list[ModeUnit]) -> ModeUnit:
    """The units as the worker's runner takes a backlog: one unit of parts."""
    return ModeUnit(
        units[-1].index,
        np.concatenate([u.pcm for u in units]),
        units[-1].completed_at,
        parts=[(u.pcm.size, u.completed_at) for u in units],
    )


def test_units_taken_as_one_hear_the_turn_that_each_alone_hears(spoken: np.ndarray) -> None:
    """A backlog taken as one unit (`ModeUnit.parts`, a session catching up): the VAD runs part by part, the
    turn ends in the same part with the same audio and that part's completion time, and the parts after the end
    are listened to in the next tick, before its own unit."""
    units = _units(spoken, 0)
    for k, unit in enumerate(units):
        unit.completed_at = 100.0 + 0.32 * k
    alone, merged = _held_pair("one-turn")
    try:
        heard: list = []
        for unit in units:
            ChatMode.prepare_units([(alone, unit)])
            heard += [o for o in alone.on_unit(unit, None) if isinstance(o, p.UserTurnOut)]
        ended_in = [k for k, u in enumerate(units) if u.completed_at == alone.turn_end]
        assert [t.started for t in heard] == [True, False] and len(ended_in) == 1
        assert ended_in[0] < len(units) - 2  # the spoken audio ends with silence: parts follow the end

        one = _merge(units)
        ChatMode.prepare_units([(merged, one)])
        assert one.vad_probs is not None and [len(x) for x in one.vad_probs] == [10] * len(units)
        got = [o for o in merged.on_unit(one, None) if isinstance(o, p.UserTurnOut)]
        assert got == heard
        assert merged.turn_end == alone.turn_end
        assert alone.pending is not None and merged.pending is not None
        np.testing.assert_array_equal(merged.pending[0], alone.pending[0])
        assert [at for _, _, at in merged.carry] == [u.completed_at for u in units[ended_in[0] + 1 :]]
        merged.on_unit(ModeUnit(units[-1].index + 1, np.zeros(5120, dtype=np.float32), 200.0), None)
        assert merged.carry == [] and merged.recent_samples == 5120 * (len(units) - ended_in[0])
    finally:
        alone.close()
        merged.close()


def test_a_second_turn_in_the_carried_parts_is_heard_in_the_next_ticks(spoken: np.ndarray) -> None:
    """Two spoken turns in one merged unit (a session that fell behind by both): the first ends in this tick, the
    second, in the parts carried over, starts and ends in the next ones: the same turns, in the same order, with
    the same audio, as unit by unit."""
    units = _units(np.concatenate([spoken, spoken]), 0)
    alone, merged = _held_pair("two-turns")
    try:
        heard, turns_alone = [], []
        for unit in units:
            ChatMode.prepare_units([(alone, unit)])
            out = alone.on_unit(unit, None)
            heard += [o for o in out if isinstance(o, p.UserTurnOut)]
            if any(isinstance(o, p.UserTurnOut) and o.seconds for o in out):
                turns_alone.append(alone.pending[0].copy() if alone.pending else None)
        assert [t.started for t in heard] == [True, False, True, False]

        one = _merge(units)
        ChatMode.prepare_units([(merged, one)])
        got, turns_merged = [], []
        for k in range(4):  # the merged unit, then quiet units while the carried parts are heard
            unit = one if k == 0 else ModeUnit(one.index + k, np.zeros(5120, dtype=np.float32), 0.0)
            if k:
                ChatMode.prepare_units([(merged, unit)])
            out = merged.on_unit(unit, None)
            got += [o for o in out if isinstance(o, p.UserTurnOut)]
            if any(isinstance(o, p.UserTurnOut) and o.seconds for o in out):
                turns_merged.append(merged.pending[0].copy() if merged.pending else None)
        assert got == heard
        assert len(turns_merged) == len(turns_alone) == 2
        for a, b in zip(turns_alone, turns_merged, strict=True):
            assert a is not None and b is not None
            np.testing.assert_array_equal(a, b)
    finally:
        alone.close()
        merged.close()


def test_without_barge_in_the_callers_speech_does_not_cut_the_reply(spoken: np.ndarray) -> None:
    outcomes = {}
    for barge_in in (True, False):
        mode = create_mode("chat", SETTINGS)
        mode.open(
            SessionOptions(
                f"bi-{barge_in}", extra={"barge_in": barge_in, "force": "speak", "max_new_tokens": 60}
            )
        )
        try:
            assert isinstance(mode, ChatMode)
            mode.on_control({"type": "text", "text": "tell me a long story"})
            _feed(mode, _units(np.zeros(5120 * 2, dtype=np.float32), 0))
            playing = mode.reply
            assert playing is not None
            speech = spoken[: spoken.size - 16000 * 2]  # the words without the silence that ends the turn
            out = _feed(mode, _units(speech, 10))
            # (a reply to the caller's words may have started early, its outputs held: not the one playing)
            outcomes[barge_in] = (any(isinstance(o, p.FlushOut) for o in out), mode.reply is playing)
        finally:
            mode.close()
    assert outcomes[True] == (True, False)  # speech cut the reply at once
    assert outcomes[False] == (False, True)  # the reply went on while the caller spoke


def test_a_typed_turn_with_an_image_is_answered(tmp_path: Path) -> None:
    """`text` with a still image: the image goes through the processor and the vision tower into the turn (the
    KV grows by its query blocks), and the reply streams; a broken image is refused with `bad_image`."""
    import base64
    import io

    from PIL import Image

    host = get_host(SETTINGS)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(buf, "PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    grown = {}
    for name, extra in (("plain", {}), ("image", {"image": image})):
        mode = create_mode("chat", SETTINGS)
        mode.open(SessionOptions(f"img-{name}", extra={"force": "speak", "max_new_tokens": 8, "seed": 1}))
        try:
            assert isinstance(mode, ChatMode) and mode.session is not None
            before = host.engine.kv_length(mode.session)
            mode.on_control({"type": "text", "text": "what is this?", **extra})
            out = _feed(mode, _units(np.zeros(5120 * 6, dtype=np.float32), 0))
            assert any(isinstance(o, p.AudioOut) for o in out)
            grown[name] = host.engine.kv_length(mode.session) - before
            if name == "image":
                bad = mode.on_control({"type": "text", "text": "and this?", "image": "bm90IGFuIGltYWdl"})
                assert len(bad) == 1 and bad[0].code == "bad_image"
        finally:
            mode.close()
    assert grown["image"] - grown["plain"] >= host.engine.model.config.query_num


def test_a_reply_speaks_after_its_short_first_chunk() -> None:
    """The first TTS condition of a reply is `FIRST_TEXT_CHUNK` tokens: the tick that starts the reply decodes
    that many and speaks them, from its first sample; the next chunks are `TEXT_CHUNK` long."""
    from inference.speech import FIRST_TEXT_CHUNK, TEXT_CHUNK

    mode = create_mode("chat", SETTINGS)
    mode.open(SessionOptions("first-chunk", extra={"force": "speak", "max_new_tokens": 40, "seed": 1}))
    try:
        assert isinstance(mode, ChatMode) and mode.session is not None
        mode.on_control({"type": "text", "text": "hello"})
        out = mode.on_unit(ModeUnit(0, np.zeros(5120, dtype=np.float32), 0.0), None)
        first = next(o.pcm for o in out if isinstance(o, p.AudioOut))
        # no lead-in: the vocoder's 3840 leading zeros (160 ms) of a turn's first audio are not sent
        assert np.abs(first[: mode.host.vocoder.streaming.delay_samples]).max() > 0
        assert len(mode.session.history) == FIRST_TEXT_CHUNK < TEXT_CHUNK
        assert mode.reply is not None and mode.reply.voice.chunks == 1
    finally:
        mode.close()


def _reply_outputs(outs: list) -> tuple[str, np.ndarray]:
    text = "".join(o.text for o in outs if isinstance(o, p.TextOut))
    audio = [o.pcm for o in outs if isinstance(o, p.AudioOut)]
    return text, np.concatenate(audio) if audio else np.zeros(0, dtype=np.float32)


def test_a_reply_decodes_ahead_in_another_replys_steps() -> None:
    """While reply A's voice speaks a chunk, A decodes its next chunk in the steps that a newer reply B needs for
    its first speech (those steps run anyway), so A's next chunk starts without a decode of its own; B's tick
    runs only B's `FIRST_TEXT_CHUNK` steps. A's text and speech are what A gives alone."""
    from inference.speech import FIRST_TEXT_CHUNK

    silence = np.zeros(5120, dtype=np.float32)

    def run(with_b: bool) -> tuple[list, list[int]]:
        a = create_mode("chat", SETTINGS)
        a.open(SessionOptions("ahead-a", extra={"force": "speak", "max_new_tokens": 24, "seed": 5}))
        b = create_mode("chat", SETTINGS)
        b.open(SessionOptions("ahead-b", extra={"force": "speak", "max_new_tokens": 24, "seed": 6}))
        assert isinstance(a, ChatMode) and isinstance(b, ChatMode)
        outs_a: list = []
        decoded_ahead: list[int] = []
        try:
            a.on_control({"type": "text", "text": "tell me a story"})
            for i in range(80):
                if with_b and i == 1:
                    b.on_control({"type": "text", "text": "and you?"})
                got = ChatMode.on_units(
                    [(a, ModeUnit(i, silence, 0.0), None), (b, ModeUnit(i, silence, 0.0), None)]
                )
                outs_a += got[0]
                # B's first tick: A (speaking its first chunk) decoded ahead in B's steps
                if with_b and i == 1:
                    assert a.reply is not None and len(a.reply.ahead) == FIRST_TEXT_CHUNK
                    assert b.session is not None and len(b.session.history) == FIRST_TEXT_CHUNK
                    decoded_ahead.append(len(a.session.history))
                if a.reply is None and b.reply is None and i > 1:
                    break
            return outs_a, decoded_ahead
        finally:
            a.close()
            b.close()

    alone, _ = run(False)
    together, ahead = run(True)
    assert ahead == [2 * FIRST_TEXT_CHUNK]
    # a unit's metrics name the stages its tick ran: speech without a decode round happens
    stages = [set(m.model_dump(exclude_none=True)) for m in together if isinstance(m, p.UnitMetrics)]
    assert any("tts_ms" in s and "decide_ms" not in s for s in stages)
    text_alone, audio_alone = _reply_outputs(alone)
    text_together, audio_together = _reply_outputs(together)
    assert text_together == text_alone and text_alone
    assert audio_together.size == audio_alone.size > 0
    np.testing.assert_allclose(audio_together, audio_alone, atol=1e-4)


def test_a_new_replys_first_speech_does_not_wait_for_another_replys_chunk() -> None:
    """Reply A's voice has spoken its chunk and waits for 10 tokens when reply B starts: the tick runs only the
    5 steps of B's first chunk (B's caller is waiting; A's speech is ahead of its caller), A gets half its chunk
    then and the rest in the next tick, and both replies go on to speak."""
    from inference.speech import FIRST_TEXT_CHUNK, TEXT_CHUNK

    silence = np.zeros(5120, dtype=np.float32)
    a, b = _open_chat("first-a"), _open_chat("first-b")
    try:
        a.on_control({"type": "text", "text": "tell me a story"})
        i = 0
        while not (a.reply is not None and a.reply.needs_tokens and a.reply.voice.chunks == 1):
            ChatMode.on_units([(a, ModeUnit(i, silence, 0.0), None), (b, ModeUnit(i, silence, 0.0), None)])
            i += 1
            assert i < 40, "reply A never waited for its second chunk"
        b.on_control({"type": "text", "text": "and you?"})
        ChatMode.on_units([(a, ModeUnit(i, silence, 0.0), None), (b, ModeUnit(i, silence, 0.0), None)])
        assert b.reply is not None and b.reply.voice.chunks == 1 and not b.reply.ahead  # B: its 5 tokens only
        assert a.reply is not None and len(a.reply.voice.tokens) == FIRST_TEXT_CHUNK < TEXT_CHUNK
        ChatMode.on_units(
            [(a, ModeUnit(i + 1, silence, 0.0), None), (b, ModeUnit(i + 1, silence, 0.0), None)]
        )
        assert a.reply is not None and a.reply.voice.chunks == 2  # A's chunk completed in the next tick
    finally:
        a.close()
        b.close()


def test_replies_of_both_tick_phases_share_one_flow_batch() -> None:
    """Every chat reply speaks in the one chat tick, so their vocoder turns pack from the start of the store,
    whatever their sessions' tick phases: a round's windows are one padded flow batch (on a GPU, one graph),
    not one per phase's half. The vocoder here takes the padded path a GPU worker takes (eager on the CPU)."""
    from inference.engine_host import TOKEN2WAV_SUBDIR, detect_layout
    from MiniCPMO45.token2wav import Token2Wav

    host = get_host(SETTINGS)
    plain = host.vocoder
    padded = Token2Wav.from_layout(detect_layout(host.model_dir / TOKEN2WAV_SUBDIR), use_graphs=True)
    padded.reserve_turns(host.default_voice.prompt, 4, phases=2)
    assert padded.flow_graphs is not None and padded.flow_graphs.store.phase_rows == 2
    host.vocoder = padded
    modes: list[ChatMode] = []
    try:
        for phase in (0, 1):
            mode = create_mode("chat", SETTINGS)
            extra = {"force": "speak", "max_new_tokens": 40, "seed": 3}
            mode.open(SessionOptions(f"phase-{phase}", extra=extra, tick_phase=phase))
            assert isinstance(mode, ChatMode) and mode.session is not None
            assert mode.session.phase == phase
            mode.on_control({"type": "text", "text": f"question {phase}"})
            modes.append(mode)
        silence = np.zeros(5120, dtype=np.float32)
        before = padded.flow_batches
        got = ChatMode.on_units([(m, ModeUnit(0, silence, 0.0), None) for m in modes])
        assert all(any(isinstance(o, p.AudioOut) for o in out) for out in got)  # both spoke in this tick
        assert padded.flow_batches - before == 1
        rows = [m.reply.voice.turn.kv_slot.index for m in modes]  # type: ignore[union-attr]
        assert sorted(rows) == [0, 1]  # the first half's rows, the phase-1 session's too
    finally:
        for mode in modes:
            mode.close()
        host.vocoder = plain


def test_turns_of_both_tick_phases_prefill_in_one_gathered_step() -> None:
    """Two turns ending in one tick, on sessions of both tick phases (KV slots at both ends), prefill as one
    gathered static step over just their two rows, and start their replies from the logits that one step per
    phase gives (the path taken when no gathered step is ready)."""
    from MiniCPMO45.engine.static_decode import GATHERED, StaticLLM

    host = get_host(SETTINGS)
    engine = host.engine
    kept = engine.static
    silence = np.zeros(5120, dtype=np.float32)

    def tick(gather: bool) -> tuple[list[list[int]], torch.Tensor, StaticLLM]:
        static = StaticLLM(engine.model.llm, engine.cache, use_graphs=False)
        if gather:  # as the warm-up does (`CHAT_TURN_TOKENS`); without it no step gathers
            static.warm_up_gathered(2, (16, 32, 96))
        engine.static = static
        calls: list[tuple[list[int], torch.Tensor]] = []
        plain = engine.feed_for_logits

        def recording(sessions, pieces):  # type: ignore[no-untyped-def]
            hidden, logits = plain(sessions, pieces)
            if max(x.shape[0] for x in pieces) > 1:  # a prefill, not a decode step's fed token
                calls.append(([s.slot for s in sessions], logits))
            return hidden, logits

        engine.feed_for_logits = recording  # type: ignore[method-assign]
        modes: list[ChatMode] = []
        try:
            for phase in (0, 1):
                mode = create_mode("chat", SETTINGS)
                mode.open(SessionOptions(f"gather-{gather}-{phase}", extra={"seed": 3}, tick_phase=phase))
                assert isinstance(mode, ChatMode)
                mode.on_control({"type": "text", "text": f"question number {phase}"})
                modes.append(mode)
            calls.clear()  # the system prompts' prefills at open
            ChatMode.on_units([(m, ModeUnit(0, silence, 0.0), None) for m in modes])
            assert all(m.reply is not None for m in modes)
        finally:
            for mode in modes:
                mode.close()
            del engine.feed_for_logits
            engine.static = kept
        by_slot = {slot: row for slots, logits in calls for slot, row in zip(slots, logits, strict=True)}
        return [slots for slots, _ in calls], torch.stack([by_slot[s] for s in sorted(by_slot)]), static

    calls, gathered, static = tick(gather=True)
    assert calls == [[0, SETTINGS.max_sessions - 1]]  # both turns in one step
    assert any(first == GATHERED for first, _, _ in static.steps)
    calls, per_phase, static = tick(gather=False)
    assert sorted(calls) == [[0], [SETTINGS.max_sessions - 1]]
    assert {k[:2] for k in static.steps if k[2] > 2} == {
        (0, 1),
        (SETTINGS.max_sessions - 1, 1),
    }  # a window each
    torch.testing.assert_close(gathered, per_phase, atol=2e-5, rtol=1e-4)
