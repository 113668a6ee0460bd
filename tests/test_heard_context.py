"""Heard-only context (inference/modes/heard.py) on the embedded tiny model: a chat reply's tokens in the KV slot
are cut to the heard fraction by the `truncate` control, an active reply is interrupted first, a later turn is
left alone, and the conversation goes on after a cut."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from inference import protocol as p
from inference.engine_host import get_host
from inference.modes import create_mode
from inference.modes.base import ModeUnit, SessionOptions
from MiniCPMO45.engine.chat import assistant_prefix
from tests.worker_helpers import embedded

SETTINGS = embedded(max_sessions=4)
SILENCE = np.zeros(5120, dtype=np.float32)


@pytest.fixture(scope="module")
def host():
    torch.set_num_threads(1)
    return get_host(SETTINGS)


def run_until_listening(mode, start: int = 0, units: int = 60) -> list:  # noqa: ANN001
    outputs: list = []
    for i in range(start, start + units):
        outputs += mode.on_unit(ModeUnit(i, SILENCE, 0.0), None)
        if p.StateOut(state="listening") in outputs:
            return outputs
    raise AssertionError("the reply did not end")


def test_truncate_cuts_a_finished_reply_to_the_heard_fraction(host) -> None:
    mode = create_mode("chat", SETTINGS)
    mode.open(SessionOptions("h1", extra={"force": "speak", "max_new_tokens": 12, "seed": 2}))
    try:
        engine = host.engine
        before = engine.kv_length(mode.session)
        mode.on_control({"type": "text", "text": "hello there"})
        # the turn is prefilled in the next tick with the assistant prefix; the reply follows them
        user = engine.tokenizer.encode("<|im_start|>user\nhello there")
        reply_start = before + len(user) + len(assistant_prefix(engine, use_tts_template=True))
        run_until_listening(mode)
        n = len(mode.session.history)
        assert n >= 8 and engine.kv_length(mode.session) == reply_start + n
        assert mode.on_control({"type": "truncate", "turn": 0, "heard": 0.5}) == []
        assert engine.kv_length(mode.session) == reply_start + round(n / 2)
        assert len(mode.session.history) == round(n / 2)
        # a second truncate of the same reply counts from its whole length and never grows it back
        mode.on_control({"type": "truncate", "turn": 0, "heard": 1.0})
        assert engine.kv_length(mode.session) == reply_start + round(n / 2)
        mode.on_control({"type": "truncate", "turn": 0, "heard": 0.25})
        assert engine.kv_length(mode.session) == reply_start + round(n / 4)
        # not the last reply, and malformed: nothing moves
        mode.on_control({"type": "truncate", "turn": 7, "heard": 0.0})
        assert engine.kv_length(mode.session) == reply_start + round(n / 4)
        bad = mode.on_control({"type": "truncate", "turn": 0, "heard": 2})
        assert len(bad) == 1 and isinstance(bad[0], p.ErrorOut)
        assert engine.kv_length(mode.session) == reply_start + round(n / 4)
        # the conversation goes on: the next turn closes the cut reply and gets its own reply
        mode.on_control({"type": "text", "text": "and now?"})
        outputs = run_until_listening(mode, start=100)
        assert engine.kv_length(mode.session) > reply_start + round(n / 4)
        assert any(isinstance(o, p.TextOut) for o in outputs)
    finally:
        mode.close()


def test_truncate_interrupts_an_active_reply_and_drops_what_was_not_heard(host) -> None:
    mode = create_mode("chat", SETTINGS)
    mode.open(SessionOptions("h2", extra={"force": "speak", "max_new_tokens": 60, "seed": 3}))
    try:
        engine = host.engine
        before = engine.kv_length(mode.session)
        mode.on_control({"type": "text", "text": "tell me more"})
        user = engine.tokenizer.encode("<|im_start|>user\ntell me more")
        reply_start = before + len(user) + len(assistant_prefix(engine, use_tts_template=True))
        for i in range(3):
            mode.on_unit(ModeUnit(i, SILENCE, 0.0), None)
        assert mode.reply is not None and len(mode.session.history) > 0
        out = mode.on_control({"type": "truncate", "turn": 0, "heard": 0.0})
        assert out == [p.FlushOut(turn=1), p.StateOut(state="listening")]
        assert mode.reply is None
        assert engine.kv_length(mode.session) == reply_start and mode.session.history == []
    finally:
        mode.close()


async def test_interrupt_over_a_call_keeps_only_the_heard_reply_in_the_context(start_test_server) -> None:
    """Our own API: an `interrupt` mid-reply flushes the track; the call tells the mode how much was played and
    the session's KV (the `metrics` events' kv_tokens) shrinks to the heard part."""
    from tests.rtc_client import RATE, Call

    server = await start_test_server(workers={"heartbeat_timeout_s": 30.0})
    call = Call(server.url, np.zeros(RATE * 60, np.float32))
    try:
        await call.start_json("chat", options={"force": "speak", "max_new_tokens": 200, "seed": 1})
        await call.wait_connected()
        await call.wait_event("session", timeout=120, mode="chat", phase="active")
        await call.channel_open.wait()
        call.send({"type": "text", "text": "Tell me a story."})
        await call.wait_event("state", timeout=90, state="speaking")
        while True:  # let a second or two of the reply play out and more be generated ahead of it
            await call.wait_event("metrics", timeout=30)
            texts = [e for e in call.events if e["type"] == "text"]
            if len(texts) >= 20:
                break
            await asyncio.sleep(0.2)
        mark = len(call.events)
        call.send({"type": "interrupt"})
        # the KV the reply had reached when the interrupt cut it: its units ticked until the flush (on a loaded
        # machine some run between sending the interrupt and the worker taking it)
        at_flush = None
        deadline = asyncio.get_running_loop().time() + 30
        while at_flush is None and asyncio.get_running_loop().time() < deadline:
            at_flush = next(
                (
                    mark + i
                    for i, e in enumerate(call.events[mark:])
                    if e == {"type": "state", "state": "listening"}
                ),
                None,
            )
            await asyncio.sleep(0.05)
        assert at_flush is not None, "the interrupt was not followed by listening"
        before = max(e["kv_tokens"] for e in call.events[:at_flush] if e["type"] == "metrics")
        deadline = asyncio.get_running_loop().time() + 30
        after = None
        while asyncio.get_running_loop().time() < deadline:
            later = [e for e in call.events[at_flush:] if e["type"] == "metrics"]
            if len(later) >= 3:
                after = later[-1]["kv_tokens"]
                break
            await asyncio.sleep(0.2)
        assert after is not None, "no metrics after the interrupt"
        assert after < before, (before, after)
    finally:
        await call.close()


def test_text_decoded_ahead_of_the_speech_counts_as_unheard(host) -> None:
    """Reply A decodes its next chunk ahead while reply B starts (`Reply.ahead`); A is interrupted and truncated
    to half of what was heard: the heard fraction maps to the tokens A's voice had taken, so the text decoded
    ahead and never spoken is dropped with the unheard half."""
    from inference.modes.chat import ChatMode

    a = create_mode("chat", SETTINGS)
    b = create_mode("chat", SETTINGS)
    a.open(SessionOptions("ahead-a", extra={"force": "speak", "max_new_tokens": 40, "seed": 4}))
    b.open(SessionOptions("ahead-b", extra={"force": "speak", "max_new_tokens": 40, "seed": 5}))
    assert isinstance(a, ChatMode) and isinstance(b, ChatMode)
    try:
        engine = host.engine
        before = engine.kv_length(a.session)
        a.on_control({"type": "text", "text": "tell me more"})
        reply_start = before + len(engine.tokenizer.encode("<|im_start|>user\ntell me more"))
        reply_start += len(assistant_prefix(engine, use_tts_template=True))
        ChatMode.on_units([(a, ModeUnit(0, SILENCE, 0.0), None), (b, ModeUnit(0, SILENCE, 0.0), None)])
        b.on_control({"type": "text", "text": "and you?"})
        ChatMode.on_units([(a, ModeUnit(1, SILENCE, 0.0), None), (b, ModeUnit(1, SILENCE, 0.0), None)])
        assert a.reply is not None and a.reply.ahead  # A decoded ahead in B's steps
        voiced, decoded = a.reply.voice.voiced_tokens, len(a.session.history)
        assert 0 < voiced < decoded
        a.on_control({"type": "truncate", "turn": 0, "heard": 0.5})
        assert a.reply is None
        assert engine.kv_length(a.session) == reply_start + round(voiced / 2)
        assert len(a.session.history) == round(voiced / 2)
    finally:
        a.close()
        b.close()
