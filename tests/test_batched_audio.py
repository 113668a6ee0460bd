"""The batched streaming audio encoder (one pass per tick over per-slot caches) against `forward_stream` run
per session: sessions that start at different units (different cache lengths in one batch, first chunks next
to steady ones), a stream reaching the end of the 1500-position table while the others do not, slots reused by
new sessions, a session moving from the per-session path, and the duplex batcher's LLM caches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from MiniCPMO45.audio.load import load_audio
from MiniCPMO45.config import AudioConfig
from MiniCPMO45.engine.batched_audio import BatchedAudioEncoder
from MiniCPMO45.engine.batcher import DuplexBatcher
from MiniCPMO45.engine.core import Engine
from MiniCPMO45.engine.duplex import UnitInput, prepare
from MiniCPMO45.engine.session import Mode
from MiniCPMO45.model import MiniCPMO
from MiniCPMO45.modules.whisper import WhisperStreamCache
from MiniCPMO45.modules.whisper_slots import WhisperSlotCache
from tests.engine_fixtures import fixture_duplex_config, load_manifest
from tests.reference_engine import finalize_units, generate_units, prefill_units

TOL = 1e-4


class _Conversation:
    """An owner of a slot's stream (the batcher uses the session's `DuplexState`)."""


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> MiniCPMO:
    return MiniCPMO.from_pretrained(tiny_model_dir, dtype=torch.float32)


def _chunk(gen: torch.Generator, first: bool, seconds: int = 1) -> tuple[torch.Tensor, int, int]:
    """A streaming mel chunk of the duplex shapes: the first one 1030 ms with no left redundancy (102 frames,
    prefix 0, suffix 2), later ones 1 s with 2 redundancy frames each side (104 frames)."""
    core = 100 * seconds
    if first:
        return torch.randn(80, core + 2, generator=gen), 0, 2
    return torch.randn(80, core + 4, generator=gen), 2, 2


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a.float() - b.float()).abs().max().item()


def _assert_same_stream(enc: BatchedAudioEncoder, slot: int, ref: WhisperStreamCache) -> None:
    got = enc.cache.stream_cache(slot)
    assert got.length == ref.length and got.resets == ref.resets, (slot, got.length, ref.length)
    for (k, v), (rk, rv) in zip(got.layers, ref.layers, strict=True):
        assert _max_diff(k, rk) <= TOL and _max_diff(v, rv) <= TOL


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@torch.no_grad()
def test_one_pass_per_tick_matches_forward_stream(model: MiniCPMO, static: bool) -> None:
    enc = BatchedAudioEncoder(model, num_slots=5, use_graphs=False, static=static)
    gen = torch.Generator().manual_seed(0)
    # slot 0 joins with 26 units already streamed per session, so it passes the table at unit 3
    head_start = WhisperStreamCache()
    for k in range(26):
        mel, p, s = _chunk(gen, k == 0)
        model.audio_embeds_stream(mel[None], head_start, p, s)
    assert head_start.length == 1300
    # slot -> (start unit, end unit) conversations; slot 1 never has audio (an idle row inside the range),
    # slot 3 gets a new conversation at unit 7 (it must not continue the old stream)
    plan = {0: [(0, 10)], 2: [(2, 10)], 3: [(1, 5), (7, 10)], 4: [(4, 10)]}
    refs: dict[int, WhisperStreamCache] = {}
    owners: dict[int, object] = {}
    for unit in range(10):
        slots, mels, prefixes, suffixes = [], [], [], []
        for slot, spans in plan.items():
            span = next(((a, b) for a, b in spans if a <= unit < b), None)
            if span is None:
                continue
            first = unit == span[0] and slot != 0
            if unit == span[0]:  # a new conversation in this slot
                refs[slot], owners[slot] = WhisperStreamCache(), _Conversation()
                if slot == 0:
                    refs[0].layers = [(k.clone(), v.clone()) for k, v in head_start.layers]
                enc.bind(slot, owners[slot], head_start if slot == 0 else None)
            enc.bind(slot, owners[slot])
            # one unit of slot 4 brings 2 s at once: rows with different numbers of new frames
            mel, p, s = _chunk(gen, first, seconds=2 if (slot, unit) == (4, 6) else 1)
            if (slot, unit) == (2, 5):  # an odd mel length without right redundancy (conv2 reads its edge)
                mel, s = mel[:, :101], 0
            slots.append(slot)
            mels.append(mel)
            prefixes.append(p)
            suffixes.append(s)
        passes = enc.passes
        out = enc.encode(slots, mels, prefixes, suffixes)
        assert enc.passes == passes + 1  # one encoder pass whatever the cache lengths
        if unit == 4:  # a first chunk next to streams of three other lengths
            assert sorted(refs[slot].length for slot in slots) == [0, 50, 100, 150]
        for slot, mel, p, s, got in zip(slots, mels, prefixes, suffixes, out, strict=True):
            want = model.audio_embeds_stream(mel[None], refs[slot], p, s)
            assert _max_diff(got, want) <= TOL, (unit, slot)
            assert enc.cache.lengths[slot] == refs[slot].length
            assert enc.cache.resets[slot] == refs[slot].resets
        if unit == 3:  # 1450 + 52 >= 1500: slot 0 starts over, the others go on
            assert refs[0].resets == 1 and refs[0].length == 50
            assert refs[2].length == 100 and refs[3].length == 150
    assert [refs[slot].resets for slot in (0, 2, 3, 4)] == [1, 0, 0, 0]
    assert refs[4].length == 350 and refs[3].length == 150
    assert enc.cache.lengths[1] == 0
    for slot, ref in refs.items():
        _assert_same_stream(enc, slot, ref)


@torch.no_grad()
def test_a_per_session_stream_continues_in_its_slot(model: MiniCPMO) -> None:
    gen = torch.Generator().manual_seed(1)
    chunks = [_chunk(gen, k == 0) for k in range(5)]
    ref, moved = WhisperStreamCache(), WhisperStreamCache()
    for mel, p, s in chunks[:3]:
        model.audio_embeds_stream(mel[None], ref, p, s)
        model.audio_embeds_stream(mel[None], moved, p, s)
    enc = BatchedAudioEncoder(model, num_slots=2, use_graphs=False)
    owner = _Conversation()
    enc.bind(1, owner, moved)
    assert enc.cache.lengths[1] == 150
    for mel, p, s in chunks[3:]:
        got = enc.encode([1], [mel], [p], [s])[0]
        assert _max_diff(got, model.audio_embeds_stream(mel[None], ref, p, s)) <= TOL
    _assert_same_stream(enc, 1, ref)
    enc.bind(1, owner, moved)  # the same owner again: the stream goes on untouched
    assert enc.cache.lengths[1] == 250
    enc.bind(1, _Conversation())  # a new conversation in the slot starts empty
    assert enc.cache.lengths[1] == 0 and enc.cache.resets[1] == 0
    mel, p, s = chunks[0]
    fresh = WhisperStreamCache()
    got = enc.encode([1], [mel], [p], [s])[0]
    assert _max_diff(got, model.audio_embeds_stream(mel[None], fresh, p, s)) <= TOL


def test_buffers_are_allocated_on_first_use(model: MiniCPMO) -> None:
    enc = BatchedAudioEncoder(model, num_slots=3, use_graphs=False)
    enc.bind(2, _Conversation())
    assert not enc.cache.allocated
    mel, p, s = _chunk(torch.Generator().manual_seed(2), True)
    enc.encode([2], [mel], [p], [s])
    acfg = model.config.audio
    head_dim = acfg.d_model // acfg.encoder_attention_heads
    assert enc.cache.allocated
    assert len(enc.cache.keys) == len(enc.cache.values) == acfg.encoder_layers
    assert enc.cache.keys[0].shape == (3, acfg.encoder_attention_heads, 1500, head_dim)
    # at the real size: 24 layers x K,V x 1500 positions x 1024 x bf16
    assert WhisperSlotCache.bytes_per_slot(AudioConfig(), torch.bfloat16) == 24 * 2 * 1500 * 1024 * 2


@torch.no_grad()
def test_bad_chunks_are_rejected(model: MiniCPMO) -> None:
    enc = BatchedAudioEncoder(model, num_slots=2, use_graphs=False)
    mel, p, s = _chunk(torch.Generator().manual_seed(3), True)
    with pytest.raises(ValueError, match="twice"):
        enc.encode([0, 0], [mel, mel], [p, p], [s, s])
    with pytest.raises(ValueError, match="outside"):
        enc.encode([2], [mel], [p], [s])
    with pytest.raises(ValueError, match="shape"):
        enc.encode([0], [mel[:40]], [p], [s])
    with pytest.raises(ValueError, match="one mel"):
        enc.encode([0, 1], [mel], [p], [s])
    with pytest.raises(ValueError, match="does not fit"):
        enc.encode([0], [torch.zeros(80, 3100)], [0], [0])
    with pytest.raises(ValueError, match="under 5"):
        enc.encode([0], [mel[:, :8]], [0], [0])
    assert enc.cache.lengths == [0, 0]
    # a rejected step changes no stream, not even the reset of a row that was fine
    enc.cache.lengths[0] = 1450
    with pytest.raises(ValueError, match="shape"):
        enc.encode([0, 1], [mel, mel[:40]], [p, p], [s, s])
    assert enc.cache.lengths == [1450, 0] and enc.cache.resets == [0, 0]


def _audio_unit(audio: np.ndarray, k: int) -> UnitInput:
    return UnitInput(audio[(k % 5) * 16000 : (k % 5 + 1) * 16000])


def test_batcher_streams_sessions_that_start_at_different_units(
    tiny_model_dir: Path, tiny_fixture_dir: Path
) -> None:
    """Sessions open, join and close at different units of one batcher; a reused slot starts a fresh audio
    stream; a session that ran units through `prefill_units` moves to the batcher with its stream. Each
    session's LLM cache (which holds its audio embeddings) and audio stream match the per-session path."""
    cfg = fixture_duplex_config(load_manifest(tiny_fixture_dir), force_listen_count=100)
    audio = load_audio(tiny_fixture_dir / "inputs" / "duplex_audio.wav")
    ref_engine = Engine.from_pretrained(tiny_model_dir, dtype=torch.float32, max_sessions=4, max_len=256)
    engine = Engine.from_pretrained(tiny_model_dir, dtype=torch.float32, max_sessions=3, max_len=256)
    batcher = DuplexBatcher(engine, use_graphs=False)
    # name -> (open at unit, close at unit, units through prefill_units before joining the batcher)
    plan = {"a": (0, 4, 0), "b": (1, 9, 2), "c": (4, 9, 0), "d": (3, 9, 0)}
    live, refs = {}, {}
    for unit in range(9):
        for name, (start, end, _solo) in plan.items():
            if unit == end and name in live:
                engine.close_session(live.pop(name))
                ref_engine.close_session(refs.pop(name))
            if unit == start:
                for eng, table in ((engine, live), (ref_engine, refs)):
                    s = eng.open_session(Mode.DUPLEX)
                    prepare(eng, s, f"Session {name}.", None, cfg)
                    table[name] = s
        batch = []
        for name, s in live.items():
            start, _, solo = plan[name]
            unit_in = _audio_unit(audio, unit - start + ord(name))
            r = refs[name]
            generate_units(ref_engine, [r], None, prefill_units(ref_engine, [r], [unit_in]))
            finalize_units(ref_engine, [r])
            if unit - start < solo:  # still on the per-session path
                generate_units(engine, [s], None, prefill_units(engine, [s], [unit_in]))
                finalize_units(engine, [s])
            else:
                batch.append((s, unit_in))
        if batch:
            batcher.run_units([s for s, _ in batch], [u for _, u in batch])
            batcher.finalize([s for s, _ in batch])  # feed the pending tails so the KV compares whole
        if unit == 4:
            assert live["c"].slot == 0  # session c took the slot session a left
        for name, s in live.items():
            assert engine.kv_length(s) == ref_engine.kv_length(refs[name]), (unit, name)
    for name, s in live.items():
        r = refs[name]
        n = engine.kv_length(s)
        for ours, theirs in zip(
            engine.cache.keys + engine.cache.values,
            ref_engine.cache.keys + ref_engine.cache.values,
            strict=True,
        ):
            assert _max_diff(ours[s.slot, :, :n], theirs[r.slot, :, :n]) <= TOL, name
        _assert_same_stream(batcher.audio, s.slot, r.audio_cache)
    assert batcher.audio.cache.lengths[live["c"].slot] == 5 * 50


@torch.no_grad()
def test_a_pass_runs_on_a_captured_window_that_holds_its_slots(model: MiniCPMO) -> None:
    """Slots 6 and 7 alone would build a 2-row step; after the warm-up's top 4-row step they run on it (no
    capture in a live tick), with the streams' own results."""
    enc = BatchedAudioEncoder(model, num_slots=8, use_graphs=False, static=True)
    enc.warm_up(4, top=True)
    built = set(enc.steps)
    assert {(lo, n) for lo, n, _, _ in built} == {(4, 4)}
    gen = torch.Generator().manual_seed(5)
    refs = {slot: WhisperStreamCache() for slot in (6, 7)}
    for slot in refs:
        enc.bind(slot, _Conversation())
    for _ in range(2):
        chunks = {slot: _chunk(gen, first=False) for slot in refs}
        out = enc.encode(list(chunks), *zip(*chunks.values(), strict=True))
        for (slot, (mel, p, s)), got in zip(chunks.items(), out, strict=True):
            assert _max_diff(got, model.audio_embeds_stream(mel[None], refs[slot], p, s)) <= TOL
    assert set(enc.steps) == built


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@torch.no_grad()
def test_mel_units_from_the_device_path_encode_like_host_units(
    tiny_model_dir: Path, tiny_fixture_dir: Path, static: bool
) -> None:
    """The batcher's GPU path, run on the CPU: `push_many(..., device)` gives each unit's features as a tensor
    where the transform ran, and `encode_sessions` joins them there (no numpy in between). The embeddings equal
    those of the host path's numpy units within float32 rounding."""
    from MiniCPMO45.audio.mel_stream import StreamingMel, push_many

    cfg = fixture_duplex_config(load_manifest(tiny_fixture_dir))
    device = torch.device("cpu")
    rng = np.random.default_rng(3)
    engine = Engine.from_pretrained(tiny_model_dir, dtype=torch.float32, max_sessions=3, max_len=256)
    sessions = [engine.open_session(Mode.DUPLEX) for _ in range(3)]
    for k, s in enumerate(sessions):
        prepare(engine, s, f"Session {k}.", None, cfg)
    on_device, on_host = [StreamingMel() for _ in sessions], [StreamingMel() for _ in sessions]
    encoders = [BatchedAudioEncoder(engine.model, 3, use_graphs=False, static=static) for _ in range(2)]
    for _ in range(4):
        audio = [(0.1 * rng.standard_normal(16000)).astype(np.float32) for _ in sessions]
        got_units, want_units = push_many(on_device, audio, device), push_many(on_host, audio)
        got_ready = [u for u in got_units if u is not None]
        want_ready = [u for u in want_units if u is not None]
        assert len(got_ready) == len(want_ready) == len(sessions)
        assert all(isinstance(u.features, torch.Tensor) for u in got_ready)
        assert all(isinstance(u.features, np.ndarray) for u in want_ready)
        got = encoders[0].encode_sessions(sessions, got_ready)
        want = encoders[1].encode_sessions(sessions, want_ready)
        for a, b in zip(got, want, strict=True):
            assert _max_diff(a, b) <= TOL
