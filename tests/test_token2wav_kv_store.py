"""The estimator KV store: a turn's keys at scattered positions, listed in the official stored order."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch

from MiniCPMO45.token2wav import PromptCache, PushRequest, Token2Wav
from MiniCPMO45.token2wav.flow_graphs import WindowRow
from MiniCPMO45.token2wav.kv_store import EstimatorStore

from .token2wav_assets import build_asset_folder, load_tiny_token2wav


def _tiny_vocoder(fixture: Path, folder: Path, graphs: bool | None) -> tuple[Token2Wav, PromptCache]:
    model = load_tiny_token2wav(fixture, folder, use_graphs=graphs)
    inputs = np.load(fixture / "inputs" / "inputs.npz")
    voice = model.prepare_prompt(inputs["prompt_tokens"][0], inputs["prompt_mel"], inputs["spk_embedding"])
    return model, voice


def _official_cut(keys: list[int], prompt: int, history: int) -> list[int]:
    if len(keys) > prompt + history:
        keys = keys[:prompt] + keys[len(keys) - history :]
    return keys


def _write(store: EstimatorStore, index: int, positions: list[int], ids: list[int]) -> None:
    assert store.kv is not None
    for p, v in zip(positions, ids, strict=True):
        store.kv[:, :, 2 * index : 2 * index + 2, :, p] = float(v)


@pytest.mark.parametrize("windows", [[50] * 9, [18, 50, 56, 10, 50, 50, 36, 50, 4, 56, 56]])
def test_slot_order_is_the_official_cut(windows: list[int]) -> None:
    """Keys written where `claim` says and committed: gathering them in `order` gives what the official
    `cat([new, old])` + first-P/last-H cut keeps, window after window; positions never run out."""
    prompt, history = 40, 100
    store = EstimatorStore(window_frames=56)
    base = torch.arange(prompt, dtype=torch.float32).view(1, 1, 1, 1, prompt, 1).expand(2, 3, 2, 1, prompt, 2)
    slot = store.open(base, prompt, history)
    other = store.open(base, prompt, history)  # a neighbour whose rows must not change
    official = list(range(prompt))
    next_id = 1000
    for n in windows:
        ids = list(range(next_id, next_id + n))
        next_id += n
        positions = slot.claim(n)
        assert store.scratch not in positions and not set(positions) & set(slot.order)
        _write(store, slot.index, positions, ids)
        slot.commit(positions)
        official = _official_cut(ids + official, prompt, history)
        got = slot.keys()
        assert got.shape == (2, 3, 2, 1, len(official), 2)
        assert got[0, 0, 0, 0, :, 0].tolist() == [float(v) for v in official]
        assert torch.equal(got[1, 2, 1, 0, :, 1], got[0, 0, 0, 0, :, 0])
    assert other.keys()[0, 0, 0, 0, :, 0].tolist() == [float(v) for v in range(prompt)]
    assert store.frames == -(-(prompt + history + 56 + 1) // 16) * 16


def test_slots_are_reused_grown_and_released() -> None:
    store = EstimatorStore(window_frames=8)
    base = torch.randn(1, 1, 2, 1, 5, 2)
    slots = [store.open(base, 5, 10) for _ in range(3)]
    assert [s.index for s in slots] == [0, 1, 2] and store.rows == 4
    kv_before = store.kv
    slots[1].close()
    again = store.open(base, 5, 10)
    assert again.index == 1 and store.kv is kv_before  # lowest free slot, no reallocation
    frames, version = store.frames, store.version
    wide = store.open(base, 5, 50)  # a longer history grows every row; free lists gain the new positions
    assert store.frames > frames and store.version > version
    assert max(slots[0].free) == store.scratch - 1 and store.scratch not in slots[0].free
    torch.testing.assert_close(slots[0].keys(), base[:, :, :, :, :5])
    twin = slots[0].copy()
    assert twin.index == 4 and twin.order == slots[0].order
    torch.testing.assert_close(twin.keys(), slots[0].keys())
    with pytest.raises(ValueError, match="free positions"):
        wide.claim(10_000)
    wide.close()
    with pytest.raises(ValueError, match="closed"):
        wide.claim(1)
    with pytest.raises(ValueError, match="base keys"):
        store.open(torch.randn(2, 1, 2, 1, 5, 2), 5, 10)


def test_a_dropped_turn_gives_its_slot_back(token2wav_fixture_dir: Path, tmp_path: Path) -> None:
    """The batcher drops a turn that was cut off without a last chunk: its store slot is free again, and a
    turn whose last chunk ran frees its slot at once."""
    folder = build_asset_folder(token2wav_fixture_dir, tmp_path / "token2wav")
    model, voice = _tiny_vocoder(token2wav_fixture_dir, folder, True)
    assert model.flow_graphs is not None
    store = model.flow_graphs.store
    turns = [model.start_turn(voice, rule="duplex") for _ in range(3)]
    assert store.owners == [True, True, True]
    model.push_codes_batch([PushRequest(t, list(range(25))) for t in turns])
    del turns[1]
    gc.collect()
    assert store.owners == [True, False, True]
    model.push_codes_batch([PushRequest(turns[0], list(range(5)), end_of_turn=True)])
    assert turns[0].finished and turns[0].kv_slot is not None and turns[0].kv_slot.closed
    assert store.owners == [False, False, True]
    assert model.start_turn(voice).kv_slot.index == 0  # type: ignore[union-attr]


def test_junk_at_the_scratch_position_never_reaches_a_turn(
    token2wav_fixture_dir: Path, tmp_path: Path
) -> None:
    """Padding frames write the scratch position; a non-finite value there (float16 junk of an idle row on a
    GPU) must not leak into any row's attention, active or idle."""
    folder = build_asset_folder(token2wav_fixture_dir, tmp_path / "token2wav")
    audio = []
    for poison in (False, True):
        model, voice = _tiny_vocoder(token2wav_fixture_dir, folder, True)
        assert model.flow_graphs is not None
        store = model.flow_graphs.store
        turns = [model.start_turn(voice, rule="duplex") for _ in range(3)]
        if poison:
            assert store.kv is not None
            store.kv[:, :, :, :, store.scratch] = float("nan")
        # turn 1 is idle in this round (row 1 of a batch over slots 0..2)
        pieces = model.push_codes_batch([PushRequest(t, list(range(25))) for t in (turns[0], turns[2])])
        pieces += model.push_codes_batch([PushRequest(t, list(range(30, 55))) for t in turns])
        audio.append(np.concatenate([p for ps in pieces for p in ps]))
    assert np.isfinite(audio[1]).all()
    np.testing.assert_allclose(audio[1], audio[0], atol=1e-6, rtol=0)


def test_reserve_takes_the_memory_up_front() -> None:
    store = EstimatorStore(window_frames=8)
    base = torch.randn(1, 1, 2, 1, 5, 2)
    store.reserve(base, 5, 10, 6)
    assert store.rows == 8 and store.frames == 32  # 5 + 10 + 8 + 1 rounded up to 16
    version = store.version
    slots = [store.open(base, 5, 10) for _ in range(8)]
    assert store.version == version and [s.index for s in slots] == list(range(8))
    store.open(base, 5, 10)  # a ninth turn grows the store
    assert store.version == version + 1 and store.rows == 16


def test_a_tick_phases_turns_take_rows_in_its_half_of_the_store() -> None:
    """A store reserved for 12 turns in two tick phases holds two halves of 6 rows: each phase's turns take the
    lowest free row of their half; a phase whose half is full takes the lowest free row anywhere, and the
    store never grows for a phase."""
    store = EstimatorStore(window_frames=8)
    base = torch.randn(1, 1, 2, 1, 5, 2)
    store.reserve(base, 5, 10, 11, phases=2)
    assert store.phase_rows == 6 and store.rows == 16
    version = store.version
    second = [store.open(base, 5, 10, phase=1).index for _ in range(3)]
    first = [store.open(base, 5, 10, phase=0).index for _ in range(2)]
    assert second == [6, 7, 8] and first == [0, 1]
    store.release(7)
    assert store.open(base, 5, 10, phase=1).index == 7  # the lowest free row of its half again
    assert [store.open(base, 5, 10, phase=0).index for _ in range(5)] == [2, 3, 4, 5, 9]  # half full: row 9
    assert store.open(base, 5, 10).index == 10  # no phase: the lowest free row
    assert store.version == version and store.rows == 16


def test_a_batch_never_reaches_past_the_store(token2wav_fixture_dir: Path, tmp_path: Path) -> None:
    """A store of 48 rows (it grows by 16 past 16 slots) and a round whose highest slot is 40: the batch
    covers slots 0..47, not the next power of two, and the audio is the plain path's."""
    folder = build_asset_folder(token2wav_fixture_dir, tmp_path / "token2wav")
    audio = []
    for graphs in (True, None):
        model, voice = _tiny_vocoder(token2wav_fixture_dir, folder, graphs)
        model.reserve_turns(voice, 40)
        turns = [model.start_turn(voice, rule="duplex") for _ in range(41)]
        if model.flow_graphs is not None:
            assert model.flow_graphs.store.rows == 48
        pieces = model.push_codes_batch([PushRequest(t, list(range(25))) for t in (turns[0], turns[40])])
        audio.append(np.concatenate([p for ps in pieces for p in ps]))
        if model.flow_graphs is not None:
            assert [s.bucket for s in model.flow_graphs.seen] == [48]
    np.testing.assert_allclose(audio[0], audio[1], atol=5e-4, rtol=0)


def test_a_round_refuses_closed_or_repeated_slots(token2wav_fixture_dir: Path, tmp_path: Path) -> None:
    folder = build_asset_folder(token2wav_fixture_dir, tmp_path / "token2wav")
    model, voice = _tiny_vocoder(token2wav_fixture_dir, folder, True)
    graphs = model.flow_graphs
    assert graphs is not None
    turn = model.start_turn(voice, rule="duplex")
    assert turn.kv_slot is not None

    def row() -> WindowRow:
        assert turn.kv_slot is not None
        capacity = voice.prompt_frames + 100
        return WindowRow(
            list(range(28)), False, turn.flow_cache, voice.spk_embedding, capacity, turn.kv_slot, 0
        )

    with pytest.raises(ValueError, match="one window per round"):
        graphs.run([row(), row()], 5)
    turn.kv_slot.close()
    with pytest.raises(ValueError, match="closed"):
        graphs.run([row()], 5)
    with pytest.raises(ValueError, match="padded path"):
        model.push_codes(turn, list(range(25)))
