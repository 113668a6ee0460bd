"""e_duplex parity: the omni full-duplex unit loop (prepare + 6 units, greedy, forced listen at step 4), with
each unit's tail fed by a separate finalize (the reference's order) or folded into the next unit's prefill."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from MiniCPMO45.audio.load import load_audio
from MiniCPMO45.engine.context_window import SlidingWindow
from MiniCPMO45.engine.core import Engine
from MiniCPMO45.engine.duplex import (
    DuplexConfig,
    UnitInput,
    context_length,
    prepare,
    reaches_chars,
    schema_codes,
)
from MiniCPMO45.engine.session import Mode
from MiniCPMO45.tokenizer import MiniCPMOTokenizer
from tests.engine_fixtures import assert_close, fixture_duplex_config, load_manifest, load_npz
from tests.reference_engine import finalize_units, generate_units, make_room, prefill_units, tts_condition


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return Engine.from_pretrained(tiny_model_dir, dtype=torch.float32, max_sessions=2, max_len=512)


def _run(
    engine: Engine, fixture_dir: Path, config: DuplexConfig, fold: bool = False, piecewise: bool = False
):
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
    seen: list[torch.Tensor] = []
    for k, rec in enumerate(manifest["duplex_steps"]):
        frame = Image.open(inputs / f"frame_{k}.png").convert("RGB")
        unit = UnitInput(audio=audio[k * 16000 : (k + 1) * 16000], frames=[frame])
        pre = prefill_units(engine, [s], [unit], piecewise)
        if first_logits is None:
            first_logits = s.duplex.pending_logits.clone()
        observe = lambda _s, lg: seen.append(lg)  # noqa: E731
        res = generate_units(engine, [s], [rec["force_listen_override"]], pre, observe)[0]
        if fold:  # the tail waits for the next prefill; the KV lags by exactly its length
            assert context_length(engine, s) == engine.kv_length(s) + (2 if res.prefilled else 0)
        else:
            finalize_units(engine, [s])
            assert context_length(engine, s) == engine.kv_length(s)
        assert res.kv_length == context_length(engine, s) - 2  # terminator + </unit> not counted
        steps.append((res, context_length(engine, s)))
    finalize_units(engine, [s])  # flush: the KV is complete
    assert engine.kv_length(s) == steps[-1][1]
    return s, kv_after_prepare, first_logits, steps, seen


@pytest.mark.parametrize(
    ("fold", "piecewise"),
    [(False, False), (True, False), (True, True)],
    ids=["finalize", "folded", "folded-piecewise"],
)
def test_duplex_loop_matches_reference(
    engine: Engine, tiny_fixture_dir: Path, fold: bool, piecewise: bool
) -> None:
    e = load_npz(tiny_fixture_dir, "e_duplex")
    manifest = load_manifest(tiny_fixture_dir)
    config = fixture_duplex_config(manifest)
    s, kv0, first_logits, steps, seen = _run(engine, tiny_fixture_dir, config, fold, piecewise)
    try:
        assert kv0 == int(e["kv_len_after_prepare"])
        assert_close(first_logits, e["decode_first_logits_full"], what="first decode logits")
        top = torch.stack(seen).topk(5, dim=-1)
        assert top.indices.tolist() == e["decode_input_top5_ids"].tolist()
        assert_close(top.values, e["decode_input_top5_logits"], what="raw logits at every decision")
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


def _units(fixture_dir: Path, frames: str = "frame", n: int = 6) -> list[UnitInput]:
    inputs = fixture_dir / "inputs"
    audio = load_audio(inputs / "duplex_audio.wav")
    out = []
    for k in range(n):
        name = f"frame_{k}.png" if frames == "frame" else "image.png"
        out.append(
            UnitInput(
                audio=audio[k * 16000 : (k + 1) * 16000], frames=[Image.open(inputs / name).convert("RGB")]
            )
        )
    return out


def _loop(engine: Engine, sessions, unit_lists, forces) -> list[list]:
    per_session: list[list] = [[] for _ in sessions]
    for k in range(len(unit_lists[0])):
        pre = prefill_units(engine, sessions, [u[k] for u in unit_lists])
        results = generate_units(engine, sessions, [f[k] for f in forces], pre)
        finalize_units(engine, sessions)
        for i, r in enumerate(results):
            per_session[i].append(r)
    return per_session


def test_two_sessions_step_together(engine: Engine, tiny_fixture_dir: Path) -> None:
    """A second session (HD frames, other timing) shares every batched step; the reference session's
    decisions are unchanged and the second one's equal its own solo run."""
    e = load_npz(tiny_fixture_dir, "e_duplex")
    manifest = load_manifest(tiny_fixture_dir)
    prompt = manifest["duplex_prepare_prompt"].split("\n")[1]
    ref = load_audio(tiny_fixture_dir / "inputs" / "ref_audio.wav")
    forces_a = [rec["force_listen_override"] for rec in manifest["duplex_steps"]]
    forces_b = [False, False, True, False]
    cfg_b = fixture_duplex_config(manifest, max_slice_nums=2)

    solo = engine.open_session(Mode.DUPLEX)
    prepare(engine, solo, "Another prompt.", None, cfg_b)
    solo_results = _loop(engine, [solo], [_units(tiny_fixture_dir, "hd", 4)], [forces_b])[0]
    solo_ids = list(solo.duplex.total_ids)
    engine.close_session(solo)

    a, b = engine.open_session(Mode.DUPLEX), engine.open_session(Mode.DUPLEX)
    try:
        prepare(engine, a, prompt, ref, fixture_duplex_config(manifest))
        prepare(engine, b, "Another prompt.", None, cfg_b)
        units_a, units_b = _units(tiny_fixture_dir), _units(tiny_fixture_dir, "hd", 4)
        # b starts two units later than a
        _loop(engine, [a], [units_a[:2]], [forces_a[:2]])
        _loop(engine, [a, b], [units_a[2:], units_b], [forces_a[2:], forces_b])
        assert a.duplex.total_ids == e["total_ids"].tolist()
        assert b.duplex.total_ids == solo_ids
        sp = engine.special
        img = ("img", engine.model.config.query_num)
        hd_unit = [sp.unit_start, sp.image_start, img, sp.image_end]
        hd_unit += [sp.slice_start, img, sp.slice_end] * 2 + [("audio", 10)]
        assert b.duplex.schema[0] == hd_unit
        assert [r.is_listen for r in solo_results][2] is True
    finally:
        engine.close_session(a)
        engine.close_session(b)


def test_default_config_listens_first_and_samples(engine: Engine, tiny_fixture_dir: Path) -> None:
    """Defaults: sampling decode, forced listen for the first 3 units; seeded runs repeat exactly."""
    runs = []
    for _ in range(2):
        s = engine.open_session(Mode.DUPLEX)
        try:
            prepare(engine, s, "Streaming Omni Conversation.", None, DuplexConfig(seed=11))
            results = _loop(engine, [s], [_units(tiny_fixture_dir, n=4)], [[False] * 4])[0]
            runs.append((list(s.duplex.total_ids), [r.text for r in results]))
            sp = engine.special
            assert all(r.forced_listen and r.is_listen for r in results[:3])
            assert s.duplex.total_ids[:6] == [sp.listen, sp.unit_end] * 3
            assert all(not r.forced_listen for r in results[3:])
            for r in results:
                assert len(r.tts_token_ids) <= 18 and len(r.text) < 28
                assert set(r.timings_ms) >= {"generate_ms", "prefill_feed_ms"}
        finally:
            engine.close_session(s)
    assert runs[0] == runs[1]


def test_folded_tails_slide_like_finalized_units(engine: Engine, tiny_fixture_dir: Path) -> None:
    """A context-window slide with folded tails: `duplex.make_room` counts the pending tail and feeds it before
    dropping, and spans start at `context_length`, so the session drops the same whole units and decides the
    same tokens as one that finalizes every unit."""
    manifest = load_manifest(tiny_fixture_dir)
    audio = load_audio(tiny_fixture_dir / "inputs" / "duplex_audio.wav")
    units = [UnitInput(audio=audio[k * 16000 : (k + 1) * 16000]) for k in range(6)]
    runs = []
    for fold in (False, True):
        s = engine.open_session(Mode.DUPLEX)
        try:
            prepare(engine, s, "Short.", None, fixture_duplex_config(manifest))
            protected = engine.kv_length(s)
            window = SlidingWindow(protected, protected + 100, protected + 80)
            lengths = []
            for unit in units:
                if fold:
                    make_room(engine, s, window, 30)
                    window.mark(context_length(engine, s))
                else:
                    window.make_room(engine, s, 30)
                    window.mark(engine.kv_length(s))
                pre = prefill_units(engine, [s], [unit])
                generate_units(engine, [s], None, pre)
                if not fold:
                    finalize_units(engine, [s])
                lengths.append(context_length(engine, s))
                assert context_length(engine, s) <= window.max_tokens
            finalize_units(engine, [s])
            runs.append((list(s.duplex.total_ids), lengths, window.dropped_spans, window.dropped_tokens))
            assert 0 < window.dropped_spans < len(units) - 1  # some units dropped, not all
        finally:
            engine.close_session(s)
    assert runs[0][2] > 0  # the window slid
    assert runs[0] == runs[1]


def test_unit_text_cap_equals_decoded_length(tiny_fixture_dir: Path) -> None:
    """The 28-character cap without decoding: `reaches_chars` answers exactly what the decode-based rule
        answers, on multi-byte text cut at every token (split UTF-8 characters at both ends), with special and
        non-special added tokens in between, and on random ids (byte pieces that are not whole characters); it decodes
    only for a small share of the cases."""
    tok = MiniCPMOTokenizer.from_dir(tiny_fixture_dir / "model")
    sp = tok.special
    texts = [
        "你好，世界！今天的天气真不错，我们出去走走吧。",
        "안녕하세요, 만나서 반갑습니다. 오늘 어떠세요?",
        "สวัสดีครับ ยินดีที่ได้รู้จัก",
        "emoji 😀🎉👍🏽 and 家族👨‍👩‍👧 mixed with ASCII text.",
        "Plain English words that run well past the twenty-eight character cap.",
    ]
    cases: list[list[int]] = []
    for text in texts:
        ids = tok.encode(text)
        cases += [ids[a:b] for a in range(min(len(ids), 6)) for b in range(a + 1, len(ids) + 1)]
        cases.append([ids[0], sp.speak, *ids[1:5], tok.token_to_id("<think>"), *ids[5:9], sp.turn_eos])
    n_text = len(cases)
    table = tok.decoded_bytes
    partial = [t for t in range(len(table)) if table[t] and _invalid_utf8(table[t])]
    assert partial  # byte-level tokens that are not whole characters
    g = torch.Generator().manual_seed(5)
    pools = [partial, list(range(tok.vocab_size)), [*partial[:50], sp.listen, sp.speak, *tok.encode("ab")]]
    for k in range(600):
        pool = pools[k % len(pools)]
        n = int(torch.randint(1, 24, (1,), generator=g))
        cases.append([pool[int(i)] for i in torch.randint(0, len(pool), (n,), generator=g)])

    decodes = 0
    real_decode = tok.decode

    def counting_decode(ids, skip_special_tokens=False):  # noqa: ANN001, ANN202
        nonlocal decodes
        decodes += 1
        return real_decode(ids, skip_special_tokens)

    checks = 0
    text_decodes = text_checks = 0
    for ci, ids in enumerate(cases):
        if ci == n_text:
            text_decodes, text_checks = decodes, checks
        length = len(real_decode(ids, skip_special_tokens=True))
        for limit in (1, 2, 5, 10, 20, 27, 28, 29, 40, 80):
            tok.decode = counting_decode  # type: ignore[method-assign]
            got = reaches_chars(tok, ids, limit)
            tok.decode = real_decode  # type: ignore[method-assign]
            assert got == (length >= limit), (ids, limit, length)
            checks += 1
    # text (even cut mid-character) needs the tokenizer rarely; random byte soup more often, still exact
    assert text_decodes < text_checks // 20, (text_decodes, text_checks)
    assert decodes < checks // 2, (decodes, checks)


def _invalid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False
