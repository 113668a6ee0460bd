"""One loaded model serves every mode; switching a session's mode reloads nothing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from MiniCPMO45.audio.load import load_audio
from MiniCPMO45.engine.chat import PromptInputs, prefill, reply
from MiniCPMO45.engine.core import Engine
from MiniCPMO45.engine.duplex import DuplexConfig, UnitInput, prepare
from MiniCPMO45.engine.half_duplex import prefill_system
from MiniCPMO45.engine.sampling import ChatSampling
from MiniCPMO45.engine.session import Mode
from MiniCPMO45.modules.kv_cache import CacheFullError
from tests.reference_engine import finalize_units, generate_units, prefill_units


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return Engine.from_pretrained(tiny_model_dir, dtype=torch.float32, max_sessions=2, max_len=256)


def _weights(engine: Engine) -> dict[str, int]:
    return {n: p.data_ptr() for n, p in engine.model.named_parameters()}


def test_switching_modes_reuses_the_loaded_model(engine: Engine, tiny_fixture_dir: Path) -> None:
    before = _weights(engine)
    audio = load_audio(tiny_fixture_dir / "inputs" / "duplex_audio.wav")
    s = engine.open_session(Mode.CHAT)
    try:
        logits = prefill(
            engine, [s], [PromptInputs(input_ids=engine.tokenizer.encode("<|im_start|>user\nHi"))]
        )
        list(reply(engine, [s], logits, ChatSampling(seed=1), 3))
        assert engine.kv_length(s) > 0

        t0 = time.perf_counter()
        engine.switch_mode(s, Mode.DUPLEX)
        switch_s = time.perf_counter() - t0
        assert engine.kv_length(s) == 0 and s.mode is Mode.DUPLEX
        prepare(engine, s, "Streaming Omni Conversation.", None, DuplexConfig(force_listen_count=1))
        for k in range(2):
            pre = prefill_units(engine, [s], [UnitInput(audio=audio[k * 16000 : (k + 1) * 16000])])
            generate_units(engine, [s], None, pre)
            finalize_units(engine, [s])

        prefill_system(engine, s, ["You are a helpful assistant."])
        assert s.mode is Mode.HALF_DUPLEX and s.duplex is None
        assert engine.kv_length(s) == 11
        # Nothing was reloaded or copied: every weight tensor is the same storage.
        assert _weights(engine) == before
        # A switch only resets session state (generous bound; speed targets live in the benchmarks).
        assert switch_s < 0.05
    finally:
        engine.close_session(s)


def test_slots_are_bounded_and_reused(engine: Engine) -> None:
    a, b = engine.open_session(), engine.open_session()
    with pytest.raises(CacheFullError):
        engine.open_session()
    engine.close_session(a)
    c = engine.open_session()
    assert c.slot == a.slot
    with pytest.raises(CacheFullError):
        engine.feed_ids([c], [[1] * 300])
    with pytest.raises(RuntimeError):
        engine.feed_ids([a], [[1]])
    engine.close_session(b)
    engine.close_session(c)
