"""e_duplex parity of the server's tick itself: `DuplexSession.tick` (one `DuplexBatcher.run_units`) on the
eager backend (static steps run eagerly on the CPU), one call, prepare + 6 omni units (greedy, forced listen at step 4), each unit's tail
folded into the next tick's prefill. Ids exact, floats to 1e-4: the decision logits of every step, the first
decode logits, the TTS conditions, the KV lengths and the prefill schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from MiniCPMO45.engine import batcher as batcher_module
from MiniCPMO45.engine.batcher import DuplexBatcher
from MiniCPMO45.engine.core import Engine
from MiniCPMO45.engine.duplex import schema_codes
from MiniCPMO45.engine.duplex_session import DuplexSession
from tests.engine_fixtures import assert_close, duplex_fixture, fixture_duplex_config, load_npz


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return Engine.from_pretrained(tiny_model_dir, dtype=torch.float32, max_sessions=2, max_len=512)


def test_tick_matches_golden_duplex(
    engine: Engine, tiny_fixture_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    e = load_npz(tiny_fixture_dir, "e_duplex")
    fx = duplex_fixture(tiny_fixture_dir)
    manifest = fx.manifest

    batcher = DuplexBatcher(engine, use_graphs=False)
    assert not batcher.llm.use_graphs
    # the raw logits of every decision the tick makes (a spy on the batched decision, which is unchanged)
    seen: list[torch.Tensor] = []
    decide = batcher_module.decide_batch

    def spy(eng, states, raw_logits, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(raw_logits.detach().clone())
        return decide(eng, states, raw_logits, *args, **kwargs)

    monkeypatch.setattr(batcher_module, "decide_batch", spy)

    call = DuplexSession(batcher, unit_budget=172)
    s = call.session
    try:
        call.prepare(fx.prompt, fx.ref_audio, fixture_duplex_config(manifest))
        assert engine.kv_length(s) == int(e["kv_len_after_prepare"])
        first_logits = None
        outs = []
        prefill = batcher.prefill

        def keep_first(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            nonlocal first_logits
            res = prefill(*args, **kwargs)
            if first_logits is None:
                first_logits = s.duplex.pending_logits.clone()
            return res

        batcher.prefill = keep_first  # type: ignore[method-assign]
        for unit, rec in zip(fx.units, fx.steps, strict=True):
            [done] = DuplexSession.tick([call], [unit], [rec["force_listen_override"]])
            assert done.dropped_tokens == 0 and done.kv_tokens == call.context_length()
            outs.append((done.output, call.context_length()))

        assert first_logits is not None
        assert_close(first_logits, e["decode_first_logits_full"], what="first decode logits")
        top = torch.cat(seen).topk(5, dim=-1)
        assert top.indices.tolist() == e["decode_input_top5_ids"].tolist()
        assert_close(top.values, e["decode_input_top5_logits"], what="raw logits at every decision")
        decoded = [t for out, _ in outs for t in out.result.decoded_ids]
        assert decoded == e["decode_out_ids"].tolist()
        assert s.duplex.total_ids == e["total_ids"].tolist()
        assert schema_codes(s.duplex.schema) == e["prefill_schema_flat"].tolist()
        speaking = 0
        for (out, kv), rec in zip(outs, manifest["duplex_steps"], strict=True):
            res = out.result
            assert res.is_listen == rec["is_listen"]
            assert res.text == rec["text"]
            assert res.end_of_turn == rec["end_of_turn"]
            assert len(res.tts_token_ids) == rec["n_tokens"]
            assert kv == rec["kv_len_after_finalize"]  # the pending tail counted
            assert res.kv_length == kv - 2  # terminator + </unit> not counted
            assert res.forced_listen == rec["force_listen_override"]
            if not res.is_listen:
                cond = batcher.conditions([res])[0]
                assert_close(cond, e[f"tts{speaking}_condition"], what=f"tts{speaking}_condition")
                assert out.speech is not None and out.speech.codes
                speaking += 1
            else:
                assert out.speech is None
        assert speaking > 0
        assert outs[4][0].result.closed_turn_by_force
        batcher.finalize([s])  # flush: the KV is complete
        assert engine.kv_length(s) == outs[-1][1]
    finally:
        call.close()
    assert s.closed
