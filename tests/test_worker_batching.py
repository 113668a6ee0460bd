"""The worker's tick: units of several duplex sessions (audio and omni) run as one batch through the real
worker loop (`inference.worker.serve`, in-process, over its TCP protocol) on the embedded tiny model; outputs
reach the right sessions; a failing tick ends only the sessions in it."""

from __future__ import annotations

import asyncio
import re
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from inference import protocol as p
from inference.worker import serve
from MiniCPMO45.engine.batcher import DuplexBatcher
from tests.worker_helpers import embedded

SETTINGS = embedded(max_sessions=4, tick_phases=1)
# two tick phases; a tick that waited for the other phase's units would only start after this long
PHASED = embedded(max_sessions=5, tick_phases=2, tick_gather_ms=60_000)
FRAME = (64, 80, 3)


class FakeServer:
    """The server end of the worker protocol: accepts the worker and collects what it sends per session."""

    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.got: dict[str, list[tuple[p.Message, bytes]]] = defaultdict(list)
        self.arrived = asyncio.Condition()
        self.writer: asyncio.StreamWriter | None = None
        self.done_at: dict[tuple[str, int], float] = {}  # (session, unit index) -> loop time of its UnitDone

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.connected.set()
        try:
            while True:
                message, payload = await p.read_message(reader)
                if isinstance(message, p.UnitDone):
                    self.done_at[message.session_id, message.index] = asyncio.get_running_loop().time()
                async with self.arrived:
                    self.got[getattr(message, "session_id", None) or "-"].append((message, payload))
                    self.arrived.notify_all()
        except asyncio.IncompleteReadError:
            return

    async def send(self, message: p.BaseModel, payload: bytes = b"") -> None:
        assert self.writer is not None
        self.writer.write(p.encode(message, payload))
        await self.writer.drain()

    def of(self, sid: str, kind: type) -> list[Any]:
        return [m for m, _ in self.got[sid] if isinstance(m, kind)]

    async def wait_for(self, sid: str, kind: type, count: int, timeout: float = 120.0) -> None:
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: len(self.of(sid, kind)) >= count), timeout)


def unit(sid: str, index: int, rng: np.random.Generator, frame: bool) -> tuple[p.Unit, bytes]:
    pcm = (0.05 * rng.standard_normal(16000)).astype(np.float32)
    payload = p.pcm_to_bytes(pcm)
    shape = None
    if frame:
        shape = FRAME
        payload += rng.integers(0, 255, FRAME, dtype=np.uint8).tobytes()
    return p.Unit(
        session_id=sid, index=index, samples=16000, completed_at=0.0, sent_at=0.0, frame_shape=shape
    ), payload


@pytest.fixture(params=[SETTINGS])
async def worker(request: pytest.FixtureRequest):
    torch.set_num_threads(1)
    server = FakeServer()
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    task = asyncio.create_task(serve("127.0.0.1", port, 0, "cpu", request.param))
    await asyncio.wait_for(server.connected.wait(), 30)
    await server.wait_for("-", p.Hello, 1)
    try:
        yield server
    finally:  # close what is still open: the engine host (and its KV slots) outlives the test
        for sid in [sid for sid in server.got if server.of(sid, p.Opened) and not server.of(sid, p.Closed)]:
            await server.send(p.CloseSession(session_id=sid))
            await server.wait_for(sid, p.Closed, 1)
        task.cancel()
        listener.close()


SESSIONS = {
    "speaker": ("audio_duplex", {"force": "speak", "seed": 1}),
    "listener": ("audio_duplex", {"force": "listen"}),
    "viewer": ("omni_duplex", {"force": "listen"}),
}


async def open_all(server: FakeServer, sessions: dict[str, tuple[str, dict[str, Any]]]) -> None:
    for sid, (mode, options) in sessions.items():
        await server.send(p.OpenSession(session_id=sid, mode=mode, options=options))
    for sid in sessions:
        await server.wait_for(sid, p.Opened, 1)


async def test_units_of_all_duplex_sessions_run_as_one_tick(worker: FakeServer) -> None:
    rng = np.random.default_rng(0)
    await open_all(worker, SESSIONS)
    rounds = 6
    for i in range(rounds):
        # the units of one grid line arrive a little apart (network, decoding): the tick gathers them
        for sid, (mode, _) in SESSIONS.items():
            await worker.send(*unit(sid, i, rng, frame=mode == "omni_duplex"))
            await asyncio.sleep(0.015)
        for sid in SESSIONS:
            await worker.wait_for(sid, p.UnitDone, i + 1)
    for sid in SESSIONS:
        done = worker.of(sid, p.UnitDone)
        assert [d.index for d in done] == list(range(rounds))  # every unit, in order
        assert not worker.of(sid, p.ErrorOut)
    sizes = [d.metrics.batch_sessions for sid in SESSIONS for d in worker.of(sid, p.UnitDone)]
    assert sizes == [3.0] * (3 * rounds)  # every tick held all three: omni and audio units together
    # outputs went to their own sessions: only the forced speaker talks
    assert worker.of("speaker", p.AudioOut) and worker.of("speaker", p.TextOut)
    assert not worker.of("listener", p.AudioOut) and not worker.of("viewer", p.AudioOut)
    # the omni unit added its image block, the audio-only ones did not
    kv = {sid: [d.metrics.kv_tokens for d in worker.of(sid, p.UnitDone)] for sid in SESSIONS}
    assert kv["viewer"][1] - kv["viewer"][0] > kv["listener"][1] - kv["listener"][0]


async def test_a_failing_tick_ends_only_its_sessions(worker: FakeServer, monkeypatch) -> None:
    rng = np.random.default_rng(1)
    sessions = {**SESSIONS, "echo": ("loopback", {})}
    await open_all(worker, sessions)
    real = DuplexBatcher.run_units

    def broken(self: DuplexBatcher, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(DuplexBatcher, "run_units", broken)
    for sid, (mode, _) in sessions.items():
        await worker.send(*unit(sid, 0, rng, frame=mode == "omni_duplex"))
    for sid in SESSIONS:
        await worker.wait_for(sid, p.Closed, 1)
        errors = worker.of(sid, p.ErrorOut)
        assert errors and errors[0].code == "mode_error" and "illegal memory access" in errors[0].message
    monkeypatch.setattr(DuplexBatcher, "run_units", real)
    # the loopback session in the same worker goes on
    await worker.send(*unit("echo", 1, rng, frame=False))
    await worker.wait_for("echo", p.UnitDone, 2)
    assert not worker.of("echo", p.ErrorOut) and not worker.of("echo", p.Closed)
    # and a new duplex session on the same worker works (the failed sessions' slots were released)
    await worker.send(p.OpenSession(session_id="again", mode="audio_duplex", options={"force": "listen"}))
    await worker.wait_for("again", p.Opened, 1)
    await worker.send(*unit("again", 0, rng, frame=False))
    await worker.wait_for("again", p.UnitDone, 1)
    assert not worker.of("again", p.ErrorOut)


def _compile_in_the_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.compile(lambda x: x * 2 + 1, backend="eager")(torch.ones(3))  # a new graph inside the tick


def _allocator_retries_in_the_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    import inference.ticker as ticker

    retries = ticker.alloc_retries() + 2  # as two cudaMalloc retries inside the tick would count
    monkeypatch.setattr(ticker, "alloc_retries", lambda: retries)


def _collection_in_the_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    from inference import gc_pauses

    gc_pauses.PAUSES("start", {})  # what the callback sees of an 80 ms collection
    gc_pauses.PAUSES._started -= 0.08
    gc_pauses.PAUSES("stop", {})


@pytest.mark.parametrize(
    ("stall", "logged"),
    [
        (_compile_in_the_tick, r"a tick of 1 units compiled 1 graph\(s\) with torch.compile"),
        (_allocator_retries_in_the_tick, r"a tick of 1 units waited on 2 CUDA allocator retries"),
        # (a real collection of this test process may add to it)
        (_collection_in_the_tick, r"a tick of 1 units was held up by [1-9]\d* garbage collection"),
    ],
    ids=["compile", "allocator", "gc"],
)
async def test_a_stalled_tick_is_logged(
    worker: FakeServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    stall: Callable[[pytest.MonkeyPatch], None],
    logged: str,
) -> None:
    """A tick inside which something stalls the worker (`inference.ticker.tick_stalls`: a torch.compile of a shape
    the warm-up missed, CUDA allocator retries on a card short of memory, a long garbage collection) is logged
    and counted; a tick without one is not."""
    rng = np.random.default_rng(3)
    await open_all(worker, {"listener": SESSIONS["listener"]})
    with caplog.at_level("WARNING", logger="inference.worker"):
        await worker.send(*unit("listener", 0, rng, frame=False))
        await worker.wait_for("listener", p.UnitDone, 1)
    assert not re.search(logged, caplog.text)
    real = DuplexBatcher.run_units

    def stalling(self: DuplexBatcher, *args: Any, **kwargs: Any) -> Any:
        stall(monkeypatch)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DuplexBatcher, "run_units", stalling)
    with caplog.at_level("WARNING", logger="inference.worker"):
        await worker.send(*unit("listener", 1, rng, frame=False))
        await worker.wait_for("listener", p.UnitDone, 2)
    assert len(re.findall(logged, caplog.text)) == 1, caplog.text
    assert not worker.of("listener", p.ErrorOut)


@pytest.mark.parametrize("worker", [PHASED], indirect=True)
async def test_sessions_take_turns_on_two_half_second_grids(worker: FakeServer) -> None:
    rng = np.random.default_rng(2)
    names = ["a", "b", "c", "d"]
    await open_all(worker, {sid: ("audio_duplex", {"force": "listen"}) for sid in names})
    offsets = [worker.of(sid, p.Opened)[0].grid_offset_s for sid in names]
    assert offsets == [0.0, 0.5, 0.0, 0.5]  # spread evenly, shifted by half a unit
    for phase in (["a", "c"], ["b", "d"]):  # each phase's tick runs without waiting for the other phase
        for sid in phase:
            await worker.send(*unit(sid, 0, rng, frame=False))
        for sid in phase:
            await worker.wait_for(sid, p.UnitDone, 1, timeout=30)
            assert worker.of(sid, p.UnitDone)[0].metrics.batch_sessions == 2
    # a mode switch keeps the session's phase
    await worker.send(p.OpenSession(session_id="b", mode="omni_duplex", options={"force": "listen"}))
    await worker.wait_for("b", p.Opened, 2)
    assert worker.of("b", p.Opened)[1].grid_offset_s == 0.5
    # the emptier phase takes the next session
    for sid in ("a", "c"):
        await worker.send(p.CloseSession(session_id=sid))
        await worker.wait_for(sid, p.Closed, 1)
    await worker.send(p.OpenSession(session_id="e", mode="audio_duplex", options={"force": "listen"}))
    await worker.wait_for("e", p.Opened, 1)
    assert worker.of("e", p.Opened)[0].grid_offset_s == 0.0
    # a session that leaves the batching modes no longer holds its phase's ticks back
    await worker.send(p.OpenSession(session_id="b", mode="loopback", options={}))
    await worker.wait_for("b", p.Opened, 3)
    assert worker.of("b", p.Opened)[2].grid_offset_s == 0.0
    await worker.send(*unit("d", 1, rng, frame=False))
    await worker.wait_for("d", p.UnitDone, 2, timeout=30)
    assert worker.of("d", p.UnitDone)[1].metrics.batch_sessions == 1


@pytest.mark.parametrize("worker", [PHASED], indirect=True)
async def test_two_waiting_phases_tick_apart_the_older_first(worker: FakeServer) -> None:
    """When both phases' units wait at once (a worker that fell behind), they run as two ticks, the phase whose
    unit came first before the other, not as one tick of both (twice as long, and every later tick would find both
    phases waiting again)."""
    rng = np.random.default_rng(8)
    names = ["a", "b", "c", "d"]
    await open_all(worker, {sid: ("audio_duplex", {"force": "listen"}) for sid in names})
    assert [worker.of(sid, p.Opened)[0].grid_offset_s for sid in names] == [0.0, 0.5, 0.0, 0.5]
    # phase 1's first unit, then phase 0's two, then phase 1's second: the tick gathers until phase 1 is whole,
    # and by then both phases wait
    for sid in ["b", "a", "c", "d"]:
        await worker.send(*unit(sid, 0, rng, frame=False))
    for sid in names:
        await worker.wait_for(sid, p.UnitDone, 1, timeout=60)
    sizes = {sid: worker.of(sid, p.UnitDone)[0].metrics.batch_sessions for sid in names}
    assert sizes == dict.fromkeys(names, 2), sizes
    assert max(worker.done_at["b", 0], worker.done_at["d", 0]) < min(
        worker.done_at["a", 0], worker.done_at["c", 0]
    )


@pytest.mark.parametrize("worker", [PHASED], indirect=True)
async def test_phases_whose_ticks_overrun_their_half_unit_tick_together(
    worker: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose phase ticks take longer than half a unit (overloaded) merges both phases' waiting units into
    one tick: one tick of both costs less than two, and apart it would fall further behind every unit."""
    from inference.modes.duplex import DuplexMode

    real = DuplexMode.on_units

    def slow(batch: Any) -> Any:  # a tick of 0.6 s: more than the 0.5 s a phase has
        time.sleep(0.6)
        return real(batch)

    monkeypatch.setattr(DuplexMode, "on_units", staticmethod(slow))
    rng = np.random.default_rng(10)
    names = ["a", "b", "c", "d"]
    await open_all(worker, {sid: ("audio_duplex", {"force": "listen"}) for sid in names})
    for sid in ["a", "c"]:  # phase 0 alone: its tick is timed
        await worker.send(*unit(sid, 0, rng, frame=False))
    for sid in ["a", "c"]:
        await worker.wait_for(sid, p.UnitDone, 1, timeout=60)
        assert worker.of(sid, p.UnitDone)[0].metrics.batch_sessions == 2
    for sid, index in [("b", 0), ("a", 1), ("c", 1), ("d", 0)]:  # then both phases wait at once
        await worker.send(*unit(sid, index, rng, frame=False))
    for sid in names:
        await worker.wait_for(sid, p.UnitDone, 2 if sid in ("a", "c") else 1, timeout=60)
    sizes = {sid: worker.of(sid, p.UnitDone)[-1].metrics.batch_sessions for sid in names}
    assert sizes == dict.fromkeys(names, 4), sizes


STRAGGLING = embedded(max_sessions=4, tick_phases=2, tick_gather_ms=300)


@pytest.mark.parametrize("worker", [STRAGGLING], indirect=True)
async def test_a_phases_straggler_joins_the_other_phases_tick(worker: FakeServer) -> None:
    """A unit of a phase whose other sessions have no unit waiting (it missed its own tick) runs in the tick of the
    phase that is waiting, rather than in a tick of its own."""
    rng = np.random.default_rng(9)
    names = ["a", "b", "c", "d"]
    await open_all(worker, {sid: ("audio_duplex", {"force": "listen"}) for sid in names})
    offsets = {sid: worker.of(sid, p.Opened)[0].grid_offset_s for sid in names}
    full = [sid for sid in names if offsets[sid] == 0.5]
    [straggler, _] = [sid for sid in names if offsets[sid] == 0.0]
    for sid in [straggler, *full]:  # one of a phase's two units, then the whole other phase
        await worker.send(*unit(sid, 0, rng, frame=False))
    for sid in [straggler, *full]:
        await worker.wait_for(sid, p.UnitDone, 1, timeout=60)
        assert worker.of(sid, p.UnitDone)[0].metrics.batch_sessions == 3, sid


@pytest.mark.parametrize("worker", [PHASED], indirect=True)
async def test_chat_sessions_of_both_phases_tick_together(
    worker: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chat cuts the units of both tick phases on one grid, so its sessions of both phases run as one tick (their
    decode and TTS steps shared), each on its own phase's slots and vocoder half; both replies speak."""
    from inference.modes.chat import ChatMode

    phases: dict[str, int] = {}
    real_open = ChatMode.open

    def open_(self: ChatMode, options: Any) -> Any:
        phases[options.session_id] = options.tick_phase
        return real_open(self, options)

    monkeypatch.setattr(ChatMode, "open", open_)
    from MiniCPMO45.engine.core import Engine

    steps: list[tuple[set[int], int]] = []  # each LLM step's phases and longest piece
    real_feed = Engine.feed_for_logits

    def feed_for_logits(self: Engine, sessions: Any, pieces: Any) -> Any:
        steps.append(({s.phase for s in sessions}, max(int(x.shape[0]) for x in pieces)))
        return real_feed(self, sessions, pieces)

    monkeypatch.setattr(Engine, "feed_for_logits", feed_for_logits)
    names = ["chat-a", "chat-b"]
    await open_all(
        worker,
        {sid: ("chat", {"force": "speak", "max_new_tokens": 12, "seed": k}) for k, sid in enumerate(names)},
    )
    assert sorted(phases.values()) == [0, 1]  # one session in each phase
    assert [worker.of(sid, p.Opened)[0].grid_offset_s for sid in names] == [0.0, 0.0]  # ... on one grid
    for sid in names:
        await worker.send(p.Control(session_id=sid, message={"type": "text", "text": f"hello from {sid}"}))
    pcm = p.pcm_to_bytes(np.zeros(5120, dtype=np.float32))
    for k in range(8):
        for sid in names:  # the tick gathers for a minute: a tick of one session would wait for the other
            await worker.send(
                p.Unit(session_id=sid, index=k, samples=5120, completed_at=0.0, sent_at=0.0), pcm
            )
        for sid in names:
            await worker.wait_for(sid, p.UnitDone, k + 1, timeout=60)
    for sid in names:
        assert not worker.of(sid, p.ErrorOut)
        assert worker.of(sid, p.AudioOut), f"{sid} did not speak"
        # the first tick prefilled both turns and advanced both replies in its shared steps
        assert worker.of(sid, p.UnitDone)[0].metrics.batch_sessions == 2
    # the turns' prefills: one step per phase (a step over both ends of the slots would run them all); the
    # replies' one-token steps: both phases in one
    prefills = [phases for phases, longest in steps if longest > 1]
    assert sorted(map(sorted, prefills)) == [[0], [1]]
    assert {0, 1} in [phases for phases, longest in steps if longest == 1]


async def test_chat_replies_and_a_duplex_call_share_a_worker_in_time(worker: FakeServer) -> None:
    """Two chat sessions answering typed turns and one speaking duplex session on one worker, their units sent
    in real time (chat: 320 ms, duplex: 1 s): no unit waits behind another of its session, the duplex units
    meet their deadlines, the two chat replies advance in the same ticks, and all three speak."""
    rng = np.random.default_rng(4)
    chat = {"chat-a": ("chat", {"force": "speak", "max_new_tokens": 40, "seed": 1}), "chat-b": None}
    chat["chat-b"] = ("chat", {"force": "speak", "max_new_tokens": 40, "seed": 2})
    await open_all(worker, {**chat, "duplex": ("audio_duplex", {"force": "speak", "seed": 1})})  # type: ignore[dict-item]
    for sid in chat:
        await worker.send(p.Control(session_id=sid, message={"type": "text", "text": f"hello from {sid}"}))
    loop = asyncio.get_running_loop()
    sent: dict[tuple[str, int], float] = {}
    start = loop.time()
    chat_units, duplex_units = 24, 8
    for k in range(chat_units):
        due = start + k * 0.32
        await asyncio.sleep(max(0.0, due - loop.time()))
        for sid in chat:
            pcm = np.zeros(5120, dtype=np.float32)
            message = p.Unit(session_id=sid, index=k, samples=5120, completed_at=0.0, sent_at=0.0)
            sent[sid, k] = loop.time()
            await worker.send(message, p.pcm_to_bytes(pcm))
        if k % 3 == 0 and k // 3 < duplex_units:
            sent["duplex", k // 3] = loop.time()
            await worker.send(*unit("duplex", k // 3, rng, frame=False))
    for sid, count in (("chat-a", chat_units), ("chat-b", chat_units), ("duplex", duplex_units)):
        await worker.wait_for(sid, p.UnitDone, count, timeout=60)
        assert not worker.of(sid, p.ErrorOut)
        assert worker.of(sid, p.AudioOut), f"{sid} did not speak"
        assert all(d.metrics.backlog_units == 0 for d in worker.of(sid, p.UnitDone)), sid
    # every duplex unit was handled within its own length of being sent (its deadline: the next unit is due
    # then), and every chat unit within two of its 320 ms lengths (chat has no unit deadline of its own: VAD
    # only must not fall behind; on the development VM chat units took 10-230 ms here)
    late = {key: round(worker.done_at[key] - t, 3) for key, t in sent.items()}
    assert all(v <= (1.0 if key[0] == "duplex" else 0.64) for key, v in late.items()), late
    tick_sizes = [d.metrics.batch_sessions or 0.0 for d in worker.of("chat-a", p.UnitDone)]
    assert 2.0 in tick_sizes  # both replies advanced in one tick


LONG_GATHER = embedded(max_sessions=4, tick_phases=1, tick_gather_ms=60_000)
# (a tick that waited for another session would wait a minute)


@pytest.mark.parametrize("worker", [LONG_GATHER], indirect=True)
async def test_a_chat_tick_does_not_wait_for_duplex_sessions(worker: FakeServer) -> None:
    """A chat session's 320 ms units and a duplex session's 1 s units on one phase: each mode's tick gathers its
    own sessions only, so a chat unit runs at once although the duplex session has no unit waiting."""
    rng = np.random.default_rng(5)
    await open_all(
        worker, {"talker": ("chat", {"seed": 1}), "listener": ("audio_duplex", {"force": "listen"})}
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    pcm = p.pcm_to_bytes(np.zeros(5120, dtype=np.float32))
    await worker.send(p.Unit(session_id="talker", index=0, samples=5120, completed_at=0.0, sent_at=0.0), pcm)
    await worker.wait_for("talker", p.UnitDone, 1, timeout=30)
    assert loop.time() - started < 20  # not the minute a gather for the duplex session would take
    await worker.send(*unit("listener", 0, rng, frame=False))
    await worker.wait_for("listener", p.UnitDone, 1, timeout=30)
    assert worker.of("talker", p.Opened)[0].grid_offset_s == 0.0  # chat units are on the worker's grid too


@pytest.mark.parametrize("worker", [LONG_GATHER], indirect=True)
async def test_chat_vad_runs_beside_the_mode_thread(
    worker: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The VAD of a tick's chat units (Silero on the CPU) runs on the worker's `prepare` threads as one batched
    call over the tick's sessions before the tick, not on the mode thread that launches every session's GPU
    work; the tick uses those probabilities."""
    import threading

    from inference.modes import chat
    from inference.vad import SileroVad, TurnDetector

    pushed: list[tuple[str, int]] = []  # (thread, streams) of each batched VAD call
    alone: list[str] = []
    fed: list[int] = []
    real_many, real_push, real_feed = chat.push_many, SileroVad.push, TurnDetector.feed

    def push_many(vads: Any, pcms: Any) -> list[list[float]]:
        pushed.append((threading.current_thread().name, len(vads)))
        return real_many(vads, pcms)

    def push(self: SileroVad, pcm: np.ndarray) -> list[float]:
        alone.append(threading.current_thread().name)
        return real_push(self, pcm)

    def feed(self: TurnDetector, probs: list[float]) -> list[Any]:
        fed.append(len(probs))
        return real_feed(self, probs)

    monkeypatch.setattr(chat, "push_many", push_many)
    monkeypatch.setattr(SileroVad, "push", push)
    monkeypatch.setattr(TurnDetector, "feed", feed)
    names = ["talker-a", "talker-b"]
    await open_all(worker, {sid: ("chat", {"seed": 1}) for sid in names})
    pcm = p.pcm_to_bytes((0.05 * np.random.default_rng(6).standard_normal(5120)).astype(np.float32))
    for k in range(3):
        for sid in names:
            await worker.send(
                p.Unit(session_id=sid, index=k, samples=5120, completed_at=0.0, sent_at=0.0), pcm
            )
        for sid in names:  # the tick gathers for a minute: both sessions' units tick together
            await worker.wait_for(sid, p.UnitDone, k + 1, timeout=30)
    assert len(pushed) == 3 and all(name.startswith("prepare") and n == 2 for name, n in pushed), pushed
    assert not alone  # no stream ran its VAD on its own (the tick's fallback)
    assert fed == [10] * 6  # 320 ms units: ten 32 ms windows each, fed to the turn logic in the tick
    assert all(d.metrics.prepare_ms is not None for sid in names for d in worker.of(sid, p.UnitDone))


async def test_a_chat_backlog_is_taken_as_one_unit(
    worker: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chat units that waited behind a running one go to the mode as one unit (the session catches up in one
    tick instead of staying behind): each still gets its `unit_done`, in order, the merged ones saying how many
    were taken together; the VAD hears every part; the mode's numbers come once per tick."""
    from inference.vad import TurnDetector

    fed: list[int] = []
    real_feed = TurnDetector.feed

    def feed(self: TurnDetector, probs: list[float]) -> list[Any]:
        fed.append(len(probs))
        return real_feed(self, probs)

    monkeypatch.setattr(TurnDetector, "feed", feed)
    await open_all(worker, {"talker": ("chat", {"seed": 1})})
    pcm = p.pcm_to_bytes((0.05 * np.random.default_rng(7).standard_normal(5120)).astype(np.float32))
    for k in range(6):  # at once: all but the first wait behind it
        await worker.send(
            p.Unit(session_id="talker", index=k, samples=5120, completed_at=0.0, sent_at=0.0), pcm
        )
    await worker.wait_for("talker", p.UnitDone, 6, timeout=30)
    done = worker.of("talker", p.UnitDone)
    assert [d.index for d in done] == list(range(6))
    merged = [d for d in done if d.metrics.merged_units]
    assert merged and all(d.metrics.merged_units == len(merged) for d in merged)
    assert all(d.metrics.backlog_units == 0 for d in merged)
    assert fed == [10] * 6  # every 320 ms part fed to the turn logic
    # the tick's own numbers (the tick loop's, the VAD's) on one unit of each tick only
    assert sum(d.metrics.tick_ms is not None for d in done) == 6 - len(merged) + 1
    assert all((d.metrics.prepare_ms is not None) == (d.metrics.tick_ms is not None) for d in done)


async def test_a_quiet_session_does_not_hold_its_phases_ticks_back(worker: FakeServer) -> None:
    """A tick waits (up to `tick_gather_ms`) for the units of every session of its phase, but not for one that has
    sent none for two of its units (a paused call, or one whose audio stalled): its phase's other calls would each
    wait out the whole gather. Once it sends a unit again, it is waited for again."""
    rng = np.random.default_rng(11)
    await open_all(worker, {sid: ("audio_duplex", {"force": "listen"}) for sid in ("talking", "quiet")})
    for i in range(2):  # both send: the tick of each round waits for the other's unit
        await worker.send(*unit("talking", i, rng, frame=False))
        await asyncio.sleep(0.02)
        await worker.send(*unit("quiet", i, rng, frame=False))
        for sid in ("talking", "quiet"):
            await worker.wait_for(sid, p.UnitDone, i + 1, timeout=30)
    waited = worker.of("talking", p.UnitDone)[1].metrics.tick_wait_ms
    assert waited is not None and waited >= 15, waited  # it waited for the other session's unit
    await asyncio.sleep(2.1)  # "quiet" sends nothing for two units
    for i in range(2, 4):
        await worker.send(*unit("talking", i, rng, frame=False))
        await worker.wait_for("talking", p.UnitDone, i + 1, timeout=30)
    done = worker.of("talking", p.UnitDone)
    assert [d.metrics.batch_sessions for d in done[2:]] == [1, 1]
    assert all((d.metrics.tick_wait_ms or 0) < 30 for d in done[2:]), [d.metrics for d in done[2:]]
    # back from the pause: its unit is waited for again (from the next round: a second later)
    await worker.send(*unit("quiet", 2, rng, frame=False))
    await worker.wait_for("quiet", p.UnitDone, 3, timeout=30)
    await asyncio.sleep(1.0)
    await worker.send(*unit("talking", 4, rng, frame=False))
    await asyncio.sleep(0.02)
    await worker.send(*unit("quiet", 3, rng, frame=False))
    await worker.wait_for("talking", p.UnitDone, 5, timeout=30)
    assert worker.of("talking", p.UnitDone)[4].metrics.batch_sessions == 2


@pytest.mark.parametrize(
    "worker", [embedded(max_sessions=4, tick_phases=1, tick_gather_ms=300)], indirect=True
)
async def test_a_straggler_does_not_wait_for_units_that_already_ran(worker: FakeServer) -> None:
    """A unit that missed its phase's tick (it came after the gather) ticks as soon as it can: it does not wait
    out another gather for the sessions whose units of that round already ran (it used to: the whole
    `tick_gather_ms` more, and its late tick then ran into the other phase's)."""
    rng = np.random.default_rng(12)
    names = ("a", "b", "late")
    await open_all(worker, {sid: ("audio_duplex", {"force": "listen"}) for sid in names})
    for sid in names:  # round 0: all three in one tick
        await worker.send(*unit(sid, 0, rng, frame=False))
    for sid in names:
        await worker.wait_for(sid, p.UnitDone, 1, timeout=30)
    assert {worker.of(sid, p.UnitDone)[0].metrics.batch_sessions for sid in names} == {3}
    for sid in ("a", "b"):  # round 1: "late" misses the 300 ms gather
        await worker.send(*unit(sid, 1, rng, frame=False))
    await worker.wait_for("a", p.UnitDone, 2, timeout=30)
    await worker.send(*unit("late", 1, rng, frame=False))
    await worker.wait_for("late", p.UnitDone, 2, timeout=30)
    a, late = worker.of("a", p.UnitDone)[1].metrics, worker.of("late", p.UnitDone)[1].metrics
    assert a.batch_sessions == 2 and (a.tick_wait_ms or 0) >= 250, a  # a and b waited the gather for it
    assert late.batch_sessions == 1 and (late.tick_wait_ms or 0) < 100, late


@pytest.mark.parametrize(
    "worker", [embedded(max_sessions=4, tick_phases=1, tick_gather_ms=50)], indirect=True
)
async def test_a_tick_waits_for_a_unit_already_in_the_worker(
    worker: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session whose next unit is already in the worker, behind its previous one (its runner is still sending
    that unit's outputs), is waited for past `tick_gather_ms`: started without it, the tick would leave its unit
    to the next tick, the other phase's, and every later unit of that session with it (an H100's omni calls:
    one session a phase behind for good, each of its units a second late, and the other phase's ticks merged)."""
    from inference.sessions import SessionRunner

    send = SessionRunner._send_outputs

    async def slow_for_b(self: SessionRunner, outputs: Any, rate: int) -> None:
        if self.session_id == "b" and outputs:
            await asyncio.sleep(0.15)  # three gathers' time
        await send(self, outputs, rate)

    monkeypatch.setattr(SessionRunner, "_send_outputs", slow_for_b)
    rng = np.random.default_rng(13)
    await open_all(worker, {sid: ("audio_duplex", {"force": "listen"}) for sid in ("a", "b")})
    for i in range(2):  # both sessions' first two units at once: the second ones wait in the worker
        for sid in ("a", "b"):
            await worker.send(*unit(sid, i, rng, frame=False))
    for sid in ("a", "b"):
        await worker.wait_for(sid, p.UnitDone, 2, timeout=30)
    second = worker.of("a", p.UnitDone)[1].metrics
    assert second.batch_sessions == 2, second


@pytest.mark.parametrize(
    "worker", [embedded(max_sessions=4, tick_phases=1, tick_gather_ms=50)], indirect=True
)
@pytest.mark.parametrize("late_s", [0.09, 0.3], ids=["late-90ms", "late-300ms"])
async def test_a_session_whose_units_come_late_as_a_rule_is_waited_for(
    worker: FakeServer, late_s: float
) -> None:
    """A call whose units reach the worker ~90 ms after its phase's others, unit after unit (its audio came that
    much later, for the whole call), misses a 50 ms gather and ticks alone every unit; once three of its units
    came that late, its phase's tick waits for it (up to 150 ms after the round's first unit). A session later
    than that is not waited for."""
    rng = np.random.default_rng(14)
    names = ("a", "b", "late")
    await open_all(worker, {sid: ("audio_duplex", {"force": "listen"}) for sid in names})
    rounds = 6
    for i in range(rounds):
        for sid in ("a", "b"):
            await worker.send(*unit(sid, i, rng, frame=False))
        await asyncio.sleep(late_s)
        await worker.send(*unit("late", i, rng, frame=False))
        for sid in names:
            await worker.wait_for(sid, p.UnitDone, i + 1, timeout=30)
        await asyncio.sleep(0.1)
    sizes = {sid: [d.metrics.batch_sessions for d in worker.of(sid, p.UnitDone)] for sid in names}
    assert sizes["late"][:3] == [1, 1, 1], sizes  # ticked apart while its lateness was not yet its rule
    if late_s < 0.15:
        assert sizes["late"][3:] == sizes["a"][3:] == [3] * (rounds - 3), sizes
        waited = [d.metrics.tick_wait_ms or 0 for d in worker.of("a", p.UnitDone)[3:]]
        assert all(w >= late_s * 1000 - 10 for w in waited), waited
    else:
        assert sizes["late"] == [1] * rounds and sizes["a"] == [2] * rounds, sizes
        waited = [d.metrics.tick_wait_ms or 0 for d in worker.of("a", p.UnitDone)]
        assert all(w < 150 for w in waited), waited
