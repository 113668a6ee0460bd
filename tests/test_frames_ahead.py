"""An omni unit's camera frame may come before the unit (`protocol.FrameAhead`): the worker encodes the frames
that came together in one run on the mode thread, before the units' tick, and each unit (which then carries
no frame) takes its frame's rows. A frame that never came, or came malformed, leaves its unit without a frame;
nothing else breaks. Through the real worker loop on the embedded tiny model."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from inference import protocol as p
from tests.test_worker_batching import FRAME, FakeServer, open_all, unit, worker  # noqa: F401

OMNI = {"ahead1": {"seed": 1}, "ahead2": {"seed": 1}, "inline": {"seed": 1, "frames_ahead": False}}


def frame_ahead(sid: str, index: int, rng: np.random.Generator) -> tuple[p.FrameAhead, bytes]:
    pixels = rng.integers(0, 255, FRAME, dtype=np.uint8)
    return p.FrameAhead(session_id=sid, index=index, frame_shape=FRAME), pixels.tobytes()


def bare_unit(sid: str, index: int, rng: np.random.Generator) -> tuple[p.Unit, bytes]:
    """A unit whose frame went ahead: PCM only."""
    message, payload = unit(sid, index, rng, frame=False)
    return message.model_copy(update={"frame_ahead": True}), payload


async def test_frames_sent_ahead_are_encoded_together_before_their_units(worker: FakeServer) -> None:  # noqa: F811
    rng = np.random.default_rng(0)
    await open_all(worker, {sid: ("omni_duplex", {"force": "listen", **o}) for sid, o in OMNI.items()})
    opened = {sid: worker.of(sid, p.Opened)[0] for sid in OMNI}
    assert opened["ahead1"].frames_ahead and not opened["inline"].frames_ahead
    rounds = 3
    for i in range(rounds):
        for sid in ("ahead1", "ahead2"):
            await worker.send(*frame_ahead(sid, i, rng))
        await asyncio.sleep(0.3)  # the frames' encode runs before the units come
        for sid in ("ahead1", "ahead2"):
            await worker.send(*bare_unit(sid, i, rng))
        await worker.send(*unit("inline", i, rng, frame=True))
        for sid in OMNI:
            await worker.wait_for(sid, p.UnitDone, i + 1)
    done = {sid: [d.metrics for d in worker.of(sid, p.UnitDone)] for sid in OMNI}
    for i in range(rounds):
        # the two frames that came together went through the tower in one run: the same run's time
        ahead = [done[sid][i].vision_ahead_ms for sid in ("ahead1", "ahead2")]
        assert ahead[0] is not None and ahead[0] > 0 and ahead[0] == ahead[1], ahead
        assert done["inline"][i].vision_ahead_ms is None  # its frame came with it: encoded in the tick
        assert {done[sid][i].batch_sessions for sid in OMNI} == {3.0}  # one tick all the same
    # every unit fed its image block: the context grows alike whichever way its frame came
    growth = {
        sid: [b.kv_tokens - a.kv_tokens for a, b in zip(m, m[1:], strict=False)] for sid, m in done.items()
    }
    assert growth["ahead1"] == growth["ahead2"] == growth["inline"], growth
    for sid in OMNI:
        assert not worker.of(sid, p.ErrorOut)


@pytest.mark.parametrize("broken", ["never_sent", "wrong_size"])
async def test_a_unit_whose_frame_never_came_runs_without_one(worker: FakeServer, broken: str) -> None:  # noqa: F811
    rng = np.random.default_rng(1)
    await open_all(worker, {"v": ("omni_duplex", {"force": "listen"})})
    await worker.send(*unit("v", 0, rng, frame=True))
    await worker.send(*unit("v", 1, rng, frame=True))
    if broken == "wrong_size":
        message, payload = frame_ahead("v", 2, rng)
        await worker.send(message, payload[:-3])
    await worker.send(*bare_unit("v", 2, rng))
    await worker.send(*frame_ahead("v", 3, rng))
    await worker.send(*bare_unit("v", 3, rng))
    await worker.wait_for("v", p.UnitDone, 4)
    kv = [d.metrics.kv_tokens for d in worker.of("v", p.UnitDone)]
    with_frame, without = kv[1] - kv[0], kv[2] - kv[1]
    assert without < with_frame  # unit 2 heard its audio and saw nothing
    assert kv[3] - kv[2] == with_frame  # and the session goes on: unit 3's frame came
    assert [d.index for d in worker.of("v", p.UnitDone)] == [0, 1, 2, 3]
    assert not worker.of("v", p.ErrorOut)


OPENING = {
    "opened": {"seed": 1, "prefill_ahead": True},
    "ahead": {"seed": 1},
    "inline": {"seed": 1, "frames_ahead": False},
}


async def test_units_opened_with_their_frames_take_only_their_audio(worker: FakeServer) -> None:  # noqa: F811
    """With `prefill_ahead`, a unit is opened as soon as its frame is encoded (`prefill_ahead_ms`), and the context
    grows exactly as when the frame is fed in the tick; a frame that comes while the unit before its own is still
    to tick is encoded but its unit is not opened (it would go into the KV ahead of that unit)."""
    rng = np.random.default_rng(2)
    await open_all(worker, {sid: ("omni_duplex", {"force": "listen", **o}) for sid, o in OPENING.items()})
    rounds = 3
    for i in range(rounds):
        for sid in ("opened", "ahead"):
            await worker.send(*frame_ahead(sid, i, rng))
        await asyncio.sleep(0.3)  # the frames' encode (and the open) runs before the units come
        for sid in ("opened", "ahead"):
            await worker.send(*bare_unit(sid, i, rng))
        await worker.send(*unit("inline", i, rng, frame=True))
        for sid in OPENING:
            await worker.wait_for(sid, p.UnitDone, i + 1)
    # the next unit's frame comes before this one: encoded, not opened
    await worker.send(*frame_ahead("opened", rounds + 1, rng))
    await asyncio.sleep(0.3)
    await worker.send(*unit("opened", rounds, rng, frame=True))
    await worker.send(*bare_unit("opened", rounds + 1, rng))
    await worker.wait_for("opened", p.UnitDone, rounds + 2)
    done = {sid: [d.metrics for d in worker.of(sid, p.UnitDone)] for sid in OPENING}
    for i in range(rounds):
        opened = done["opened"][i]
        assert opened.prefill_ahead_ms is not None and opened.prefill_ahead_ms > 0, i
        assert opened.vision_ahead_ms is not None
        assert done["ahead"][i].prefill_ahead_ms is None and done["ahead"][i].vision_ahead_ms is not None
        assert done["inline"][i].prefill_ahead_ms is None
    late, early = done["opened"][rounds], done["opened"][rounds + 1]
    assert late.prefill_ahead_ms is None and late.vision_ahead_ms is None  # its frame came with it
    assert early.prefill_ahead_ms is None and early.vision_ahead_ms is not None
    growth = {
        sid: [b.kv_tokens - a.kv_tokens for a, b in zip(m, m[1:], strict=False)] for sid, m in done.items()
    }
    assert growth["opened"][: rounds - 1] == growth["ahead"] == growth["inline"], growth
    assert growth["opened"][rounds - 1 :] == [growth["inline"][0]] * 2, (
        growth
    )  # each unit fed its image block
    for sid in OPENING:
        assert not worker.of(sid, p.ErrorOut)
