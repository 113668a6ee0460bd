"""Data links: media shards talk to a worker directly over its Unix socket (`inference.links.WorkerLinks`),
beside the supervisor's control connection.

Real parts: the supervisor with a real CPU worker process (embedded tiny model), links over the real socket."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inference import protocol as p
from inference.links import LinkTarget, WorkerLinks
from inference.settings import SupervisorSettings
from inference.supervisor import WorkerSupervisor
from tests.worker_helpers import Sink, embedded


def unit(sid: str, index: int, samples: int) -> tuple[p.Unit, bytes]:
    pcm = np.full(samples, 0.01, dtype=np.float32)
    message = p.Unit(session_id=sid, index=index, samples=samples, completed_at=time.monotonic(), sent_at=0.0)
    return message, p.pcm_to_bytes(pcm)


async def supervisor_with(**worker_settings: Any) -> WorkerSupervisor:
    supervisor = WorkerSupervisor(SupervisorSettings(start_timeout_s=60), embedded(**worker_settings))
    await supervisor.start()
    return supervisor


def targets(supervisor: WorkerSupervisor) -> list[LinkTarget]:
    return [LinkTarget(worker_id=w.worker_id, path=w.link_path, up=w.up) for w in supervisor.workers]


async def linked(supervisor: WorkerSupervisor, shard_id: int) -> WorkerLinks:
    links = WorkerLinks(supervisor.secret, shard_id)
    links.set_workers(targets(supervisor))
    assert await links.ensure(0, 10.0)
    assert links.up(0)
    return links


async def open_session(links: WorkerLinks, sid: str, mode: str = "loopback", **options: object) -> Sink:
    sink = Sink()
    links.attach(0, sid, sink)
    assert links.send(0, p.OpenSession(session_id=sid, mode=mode, options=dict(options)))
    await sink.wait(lambda: bool(sink.of(p.Opened) or sink.of(p.ErrorOut) or sink.lost))
    assert sink.of(p.Opened), (sink.got, sink.lost)
    return sink


async def run_units(links: WorkerLinks, sid: str, sink: Sink, first: int, count: int) -> None:
    samples = sink.of(p.Opened)[0].unit_samples
    for i in range(first, first + count):
        assert links.send(0, *unit(sid, i, samples))
    await sink.wait(lambda: {m.index for m in sink.of(p.UnitDone)} >= set(range(first, first + count)))


async def test_a_session_runs_over_a_data_link_not_the_control_connection() -> None:
    supervisor = await supervisor_with()
    try:
        links = await linked(supervisor, shard_id=1)
        on_control = Sink()  # the same session id as the supervisor sees it: must stay silent
        supervisor.attach(0, "s1", on_control)
        sink = await open_session(links, "s1")
        await run_units(links, "s1", sink, 0, 3)
        assert [m.index for m in sink.of(p.UnitDone)] == [0, 1, 2]
        assert len(sink.of(p.AudioOut)) == 3 and all(
            len(b) > 0 for m, b in sink.got if isinstance(m, p.AudioOut)
        )
        # the control connection cannot touch a session a link owns
        assert supervisor.send(0, p.CloseSession(session_id="s1"))
        assert supervisor.send(0, p.Control(session_id="s1", message={"type": "pause"}))
        await run_units(links, "s1", sink, 3, 1)
        assert len(sink.of(p.AudioOut)) == 4 and not sink.of(p.Closed) and not sink.lost
        assert on_control.got == [] and on_control.lost == []
        # closing it over the link ends it there
        supervisor.detach(0, "s1")
        assert links.send(0, p.CloseSession(session_id="s1"))
        await sink.wait(lambda: bool(sink.of(p.Closed)))
        assert on_control.got == []
        await links.close()
        assert not links.up(0) and not links.send(0, p.CloseSession(session_id="s1"))
    finally:
        await supervisor.stop()


async def test_two_links_with_sessions_at_once() -> None:
    supervisor = await supervisor_with()
    try:
        one, two = await linked(supervisor, shard_id=1), await linked(supervisor, shard_id=2)
        a, b = await open_session(one, "a"), await open_session(two, "b")
        await asyncio.gather(run_units(one, "a", a, 0, 4), run_units(two, "b", b, 0, 4))
        # shard two cannot reach shard one's session: the messages are ignored, nothing arrives anywhere
        intruder = Sink()
        two.attach(0, "a", intruder)
        assert two.send(0, *unit("a", 99, a.of(p.Opened)[0].unit_samples))
        assert two.send(0, p.OpenSession(session_id="a", mode="loopback"))
        assert two.send(0, p.CloseSession(session_id="a"))
        await run_units(two, "b", b, 4, 2)  # link two's messages are handled in order: those went first
        await run_units(one, "a", a, 4, 1)
        assert intruder.got == [] and 99 not in {m.index for m in a.of(p.UnitDone)}
        assert not a.of(p.Closed) and not b.of(p.Closed)
        for sink in (a, b):
            assert not sink.lost and not sink.of(p.ErrorOut)
        await one.close()
        assert a.lost == ["worker links closed"] and not b.lost
        await run_units(two, "b", b, 6, 1)  # the other link lives on
        await two.close()
    finally:
        await supervisor.stop()


async def test_a_closed_link_ends_its_sessions_and_frees_their_kv_slots() -> None:
    supervisor = await supervisor_with(max_sessions=1, tick_phases=1)
    try:
        one = await linked(supervisor, shard_id=1)
        held = await open_session(one, "held", mode="audio_duplex")
        # the worker holds one KV slot: a second duplex session is refused while the link's session lives
        refused = Sink()
        supervisor.attach(0, "refused", refused)
        assert supervisor.send(0, p.OpenSession(session_id="refused", mode="audio_duplex"))
        await refused.wait(lambda: bool(refused.of(p.Closed)))
        assert "KV slots" in refused.of(p.ErrorOut)[0].message and not refused.of(p.Opened)

        await one.close()  # the shard goes away without closing its session
        assert held.lost == ["worker links closed"]
        two = await linked(supervisor, shard_id=2)
        fresh = await open_session(two, "fresh", mode="audio_duplex")
        assert not fresh.of(p.ErrorOut)
        await run_units(two, "fresh", fresh, 0, 1)
        await two.close()
        assert supervisor.workers[0].up and supervisor.workers[0].restarts == 0
    finally:
        await supervisor.stop()


# ---- probes: a local process poses as a media shard on the worker's socket ------------------------------

Probe = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[None]]


def frame(header: dict) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack(">II", len(raw), 0) + raw


def link_hello(pid: int, proof: str, shard_id: int = 1) -> bytes:
    return frame(
        {
            "type": "link_hello",
            "version": p.PROTOCOL_VERSION,
            "shard_id": shard_id,
            "pid": pid,
            "proof": proof,
        }
    )


async def challenge(reader: asyncio.StreamReader) -> str:
    message, _ = await asyncio.wait_for(p.read_message(reader), 5)
    assert isinstance(message, p.Challenge)
    return message.nonce


async def no_proof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes) -> None:
    await challenge(reader)
    writer.write(link_hello(os.getpid(), ""))


async def wrong_secret(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes) -> None:
    nonce = await challenge(reader)
    writer.write(link_hello(os.getpid(), p.link_proof(secrets.token_bytes(32), nonce, 1, os.getpid())))


async def another_nonce(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes) -> None:
    await challenge(reader)
    writer.write(link_hello(os.getpid(), p.link_proof(secret, secrets.token_hex(32), 1, os.getpid())))


async def worker_hello_proof(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes
) -> None:
    nonce = await challenge(reader)  # a worker's hello proof is not a link proof
    writer.write(link_hello(os.getpid(), p.hello_proof(secret, nonce, 1, os.getpid())))


async def worker_hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes) -> None:
    nonce = await challenge(reader)
    hello = p.Hello(worker_id=0, pid=os.getpid(), device="cpu", modes=[], proof="")
    hello.proof = p.hello_proof(secret, nonce, 0, os.getpid())
    writer.write(p.encode(hello))


async def someone_elses_pid(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes
) -> None:
    nonce = await challenge(reader)  # a valid proof, for a pid that is not the connecting process
    writer.write(link_hello(1, p.link_proof(secret, nonce, 1, 1)))


async def session_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes) -> None:
    writer.write(p.encode(p.OpenSession(session_id="x", mode="loopback")))


async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes) -> None:
    writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")


async def huge_length(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes) -> None:
    writer.write(struct.pack(">II", p.MAX_HEADER_BYTES, p.MAX_PAYLOAD_BYTES))


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes) -> None:
    pass


PROBES: dict[str, tuple[Probe, float]] = {  # probe, seconds within which the worker hangs up
    "no_proof": (no_proof, 2.0),
    "wrong_secret": (wrong_secret, 2.0),
    "another_nonce": (another_nonce, 2.0),
    "worker_hello_proof": (worker_hello_proof, 2.0),
    "worker_hello": (worker_hello, 2.0),
    "someone_elses_pid": (someone_elses_pid, 2.0),
    "session_first": (session_first, 2.0),
    "garbage": (garbage, 2.0),
    "huge_length": (huge_length, 2.0),
    "silent": (silent, 5.0 + 2.0),
}


async def hung_up(path: str, probe: Probe, secret: bytes) -> float:
    """Run the probe on a fresh connection; the seconds until the worker closed it (nothing else may come)."""
    reader, writer = await asyncio.open_unix_connection(path)
    started = time.monotonic()
    try:
        await probe(reader, writer, secret)
        while data := await reader.read(1 << 16):
            message, _ = await p.read_message(_fed(data))
            assert isinstance(message, p.Challenge), message  # the challenge, never an answer
        return time.monotonic() - started
    finally:
        writer.close()


def _fed(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def test_a_local_peer_cannot_pose_as_a_shard(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO)
    supervisor = await supervisor_with()
    worker = supervisor.workers[0]
    link_dir = supervisor.link_dir
    try:
        path = worker.link_path
        assert path is not None and link_dir is not None and Path(path).parent == Path(link_dir)
        assert stat.S_IMODE(os.stat(link_dir).st_mode) == 0o700
        assert stat.S_ISSOCK(os.stat(path).st_mode) and stat.S_IMODE(os.stat(path).st_mode) == 0o600

        secret = supervisor.secret
        took = await asyncio.gather(
            *(asyncio.wait_for(hung_up(path, probe, secret), within + 1) for probe, within in PROBES.values())
        )
        for (name, (_, within)), seconds in zip(PROBES.items(), took, strict=True):
            assert seconds < within, (name, seconds)

        links = await linked(supervisor, shard_id=1)  # the real link still works
        sink = await open_session(links, "real")
        await run_units(links, "real", sink, 0, 2)
        await links.close()
        assert worker.up and worker.restarts == 0
    finally:
        await supervisor.stop()
    assert link_dir is not None and not os.path.exists(link_dir)  # removed at stop
    _, err = capfd.readouterr()  # the worker process's log
    assert err.count("data link rejected") == len(PROBES)
    assert secret.hex() not in err and secret.hex() not in caplog.text


async def test_a_killed_worker_loses_the_links_sessions_and_its_restart_links_again() -> None:
    supervisor = await supervisor_with()
    worker = supervisor.workers[0]
    try:
        links = await linked(supervisor, shard_id=1)
        sink = await open_session(links, "s")
        old_pid = worker.pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        await sink.wait(lambda: bool(sink.lost), 10)
        assert sink.lost == ["worker link lost"]
        assert not links.send(0, *unit("s", 0, 1600))

        deadline = time.monotonic() + 30
        while worker.up:  # the supervisor notices, the front tells its shards
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        links.set_workers(targets(supervisor))
        assert not links.up(0) and not await links.ensure(0, 0.2)
        while not worker.up:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert worker.pid != old_pid and worker.restarts == 1
        links.set_workers(targets(supervisor))
        assert await links.ensure(0, 10.0)
        again = await open_session(links, "s2")
        await run_units(links, "s2", again, 0, 2)
        await links.close()
    finally:
        await supervisor.stop()


async def test_the_worker_names_its_threads_for_per_thread_cpu() -> None:
    """`bench/e2e.py` splits a worker's CPU into its event loop ("ipc") and the mode thread ("mode")."""
    supervisor = await supervisor_with()
    try:
        links = WorkerLinks(supervisor.secret, shard_id=0)
        links.set_workers(targets(supervisor))
        assert await links.ensure(0)
        sink = await open_session(links, "named")
        assert sink.of(p.Opened)
        pid = supervisor.workers[0].pid
        names = {(task / "comm").read_text().strip() for task in Path(f"/proc/{pid}/task").iterdir()}
        assert {"ipc", "mode"} <= names, names
        await links.close()
    finally:
        await supervisor.stop()
