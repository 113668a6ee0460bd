"""e_duplex parity: the omni full-duplex unit loop (prepare + 6 units, greedy, forced listen at step 4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from MiniCPMO45.engine.core import Engine
from MiniCPMO45.engine.duplex import (
    DuplexConfig,
    UnitInput,
    finalize_units,
    generate_units,
    prefill_units,
    prepare,
    schema_codes,
    tts_condition,
)
from MiniCPMO45.engine.session import Mode
from MiniCPMO45.processor.audio_io import load_audio
from tests.engine_fixtures import assert_close, load_manifest, load_npz


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return Engine.from_pretrained(tiny_model_dir, dtype=torch.float32, max_sessions=2, max_len=512)


def _config(manifest: dict, **overrides) -> DuplexConfig:
    dc = manifest["duplex_config"]
    fields = dict(
        decode_mode="greedy",
        temperature=dc["temperature"],
        top_k=dc["top_k"],
        top_p=dc["top_p"],
        text_repetition_penalty=dc["text_repetition_penalty"],
        text_repetition_window=dc["text_repetition_window_size"],
        listen_prob_scale=dc["listen_prob_scale"],
        force_listen_count=dc["force_listen_count"],
        max_new_speak_tokens_per_chunk=dc["max_new_speak_tokens_per_chunk"],
        length_penalty=1.1,
    )
    fields.update(overrides)
    return DuplexConfig(**fields)


def _run(engine: Engine, fixture_dir: Path, config: DuplexConfig):
    manifest = load_manifest(fixture_dir)
    inputs = fixture_dir / "inputs"
    audio = load_audio(inputs / "duplex_audio.wav")
    ref = load_audio(inputs / "ref_audio.wav")
    prompt = manifest["duplex_prepare_prompt"].split("\n")[1]
    s = engine.open_session(Mode.DUPLEX)
    prepare(engine, s, prompt, ref, config)
    kv_after_prepare = engine.kv_length(s)
    first_logits = None
    steps = []
    for k, rec in enumerate(manifest["duplex_steps"]):
        frame = Image.open(inputs / f"frame_{k}.png").convert("RGB")
        unit = UnitInput(audio=audio[k * 16000 : (k + 1) * 16000], frames=[frame])
        pre = prefill_units(engine, [s], [unit])
        if first_logits is None:
            first_logits = s.duplex.pending_logits.clone()
        res = generate_units(engine, [s], [rec["force_listen_override"]], pre)[0]
        finalize_units(engine, [s])
        steps.append((res, engine.kv_length(s)))
    return s, kv_after_prepare, first_logits, steps


def test_duplex_loop_matches_reference(engine: Engine, tiny_fixture_dir: Path) -> None:
    e = load_npz(tiny_fixture_dir, "e_duplex")
    manifest = load_manifest(tiny_fixture_dir)
    s, kv0, first_logits, steps = _run(engine, tiny_fixture_dir, _config(manifest))
    try:
        assert kv0 == int(e["kv_len_after_prepare"])
        assert_close(first_logits, e["decode_first_logits_full"], what="first decode logits")
        decoded = [t for res, _ in steps for t in res.decoded_ids]
        assert decoded == e["decode_out_ids"].tolist()
        assert s.duplex.total_ids == e["total_ids"].tolist()
        assert schema_codes(s.duplex.schema) == e["prefill_schema_flat"].tolist()
        speaking = 0
        for (res, kv), rec in zip(steps, manifest["duplex_steps"], strict=True):
            assert res.is_listen == rec["is_listen"]
            assert res.text == rec["text"]
            assert res.end_of_turn == rec["end_of_turn"]
            assert len(res.tts_token_ids) == rec["n_tokens"]
            assert kv == rec["kv_len_after_finalize"]
            assert res.forced_listen == rec["force_listen_override"]
            if not res.is_listen:
                cond = tts_condition(engine, res)
                assert_close(cond, e[f"tts{speaking}_condition"], what=f"tts{speaking}_condition")
                speaking += 1
        assert steps[4][0].closed_turn_by_force
    finally:
        engine.close_session(s)
