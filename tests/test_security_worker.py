"""Worker IPC hardening (issue 22): only the supervisor's own workers can join, a peer cannot make the
supervisor buffer much, and a session or a stalled worker cannot grow queues without bound.

Real parts: the supervisor with a real CPU worker process, probes over real local TCP connections."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest

from inference import protocol as p
from inference.supervisor import SupervisorSettings, WorkerSupervisor
from tests.worker_helpers import EMBEDDED, Sink, embedded

AUTH_TIMEOUT_S = 5.0  # the supervisor's default: a peer silent this long after connecting is dropped


def unit(sid: str, index: int, samples: int = 1600) -> tuple[p.Unit, bytes]:
    pcm = np.full(samples, 0.01, dtype=np.float32)
    message = p.Unit(session_id=sid, index=index, samples=samples, completed_at=time.monotonic(), sent_at=0.0)
    return message, p.pcm_to_bytes(pcm)


async def serves_a_session(supervisor: WorkerSupervisor, sid: str = "check") -> None:
    """Open a loopback session on worker 0, get a unit through it, and close it."""
    sink = Sink()
    supervisor.attach(0, sid, sink)
    assert supervisor.send(0, p.OpenSession(session_id=sid, mode="loopback"))
    await sink.wait(lambda: bool(sink.of(p.Opened)), 60)
    assert supervisor.send(0, *unit(sid, 0))
    await sink.wait(lambda: bool(sink.of(p.UnitDone)) and bool(sink.of(p.AudioOut)), 60)
    assert not sink.lost and not sink.of(p.ErrorOut)
    supervisor.detach(0, sid)


async def started(**settings: float) -> WorkerSupervisor:
    """A supervisor whose worker process is spawned but (most likely) not connected yet."""
    supervisor = WorkerSupervisor(SupervisorSettings(start_timeout_s=60, **settings), EMBEDDED)
    await supervisor.start(wait_ready=False)
    while supervisor.workers[0].pid is None:
        await asyncio.sleep(0.005)
    return supervisor


def worker_secret(pid: int) -> bytes:
    """What a local process of the same user could read: the worker's environment."""
    for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        name, _, value = entry.partition(b"=")
        if name.decode() == p.AUTH_ENV:
            return bytes.fromhex(value.decode())
    raise AssertionError("the worker has no secret in its environment")


def frame(header: dict) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack(">II", len(raw), 0) + raw


def hello(pid: int, worker_id: int = 0, **extra: object) -> bytes:
    return frame(
        {"type": "hello", "version": p.PROTOCOL_VERSION, "worker_id": worker_id, "pid": pid, "device": "cpu"}
        | {"modes": ["loopback"], **extra}
    )


async def challenge(reader: asyncio.StreamReader) -> str:
    message, _ = await asyncio.wait_for(p.read_message(reader), 5)
    assert isinstance(message, p.Challenge)
    return message.nonce


# ---- hijack probes: (port, real worker pid) -> bytes sent; each must be closed by the supervisor ----------

Probe = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def hello_without_proof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pid: int) -> None:
    writer.write(hello(pid))


async def hello_with_wrong_secret(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pid: int
) -> None:
    nonce = await challenge(reader)
    writer.write(hello(pid, proof=p.hello_proof(secrets.token_bytes(32), nonce, 0, pid)))


async def hello_with_the_secret_itself(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pid: int
) -> None:
    await challenge(reader)
    writer.write(hello(pid, proof=worker_secret(pid).hex()))


async def proof_for_another_nonce(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pid: int
) -> None:
    await challenge(reader)  # a proof seen on an earlier connection does not answer this one
    writer.write(hello(pid, proof=p.hello_proof(worker_secret(pid), secrets.token_hex(32), 0, pid)))


async def right_secret_wrong_pid(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pid: int
) -> None:
    nonce = await challenge(reader)
    writer.write(hello(os.getpid(), proof=p.hello_proof(worker_secret(pid), nonce, 0, os.getpid())))


async def right_secret_unknown_worker(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pid: int
) -> None:
    nonce = await challenge(reader)
    writer.write(hello(pid, worker_id=7, proof=p.hello_proof(worker_secret(pid), nonce, 7, pid)))


async def huge_length_prefix(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pid: int) -> None:
    writer.write(struct.pack(">II", p.MAX_HEADER_BYTES, p.MAX_PAYLOAD_BYTES))  # within the general limits


async def max_length_prefix(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pid: int) -> None:
    writer.write(struct.pack(">II", 0xFFFFFFFF, 0xFFFFFFFF))


async def garbage_bytes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pid: int) -> None:
    writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pid: int) -> None:
    pass  # slow-loris: connect and say nothing


async def dribble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pid: int) -> None:
    data = hello(pid)  # slow-loris: a plausible hello, one byte every 200 ms (never completes in time)

    async def trickle() -> None:
        for byte in data:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.2)

    asyncio.get_running_loop().create_task(trickle())


HIJACK_PROBES: dict[str, tuple[Probe, float]] = {  # probe, seconds within which the supervisor hangs up
    "hello_without_proof": (hello_without_proof, 2.0),
    "hello_with_wrong_secret": (hello_with_wrong_secret, 2.0),
    "hello_with_the_secret_itself": (hello_with_the_secret_itself, 2.0),
    "proof_for_another_nonce": (proof_for_another_nonce, 2.0),
    "right_secret_wrong_pid": (right_secret_wrong_pid, 2.0),
    "right_secret_unknown_worker": (right_secret_unknown_worker, 2.0),
    "huge_length_prefix": (huge_length_prefix, 2.0),
    "max_length_prefix": (max_length_prefix, 2.0),
    "garbage_bytes": (garbage_bytes, 2.0),
    "slow_loris_silent": (silent, AUTH_TIMEOUT_S + 2.0),
    "slow_loris_dribble": (dribble, AUTH_TIMEOUT_S + 2.0),
}


async def until_closed(reader: asyncio.StreamReader) -> None:
    while await reader.read(1 << 16):
        pass


@pytest.mark.parametrize("name", list(HIJACK_PROBES))
async def test_a_local_peer_cannot_pose_as_a_worker(
    name: str, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    probe, hang_up_within = HIJACK_PROBES[name]
    caplog.set_level(logging.INFO, logger="inference.supervisor")
    supervisor = await started()
    try:
        worker = supervisor.workers[0]
        pid = worker.pid
        assert pid is not None
        # the probe connects while the real worker is still starting, so it is the first to speak
        reader, writer = await asyncio.open_connection("127.0.0.1", supervisor._port)
        await probe(reader, writer, pid)
        await asyncio.wait_for(until_closed(reader), hang_up_within)
        writer.close()

        await supervisor.wait_ready(60)
        assert worker.pid == pid and worker.restarts == 0  # the real worker was not disturbed
        await serves_a_session(supervisor)
        secret = worker_secret(pid).hex()
        assert secret not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    finally:
        await supervisor.stop()
    rejected = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert rejected and all(r.levelno >= logging.WARNING for r in rejected)
    out, err = capfd.readouterr()
    assert secret not in caplog.text and secret not in out and secret not in err


async def test_a_late_hello_does_not_disturb_the_worker(caplog: pytest.LogCaptureFixture) -> None:
    supervisor = await started()
    try:
        await supervisor.wait_ready(60)
        worker = supervisor.workers[0]
        reader, writer = await asyncio.open_connection("127.0.0.1", supervisor._port)
        writer.write(hello(worker.pid or 0))
        await asyncio.wait_for(until_closed(reader), 2.0)
        writer.close()
        assert worker.up and worker.restarts == 0
        await serves_a_session(supervisor)
    finally:
        await supervisor.stop()


# ---- queue-bound probes: a session flooded while its worker is busy ------------------------------------


def flood_units(sid: str, count: int) -> list[tuple[p.BaseModel, bytes]]:
    return [unit(sid, i) for i in range(count)]


def flood_controls(sid: str, count: int) -> list[tuple[p.BaseModel, bytes]]:
    return [(p.Control(session_id=sid, message={"type": "text", "text": str(i)}), b"") for i in range(count)]


@pytest.mark.parametrize("kind", ["units", "controls"])
async def test_a_flooded_session_queue_stays_bounded(kind: str, capfd: pytest.CaptureFixture[str]) -> None:
    """The worker preloads the engine on its mode thread right after hello (seconds), so the session's
    open and everything sent behind it wait in the session's queue."""
    count, bound = 200, 64
    supervisor = WorkerSupervisor(SupervisorSettings(start_timeout_s=60), embedded(preload_engine=True))
    await supervisor.start()
    try:
        sink, sid = Sink(), "flooded"
        supervisor.attach(0, sid, sink)
        assert supervisor.send(0, p.OpenSession(session_id=sid, mode="loopback"))
        flood = flood_units(sid, count) if kind == "units" else flood_controls(sid, count)
        assert all(supervisor.send(0, message, payload) for message, payload in flood)
        worker = supervisor.workers[0]

        if kind == "units":
            await sink.wait(lambda: len(sink.of(p.UnitDone)) + len(sink.errors("units_dropped")) >= count)
            done = sink.of(p.UnitDone)
            dropped = sink.errors("units_dropped")
            assert len(done) == bound and len(dropped) == count - bound
            assert [m.index for m in done] == list(range(count - bound, count))  # the oldest went
            assert max(m.metrics.backlog_units for m in done) == bound - 1
            assert worker.dropped_units == count - bound
        else:
            await sink.wait(lambda: len(sink.of(p.TextOut)) + len(sink.errors("controls_dropped")) >= count)
            texts = [m.text for m in sink.of(p.TextOut)]
            # the session's `open` may still be queued too when the flood arrives: it counts as a control
            assert bound - 1 <= len(texts) <= bound
            assert texts == [str(i) for i in range(len(texts))]  # the newest were refused
            assert len(sink.errors("controls_dropped")) == count - len(texts)
        assert not sink.lost and not sink.of(p.Closed)
        assert sink.of(p.Opened) and not sink.errors("mode_error")
        assert worker.up and worker.restarts == 0
        await serves_a_session(supervisor)
    finally:
        await supervisor.stop()
    _, err = capfd.readouterr()  # the worker process's log
    assert f"session {sid}: queue full" in err


# ---- send-path probes: a worker that stops reading its connection --------------------------------------


@pytest.mark.parametrize("kind", ["units", "controls"])
async def test_a_worker_that_stops_reading_cannot_grow_the_send_buffer(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="inference.supervisor")
    supervisor = WorkerSupervisor(SupervisorSettings(start_timeout_s=60, heartbeat_timeout_s=120), EMBEDDED)
    await supervisor.start()
    worker = supervisor.workers[0]
    pid = worker.pid
    assert pid is not None and worker.writer is not None
    transport = worker.writer.transport
    os.kill(pid, signal.SIGSTOP)
    try:
        big = 1 << 20
        peak = 0
        for i in range(100):  # 100 MiB offered
            if kind == "units":
                message, payload = unit("gone", i, samples=big // 4)
                sent = supervisor.send(0, message, payload)
            else:
                text = "x" * (big - 200)
                sent = supervisor.send(
                    0, p.Control(session_id="gone", message={"type": "text", "text": text})
                )
            peak = max(peak, transport.get_write_buffer_size())
            if not sent and kind == "controls":
                break
        assert peak <= 33 * big  # bounded well below what was offered
        if kind == "units":
            assert worker.dropped_units > 50  # units past the soft limit are dropped, the worker lives on
            assert worker.up and worker.restarts == 0
            os.kill(pid, signal.SIGCONT)
            await serves_a_session(supervisor)
        else:
            deadline = time.monotonic() + 30
            while not (worker.up and worker.restarts == 1):  # killed, then started again
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert worker.pid != pid
            assert any("not reading" in r.getMessage() for r in caplog.records)
            await serves_a_session(supervisor)
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        await supervisor.stop()
