"""`DuplexSession`: one call's engine state over the server's tick. A context-window slide through
`DuplexSession.tick` (pending tail fed by the batcher's finalize step, then whole units dropped) drops the same
units and decides the same tokens as the per-session reference that finalizes every unit; a call's speech turn
lives in its own state and ends with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from MiniCPMO45.audio.load import load_audio
from MiniCPMO45.engine.batcher import DuplexBatcher
from MiniCPMO45.engine.context_window import SlidingWindow
from MiniCPMO45.engine.core import Engine
from MiniCPMO45.engine.duplex import UnitInput, pending_tail, prepare
from MiniCPMO45.engine.duplex_session import DuplexSession
from MiniCPMO45.engine.session import Mode
from tests.engine_fixtures import fixture_duplex_config, load_manifest
from tests.reference_engine import finalize_units, generate_units, prefill_units

BUDGET = 30


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return Engine.from_pretrained(tiny_model_dir, dtype=torch.float32, max_sessions=2, max_len=512)


def test_window_slide_through_the_tick_matches_the_reference(engine: Engine, tiny_fixture_dir: Path) -> None:
    manifest = load_manifest(tiny_fixture_dir)
    cfg = fixture_duplex_config(manifest)
    audio = load_audio(tiny_fixture_dir / "inputs" / "duplex_audio.wav")
    units = [UnitInput(audio=audio[k * 16000 : (k + 1) * 16000]) for k in range(6)]

    # the reference: every unit finalized, the window slid on the complete KV
    s = engine.open_session(Mode.DUPLEX)
    try:
        prepare(engine, s, "Short.", None, cfg)
        protected = engine.kv_length(s)
        window = SlidingWindow(protected, protected + 100, protected + 80)
        ref_lengths = []
        for unit in units:
            window.make_room(engine, s, BUDGET)
            window.mark(engine.kv_length(s))
            generate_units(engine, [s], None, prefill_units(engine, [s], [unit]))
            finalize_units(engine, [s])
            ref_lengths.append(engine.kv_length(s))
        want = (list(s.duplex.total_ids), ref_lengths, window.dropped_spans, window.dropped_tokens)
        assert 0 < window.dropped_spans < len(units) - 1  # some units dropped, not all
    finally:
        engine.close_session(s)

    batcher = DuplexBatcher(engine, use_graphs=False)
    call = DuplexSession(batcher, unit_budget=BUDGET)
    try:
        call.prepare("Short.", None, cfg, max_kv_tokens=protected + 100, keep_kv_tokens=protected + 80)
        assert call.window is not None and call.window.protected == protected
        lengths, dropped = [], 0
        for unit in units:
            [done] = DuplexSession.tick([call], [unit])
            assert done.kv_tokens == call.context_length() <= call.window.max_tokens
            lengths.append(done.kv_tokens)
            dropped += done.dropped_tokens
        got = (list(call.state.total_ids), lengths, call.window.dropped_spans, call.window.dropped_tokens)
        assert got == want
        assert dropped == call.window.dropped_tokens > 0
    finally:
        call.close()
        call.close()  # idempotent
    assert call.closed and call.slot not in {s.slot for s in engine.sessions.values()}


def test_speech_turn_is_the_calls_own(engine: Engine, tiny_fixture_dir: Path) -> None:
    """A forced-speak unit opens the call's TTS turn in its state; `end_turn` forgets it; a re-prepare (new
    system prompt) starts with no turn and keeps the call's voice."""
    audio = load_audio(tiny_fixture_dir / "inputs" / "duplex_audio.wav")
    cfg = fixture_duplex_config(load_manifest(tiny_fixture_dir), force_listen_count=0)
    batcher = DuplexBatcher(engine, use_graphs=False)
    call = DuplexSession(batcher, unit_budget=BUDGET)
    try:
        call.prepare("Short.", None, cfg)
        [done] = DuplexSession.tick([call], [UnitInput(audio=audio[:16000])], force_speak=[True])
        assert not done.output.result.is_listen and done.output.speech is not None
        assert call.state.tts_open != done.output.result.end_of_turn  # a turn that did not end stays open
        call.end_turn()
        assert not call.state.tts_open and call.state.vocoder_turn is None
        call.state.tts_open = True
        call.prepare("Another prompt.", None, cfg)
        assert not call.state.tts_open and call.state.voice is call.voice
    finally:
        call.close()


def test_a_slide_feeds_the_pending_tail_first(engine: Engine, tiny_fixture_dir: Path) -> None:
    """The previous unit's tail ([terminator] </unit>) waits for the next prefill; a slide feeds it first, so
    the dropped units are whole and the KV holds every position the context counts."""
    audio = load_audio(tiny_fixture_dir / "inputs" / "duplex_audio.wav")
    cfg = fixture_duplex_config(load_manifest(tiny_fixture_dir))
    batcher = DuplexBatcher(engine, use_graphs=False)
    call = DuplexSession(batcher, unit_budget=BUDGET)
    try:
        call.prepare("Short.", None, cfg)
        assert call.window is not None
        for k in range(2):
            DuplexSession.tick([call], [UnitInput(audio=audio[k * 16000 : (k + 1) * 16000])])
        assert pending_tail(engine, call.session)  # the second unit's tail is not in the KV yet
        assert call.make_room(0) == 0  # room enough: nothing fed, nothing dropped
        assert pending_tail(engine, call.session)
        before = call.context_length()
        dropped = call.make_room(call.window.max_tokens - before + 1)
        assert dropped > 0 and not pending_tail(engine, call.session)
        assert engine.kv_length(call.session) == call.context_length() == before - dropped
    finally:
        call.close()


def test_units_opened_ahead_slide_the_window_as_their_ticks_would(
    engine: Engine, tiny_fixture_dir: Path
) -> None:
    """Omni units whose frames open them before their audio (`open_units`) make room and mark their start when
    they open: over a window that slides, the call keeps the same tokens, lengths and dropped units as a call
    whose units take their frames in their ticks, and every opened unit is completed by its tick."""
    inputs = tiny_fixture_dir / "inputs"
    audio = load_audio(inputs / "duplex_audio.wav")
    frames = [Image.open(inputs / f"frame_{k}.png").convert("RGB") for k in range(6)]
    cfg = fixture_duplex_config(load_manifest(tiny_fixture_dir)).model_copy(update={"decode_mode": "greedy"})
    batcher = DuplexBatcher(engine, use_graphs=False)
    budget = BUDGET + engine.model.config.query_num + 2
    runs = []
    for ahead in (False, True):
        call = DuplexSession(batcher, unit_budget=budget)
        try:
            call.prepare("Short.", None, cfg)
            protected = call.context_length()
            call.prepare("Short.", None, cfg, protected + 3 * budget, protected + 2 * budget)
            lengths, dropped = [], 0
            for k in range(6):
                [encoded] = DuplexSession.encode_frames([call], [[frames[k]]])
                if ahead:
                    assert call.can_open_unit()
                    DuplexSession.open_units([call], [encoded])
                    assert not call.can_open_unit()
                    unit = UnitInput(audio=audio[k * 16000 : (k + 1) * 16000])
                else:
                    unit = UnitInput(audio=audio[k * 16000 : (k + 1) * 16000], encoded=encoded)
                [done] = DuplexSession.tick([call], [unit], force_speak=[k == 3])
                assert call.state.open_unit is None
                assert done.kv_tokens == call.context_length() <= call.window.max_tokens  # type: ignore[union-attr]
                lengths.append(done.kv_tokens)
                dropped += done.dropped_tokens
            assert call.window is not None
            assert dropped == call.window.dropped_tokens
            runs.append((list(call.state.total_ids), lengths, call.window.dropped_spans, dropped))
        finally:
            call.close()
    assert runs[0][2] > 0  # the window slid
    assert runs[1] == runs[0]
