"""The model modes driven directly (no WebRTC): duplex and chat outputs on the embedded tiny model, the
sliding context window (RoPE re-rotation, and a 30-minute duplex session within the KV limit)."""

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
from inference.settings import WorkerSettings
from MiniCPMO45.engine.context_window import SlidingWindow, drop_span
from tests.worker_helpers import embedded

SETTINGS = embedded(max_sessions=4)


@pytest.fixture(scope="module")
def host():
    torch.set_num_threads(1)
    return get_host(SETTINGS)


def noise(rng: np.random.Generator, n: int) -> np.ndarray:
    return (0.05 * rng.standard_normal(n)).astype(np.float32)


def kinds(outputs: list) -> list[str]:
    return [type(o).__name__ for o in outputs]


def test_drop_span_rerotates_keys_like_a_fresh_prefill(host) -> None:
    engine = host.engine
    a, b, c = [5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]
    s1, s2 = engine.open_session(), engine.open_session()
    try:
        engine.feed_ids([s1], [a + b + c])
        engine.feed_ids([s2], [a + c])
        assert drop_span(engine, s1, len(a), len(a) + len(b)) == len(a) + len(c)
        # Layer-0 keys depend only on the token and its position: after the drop they must equal the keys
        # computed at the new positions (deeper layers saw `b`, so only layer 0 can be compared exactly).
        k1, k2 = engine.cache.layer_keys(0, s1.slot), engine.cache.layer_keys(0, s2.slot)
        torch.testing.assert_close(k1, k2, atol=1e-5, rtol=1e-4)
        # values of layer 0 carry no position and move unchanged
        torch.testing.assert_close(
            engine.cache.layer_values(0, s1.slot), engine.cache.layer_values(0, s2.slot)
        )
        # the next token lands at the shortened position
        engine.feed_ids([s1, s2], [[17], [17]])
        torch.testing.assert_close(
            engine.cache.layer_keys(0, s1.slot)[:, -1],
            engine.cache.layer_keys(0, s2.slot)[:, -1],
            atol=1e-5,
            rtol=1e-4,
        )
        with pytest.raises(ValueError):
            drop_span(engine, s1, 3, 100)
    finally:
        engine.close_session(s1)
        engine.close_session(s2)


def test_sliding_window_drops_whole_oldest_spans(host) -> None:
    engine = host.engine
    s = engine.open_session()
    try:
        engine.feed_ids([s], [list(range(5, 15))])  # a 10-position "system prompt"
        window = SlidingWindow(protected=10, max_tokens=40, keep_tokens=30)
        for _ in range(6):
            window.make_room(engine, s, 6)
            window.mark(engine.kv_length(s))
            engine.feed_ids([s], [[20, 21, 22, 23, 24, 25]])
            assert engine.kv_length(s) <= 40
        assert window.dropped_spans > 0 and window.dropped_tokens % 6 == 0
        assert window.starts[0] == 10  # the prompt is untouched, the first kept span follows it
        with pytest.raises(ValueError):
            window.make_room(engine, s, 35)
    finally:
        engine.close_session(s)


def test_duplex_forced_speech_then_interrupt(host) -> None:
    rng = np.random.default_rng(0)
    mode = create_mode("audio_duplex", SETTINGS)
    setup, opened = mode.open(SessionOptions("d1", extra={"force": "speak", "seed": 3}))
    try:
        assert setup.unit_samples == 16000 and setup.video_max_side is None
        assert kinds(opened) == ["StateOut"]
        outputs = []
        for i in range(5):
            outputs += mode.on_unit(ModeUnit(i, noise(rng, 16000), 0.0), None)
        # the first three units are forced listens (the model's rule), then it speaks
        states = [o.state for o in outputs if isinstance(o, p.StateOut)]
        assert states[0] == "speaking"
        speech = [o for o in outputs if isinstance(o, p.AudioOut)]
        assert speech and all(o.turn == 0 for o in speech) and sum(o.pcm.size for o in speech) >= 24000
        assert any(isinstance(o, p.TextOut) for o in outputs)
        timings = [o.model_dump(exclude_none=True) for o in outputs if isinstance(o, p.UnitMetrics)]
        assert len(timings) == 5 and {"prefill_ms", "decide_ms", "tts_ms", "vocoder_ms"} <= set(timings[-1])
        # an interrupt cuts the turn at once: flush of turn 0, back to listening; the next unit closes the turn
        cut = mode.on_control({"type": "interrupt"})
        assert isinstance(cut[0], p.FlushOut) and cut[0].turn == 1 and cut[1] == p.StateOut(state="listening")
        after = mode.on_unit(ModeUnit(5, noise(rng, 16000), 0.0), None)
        assert not any(isinstance(o, p.AudioOut) for o in after)
    finally:
        mode.close()


def test_duplex_backlog_catches_up_without_speech(host) -> None:
    rng = np.random.default_rng(1)
    mode = create_mode("audio_duplex", SETTINGS)
    mode.open(SessionOptions("d2", extra={"force": "speak", "max_backlog_units": 1}))
    try:
        for i in range(4):
            mode.on_unit(ModeUnit(i, noise(rng, 16000), 0.0), None)
        behind = mode.on_unit(ModeUnit(4, noise(rng, 16000), 0.0, queued_units=5), None)
        assert not any(isinstance(o, p.AudioOut) for o in behind)
        assert [o for o in behind if isinstance(o, p.UnitMetrics)][0].backlog_units == 5
    finally:
        mode.close()


def test_omni_duplex_takes_a_frame_per_unit(host) -> None:
    rng = np.random.default_rng(2)
    mode = create_mode("omni_duplex", SETTINGS)
    setup, _ = mode.open(SessionOptions("o1", extra={"force": "listen"}))
    try:
        assert setup.video_max_side is not None
        # frames come at the size the model's processor gives one unsliced view: it resizes nothing
        images = host.engine.images.config
        assert setup.video_fit == (images.scale_resolution, images.patch_size)
        frame = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
        kv = []
        for i, f in enumerate((None, None, frame)):
            out = mode.on_unit(ModeUnit(i, noise(rng, 16000), 0.0), f)
            kv.append([o for o in out if isinstance(o, p.UnitMetrics)][0].kv_tokens)
        # a unit with a frame adds the image block (the resampler's query rows + <image></image>)
        query_num = host.engine.model.config.query_num
        assert (kv[2] - kv[1]) - (kv[1] - kv[0]) == query_num + 2
    finally:
        mode.close()


def test_chat_text_turn_streams_text_and_speech(host) -> None:
    mode = create_mode("chat", SETTINGS)
    setup, _ = mode.open(SessionOptions("c1", extra={"force": "speak", "max_new_tokens": 10, "seed": 1}))
    try:
        assert setup.unit_samples == 5120
        outputs = mode.on_control({"type": "text", "text": "hello there"})
        assert outputs == [p.UserTurnOut(turn=0, text="hello there"), p.StateOut(state="thinking")]
        silence = np.zeros(5120, dtype=np.float32)
        for i in range(40):
            outputs += mode.on_unit(ModeUnit(i, silence, 0.0), None)
            if p.StateOut(state="listening") in outputs:
                break
        states = [o.state for o in outputs if isinstance(o, p.StateOut)]
        assert states == ["thinking", "speaking", "listening"]
        first_speech = kinds(outputs).index("AudioOut")
        assert "TextOut" in kinds(outputs)[:first_speech]  # text deltas lead the speech they are spoken in
        assert sum(o.pcm.size for o in outputs if isinstance(o, p.AudioOut)) >= 24000
        # a second turn starts while nothing plays; an interrupt mid-reply flushes it
        mode.on_control({"type": "text", "text": "again"})
        mode.on_unit(ModeUnit(50, silence, 0.0), None)
        cut = mode.on_control({"type": "interrupt"})
        assert cut == [p.FlushOut(turn=2), p.StateOut(state="listening")]
    finally:
        mode.close()


def test_chat_push_to_talk_and_mode_switch_time(host) -> None:
    rng = np.random.default_rng(4)
    mode = create_mode("chat", SETTINGS)
    mode.open(SessionOptions("c2", extra={"max_new_tokens": 4}))
    try:
        assert mode.on_control({"type": "end_turn"})[0].code == "empty_turn"
        for i in range(4):  # 1.3 s of noise: the VAD finds no speech, push-to-talk takes it all
            mode.on_unit(ModeUnit(i, noise(rng, 5120), 0.0), None)
        # the turn is what the model took: 4 units of 320 ms
        assert mode.on_control({"type": "end_turn"}) == [
            p.UserTurnOut(turn=0, seconds=1.28),
            p.StateOut(state="thinking"),
        ]
        # its prefill waits for the session's next tick, batched with that tick's other turns
        assert mode.reply is None and mode.pending is not None
        mode.on_unit(ModeUnit(4, np.zeros(5120, dtype=np.float32), 0.0), None)
        assert mode.reply is not None and mode.pending is None
    finally:
        mode.close()
    # a mode switch in the worker is close + open of mode objects over the loaded host: nothing is reloaded
    times = {}
    previous = create_mode("chat", SETTINGS)
    previous.open(SessionOptions("sw"))
    for name in ("audio_duplex", "omni_duplex", "chat"):
        started = time.perf_counter()
        previous.close()
        previous = create_mode(name, SETTINGS)
        previous.open(SessionOptions("sw"))
        times[name] = (time.perf_counter() - started) * 1000
    previous.close()
    print("mode switch (close + open) ms:", {k: round(v, 1) for k, v in times.items()})
    assert max(times.values()) < host.load_s * 1000


def test_thirty_minute_duplex_session_stays_within_the_context_limit(host) -> None:
    """1800 units (30 min) fed faster than real time; the window keeps the KV under its limit."""
    rng = np.random.default_rng(3)
    mode = create_mode("audio_duplex", SETTINGS)
    limit = 400
    mode.open(
        SessionOptions("long", extra={"force": "listen", "max_kv_tokens": limit, "keep_kv_tokens": 300})
    )
    try:
        engine = host.engine
        assert mode.call is not None and mode.call.window is not None
        window = mode.call.window
        protected = window.protected
        started = time.perf_counter()
        kv_max, dropped = 0, 0
        audio = noise(rng, 16000 * 10)
        for i in range(1800):
            pcm = audio[(i % 10) * 16000 : (i % 10 + 1) * 16000]
            out = mode.on_unit(ModeUnit(i, pcm, 0.0), None)
            values = [o for o in out if isinstance(o, p.UnitMetrics)][0].model_dump()
            kv_max = max(kv_max, int(values["kv_tokens"]))
            dropped += int(values["dropped_tokens"])
        elapsed = time.perf_counter() - started
        print(f"1800 units in {elapsed:.1f} s, kv max {kv_max}, dropped {dropped}")
        assert kv_max <= limit
        assert dropped > 1800 * 13 - limit  # nearly everything but the window was dropped along the way
        # the system prompt is still the start of the context
        assert window.protected == protected and window.starts[0] == protected
        assert engine.kv_length(mode.call.session) <= limit
    finally:
        mode.close()


def test_preload_builds_the_host_and_the_duplex_batcher(host, caplog: pytest.LogCaptureFixture) -> None:
    """What a GPU worker runs on its mode thread right after hello (here on the CPU host): afterwards the
    first duplex session finds the batcher ready. A failure is logged, not raised."""
    from inference.worker import preload_engine

    preload_engine(SETTINGS)
    assert get_host(SETTINGS) is host and host._batcher is not None
    batcher = host._batcher
    preload_engine(SETTINGS)
    assert host._batcher is batcher  # built once

    def out_of_memory() -> None:
        raise RuntimeError("no GPU memory")

    real = host.duplex_batcher
    host.duplex_batcher = out_of_memory  # type: ignore[method-assign]
    try:
        with caplog.at_level("ERROR", logger="inference.worker"):
            preload_engine(SETTINGS)
        assert "preloading the engine failed" in caplog.text
    finally:
        host.duplex_batcher = real  # type: ignore[method-assign]


def test_only_a_worker_with_a_real_gpu_preloads() -> None:
    from inference.worker import wants_preload

    assert not wants_preload(WorkerSettings(), "cpu")
    assert (
        wants_preload(WorkerSettings(), "cuda:0") == Path("/dev/nvidiactl").exists()
    )  # a GPU id without the driver
    assert wants_preload(WorkerSettings(preload_engine=True), "cpu") and not wants_preload(
        WorkerSettings(preload_engine=False), "cuda:0"
    )


@pytest.mark.parametrize("mode_name", ["audio_duplex", "omni_duplex", "chat"])
def test_a_failed_open_gives_its_slots_back(host, mode_name: str) -> None:
    """A mode whose open fails after taking a KV slot (here: a context limit below the system prompt; on a
    GPU, out of memory) releases it: many failed opens later a session still opens (the slot leak seen on
    the H100, where the worker said `all 16 KV slots are in use` while admission had room)."""
    free_kv = len(host.engine.cache._free)  # a session's TTS slot is its KV slot (the static TTS cache)
    for attempt in range(2 * host.max_sessions + 1):
        mode = create_mode(mode_name, SETTINGS)
        with pytest.raises(ValueError):
            mode.open(SessionOptions(f"bad{attempt}", extra={"max_kv_tokens": 10}))
        assert len(host.engine.cache._free) == free_kv, "the failed open kept its KV slot"
        mode.close()  # the worker closes the mode again at the end of the session: harmless
    mode = create_mode(mode_name, SETTINGS)
    mode.open(SessionOptions("good"))
    mode.close()
    assert len(host.engine.cache._free) == free_kv


def test_chat_text_never_shows_control_tokens(host, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reply whose tokens include control tokens (`<tool_call>`, a timbre token, then `<|tts_eos|>`, which
    ends it): the caller's text deltas carry only the words. The sampler is scripted; the rest is the real
    reply path."""
    from MiniCPMO45.engine import generation

    tok = host.engine.tokenizer
    ids = tok.encode("Sure<tool_call> thing<|timbre_27|>!<|tts_eos|>")
    assert tok.token_to_id("<tool_call>") in ids and tok.token_to_id("<|timbre_27|>") in ids
    script = iter(ids)
    monkeypatch.setattr(
        generation, "choose_chat_tokens", lambda logits, rows, terms: [next(script) for _ in rows]
    )
    mode = create_mode("chat", SETTINGS)
    mode.open(SessionOptions("c-ctl"))
    try:
        outputs = mode.on_control({"type": "text", "text": "hi"})
        for i in range(10):
            outputs += mode.on_unit(ModeUnit(i, np.zeros(5120, dtype=np.float32), 0.0), None)
        text = "".join(o.text for o in outputs if isinstance(o, p.TextOut))
        assert text == "Sure thing!", text
    finally:
        mode.close()
