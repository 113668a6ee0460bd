"""d_streaming parity: system prefill, three streamed 1-s audio chunks, greedy text reply."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from MiniCPMO45.engine.core import Engine
from MiniCPMO45.engine.half_duplex import AudioSegment, prefill_system
from MiniCPMO45.engine.sampling import ChatSampling
from MiniCPMO45.engine.session import Mode
from tests.engine_fixtures import assert_close, load_manifest, load_npz
from tests.reference_engine import generate_reply, prefill_user_audio, prefill_user_samples

GREEDY = ChatSampling(do_sample=False, repetition_penalty=1.0, length_penalty=1.0)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return Engine.from_pretrained(tiny_model_dir, dtype=torch.float32, max_sessions=2, max_len=256)


def test_streaming_prefill_and_reply(engine: Engine, tiny_fixture_dir: Path) -> None:
    d = load_npz(tiny_fixture_dir, "d_streaming")
    prompts = load_manifest(tiny_fixture_dir)["streaming_prompts"]
    s = engine.open_session(Mode.HALF_DUPLEX)
    try:
        system_text = prompts[0].removeprefix("<|im_start|>system\n").removesuffix("<|im_end|>\n")
        prefill_system(engine, s, [system_text])
        assert engine.kv_length(s) == d["prefill0_input_ids"].shape[1]
        for i in (1, 2, 3):
            before = engine.kv_length(s)
            mel = torch.from_numpy(d[f"prefill{i}_audio_features"])
            prefill_user_audio(engine, s, AudioSegment(mel), stream=True)
            assert engine.kv_length(s) - before == d[f"prefill{i}_input_ids"].shape[1]
        assert engine.kv_length(s) == int(d["kv_len_after_prefill"])
        keys0 = engine.cache.layer_keys(0, s.slot).double().sum().item()
        assert keys0 == pytest.approx(float(d["kv_layer0_key_sum"]), rel=1e-5, abs=1e-3)
        last_values = engine.cache.layer_values(len(engine.cache.keys) - 1, s.slot)[:, -1]
        assert_close(last_values, d["kv_last_layer_value_lastpos"], what="last value")

        ids, text = [], ""
        seen: list[torch.Tensor] = []
        observe = lambda _s, lg: seen.append(lg)  # noqa: E731
        for events in generate_reply(engine, [s], GREEDY, 16, spoken=False, observe_logits=observe):
            for ev in events:
                if ev.token is not None:
                    ids.append(ev.token)
                    assert ev.hidden is not None
                text += ev.text_delta
        assert ids == d["generated_ids"].tolist()
        # Every LLM call of the reply: the prefix prefill, then one per fed token (21 in all).
        top = torch.stack(seen).topk(5, dim=-1)
        assert top.indices.tolist() == d["llm_call_top5_ids"].tolist()
        assert_close(top.values, d["llm_call_top5_logits"], what="per-call top5 logits")
        assert text == load_manifest(tiny_fixture_dir)["streaming_text"]
        assert engine.kv_length(s) == int(d["kv_len_after_prefill"]) + 10 + len(ids)

        # The next user turn reopens with the reference prefix (the reply is never marked complete).
        before = engine.kv_length(s)
        prefill_user_audio(
            engine, s, AudioSegment(torch.from_numpy(d["prefill2_audio_features"])), stream=False
        )
        expected_new = len(engine.tokenizer.encode("<|tts_eos|><|im_end|>\n<|im_start|>user\n")) + 12
        assert engine.kv_length(s) - before == expected_new
    finally:
        engine.close_session(s)


def test_raw_audio_turns(engine: Engine, tiny_fixture_dir: Path) -> None:
    """Raw samples go through the session's streaming mel; a second turn reopens the user message."""
    from MiniCPMO45.audio.load import load_audio

    audio = load_audio(tiny_fixture_dir / "inputs" / "duplex_audio.wav")
    s = engine.open_session()
    try:
        prefill_system(engine, s, ["Speak like this:", audio[:8000], "Be brief."])
        text_ids = engine.tokenizer.encode(
            "<|im_start|>system\nSpeak like this:<|audio_start|><|audio_end|>Be brief.<|im_end|>\n"
        )
        assert engine.kv_length(s) == len(text_ids) + 5  # 0.5 s of reference audio -> 5 rows
        base = engine.kv_length(s)
        prefill_user_samples(engine, s, audio[:16000])
        # "<|im_start|>user\\n" + audio_start + 10 audio rows + audio_end
        assert engine.kv_length(s) - base == 3 + 12
        prefill_user_samples(engine, s, audio[16000:32000])
        assert engine.kv_length(s) - base == 15 + 12
        events = [ev for step in generate_reply(engine, [s], GREEDY, max_new_tokens=4) for ev in step]
        assert len([ev for ev in events if ev.token is not None]) <= 10
        before = engine.kv_length(s)
        prefill_user_samples(engine, s, audio[32000:64000], stream=False)
        prefix = len(engine.tokenizer.encode("<|tts_eos|><|im_end|>\n<|im_start|>user\n"))
        assert engine.kv_length(s) - before == prefix + 2 + 20
    finally:
        engine.close_session(s)
