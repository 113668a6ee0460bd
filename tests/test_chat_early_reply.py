"""Early chat replies (`inference.modes.early_reply`): a reply starts in the tick of the unit that leaves the caller
one unit of silence short of a turn's end, its outputs held; when the turn ends they go out at the start of the
next tick, and when the caller speaks on the reply is dropped with the session put back as it was. On the embedded
tiny model, with real espeak speech through the real Silero VAD, and through the real worker loop."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import torch

from inference import protocol as p
from inference.modes import create_mode
from inference.modes.base import ModeUnit, Output, SessionOptions
from inference.modes.chat import ChatMode
from tests.test_worker_batching import FakeServer, open_all
from tests.test_worker_batching import worker as worker  # noqa: F401 (the fixture)
from tests.worker_helpers import embedded

SETTINGS = embedded(max_sessions=4)
UNIT = 5120  # samples of a chat unit
REPLY_OUTPUTS = (p.AudioOut, p.TextOut)


@pytest.fixture(scope="module")
def words(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    from bench.turn_end import speak

    return speak("What will the weather be like tomorrow?", "en-us", 165, tmp_path_factory.mktemp("espeak"))


def _silence(samples: int) -> np.ndarray:
    return np.zeros(samples, dtype=np.float32)


def _units(pcm: np.ndarray) -> list[ModeUnit]:
    padded = np.concatenate([pcm, _silence(-pcm.size % UNIT)])
    return [ModeUnit(i, padded[i * UNIT : (i + 1) * UNIT], 0.0) for i in range(padded.size // UNIT)]


def _open(name: str, **options: Any) -> ChatMode:
    mode = create_mode("chat", SETTINGS)
    mode.open(SessionOptions(name, extra={"force": "speak", "max_new_tokens": 12, "seed": 5, **options}))
    assert isinstance(mode, ChatMode)
    return mode


def _metrics(out: list[Output]) -> p.UnitMetrics:
    [metrics] = [o for o in out if isinstance(o, p.UnitMetrics)]
    return metrics


def test_an_early_reply_is_held_until_the_turn_ends_then_goes_out_before_the_tick(words: np.ndarray) -> None:
    """One unit before the turn's end the reply starts and says nothing; the unit that ends the turn sends its
    turn, its text and its first speech through `emit` before the tick's own work, in the unit where the reply
    without the early start would only begin (same turn end, same turn length)."""
    units = _units(np.concatenate([_silence(3200), words, _silence(32000)]))
    early, plain = _open("early"), _open("plain", early_reply=False)
    try:
        ended_plain = None
        for unit in units:
            out = plain.on_unit(unit, None)
            if any(isinstance(o, p.UserTurnOut) and o.seconds for o in out):
                ended_plain = unit.index
                [turn_plain] = [o for o in out if isinstance(o, p.UserTurnOut) and o.seconds]
                assert any(isinstance(o, p.AudioOut) for o in out)  # its first speech at the end of this tick
                break
        assert ended_plain is not None

        started = None
        for unit in units[: ended_plain + 1]:
            sent: list[Output] = []
            unit.emit = sent.extend
            unit.completed_at = time.monotonic()
            out = early.on_unit(unit, None)
            if unit.index < ended_plain:
                assert not any(isinstance(o, REPLY_OUTPUTS) for o in out + sent), "nothing goes out early"
                assert not any(isinstance(o, p.UserTurnOut) and o.seconds for o in out + sent)
                if early.early is not None:
                    started = unit.index
        assert started == ended_plain - 1  # the reply began one unit before the turn's end
        assert early.early is None and early.reply is not None
        # the turn, its text and its first speech went out through `emit`, before the tick's return
        kinds = [type(o) for o in sent]
        assert kinds[:2] == [p.UserTurnOut, p.StateOut] and p.AudioOut in kinds and p.TextOut in kinds
        turn = sent[0]
        assert isinstance(turn, p.UserTurnOut) and turn.seconds == turn_plain.seconds
        assert not any(isinstance(o, p.UserTurnOut) for o in out)
        metrics = _metrics(out)
        assert metrics.early_reply == 1 and metrics.turn_to_speech_ms is not None
        assert early.reply.spoken_at == ended_plain  # its speech reaches the caller from the end unit on
    finally:
        early.close()
        plain.close()


def _state(mode: ChatMode) -> tuple[Any, ...]:
    assert mode.host is not None and mode.session is not None and mode.tts is not None
    s = mode.session
    st = s.half_duplex
    return (
        mode.host.engine.kv_length(s),
        list(mode.window.starts),
        list(s.history),
        (st.prefilled_any, st.new_user_msg, st.llm_generated, st.llm_generate_completed),
        s.generator.get_state(),
        mode.tts.generator.get_state(),
    )


def test_an_early_reply_is_dropped_when_the_caller_speaks_on(words: np.ndarray) -> None:
    """A pause that comes within a unit of the fixed silence starts a reply; the caller speaks on: the reply is
    dropped, none of it went out, and the session's KV length, span marks, history, turn bookkeeping and both
    generators are what a session without early replies has at that point. The turn that really ends is still
    answered early."""
    pcm = np.concatenate([_silence(3200), words, _silence(640 * 16), words, _silence(32000)])
    units = _units(pcm)
    early, plain = _open("drop", fast_silence_ms=0), _open("drop-plain", fast_silence_ms=0, early_reply=False)
    try:
        # a first exchange, so that the KV slot holds a reply to close and the generators have been drawn from
        for mode in (early, plain):
            mode.on_control({"type": "text", "text": "Hello there."})
            for unit in _units(_silence(UNIT * 60)):
                mode.on_unit(unit, None)
                if mode.reply is None:
                    break
            assert mode.reply is None  # answered and done
        dropped, answered = [], []
        for unit in units:
            out = early.on_unit(unit, None)
            plain_out = plain.on_unit(unit, None)
            metrics = _metrics(out)
            if metrics.early_dropped:
                dropped.append(unit.index)
                assert not any(isinstance(o, REPLY_OUTPUTS) for o in out)
                assert not any(isinstance(o, p.FlushOut) for o in out)  # nothing had gone out to flush
                for a, b in zip(_state(early), _state(plain), strict=True):
                    if isinstance(a, torch.Tensor):
                        assert torch.equal(a, b)
                    else:
                        assert a == b
            if metrics.early_reply:
                answered.append(unit.index)
            turns = [o.started for o in out if isinstance(o, p.UserTurnOut)]
            assert turns == [o.started for o in plain_out if isinstance(o, p.UserTurnOut)]
        assert len(dropped) == 1 and len(answered) == 1 and dropped[0] < answered[0]
    finally:
        early.close()
        plain.close()


def test_a_control_drops_an_early_reply(words: np.ndarray) -> None:
    """`interrupt` while a reply waits for its turn's end: the reply goes without a flush (none of it was
    sent), and the turn in progress is still heard and answered."""
    units = _units(np.concatenate([_silence(3200), words, _silence(32000)]))
    mode = _open("control")
    try:
        at = 0
        while mode.early is None and at < len(units):
            mode.on_unit(units[at], None)
            at += 1
        assert mode.early is not None and mode.reply is not None
        assert mode.on_control({"type": "interrupt"}) == []
        assert mode.early is None and mode.reply is None and mode.collecting
        out: list[Output] = []
        for unit in units[at:]:
            out += mode.on_unit(unit, None)
        assert any(isinstance(o, p.UserTurnOut) and o.seconds for o in out)
        assert any(isinstance(o, p.AudioOut) for o in out)
    finally:
        mode.close()


async def test_the_worker_sends_an_early_replys_speech_before_its_tick_ends(
    worker: FakeServer,  # noqa: F811
    words: np.ndarray,
) -> None:
    """Through the worker loop: the unit that ends the turn gets the held turn and speech sent from inside its
    tick, before the tick's own outputs and its `unit_done`: the turn end -> first speech is shorter than that
    tick's run."""
    await open_all(worker, {"caller": ("chat", {"force": "speak", "max_new_tokens": 24, "seed": 2})})
    units = _units(np.concatenate([_silence(3200), words, _silence(32000)]))
    for unit in units:
        await worker.send(
            p.Unit(
                session_id="caller",
                index=unit.index,
                samples=UNIT,
                completed_at=time.monotonic(),
                sent_at=0.0,
            ),
            p.pcm_to_bytes(unit.pcm),
        )
        await worker.wait_for("caller", p.UnitDone, unit.index + 1, timeout=60)
        done = worker.of("caller", p.UnitDone)[-1]
        if done.metrics.early_reply:
            break
    else:
        raise AssertionError("no turn was answered early")
    got = [m for m, _ in worker.got["caller"]]
    end = got.index(done)
    turn = next(i for i, m in enumerate(got) if isinstance(m, p.UserTurnOut) and m.seconds)
    first_audio = next(i for i, m in enumerate(got) if isinstance(m, p.AudioOut))
    previous_done = max(i for i, m in enumerate(got[:end]) if isinstance(m, p.UnitDone))
    assert previous_done < turn < first_audio < end  # sent while this unit's tick ran
    m = done.metrics
    assert m.turn_to_speech_ms is not None and m.tick_ms is not None
    # measured when sent: the unit's way into its tick and the turn logic, not the tick's GPU work after it (the
    # reply's next speech); sent with the tick's return it would be the whole of `before + tick_ms`
    before = m.handoff_ms + m.queue_ms + (m.tick_wait_ms or 0) + (m.prepare_ms or 0)
    assert m.turn_to_speech_ms < before + m.tick_ms / 2
