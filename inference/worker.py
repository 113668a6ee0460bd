"""The worker process: serves the sessions the server assigns to it, one mode instance per session.

Started by `inference.supervisor.WorkerSupervisor` as `python -m inference.worker --connect HOST:PORT ...`;
it connects to the server, answers its challenge with `hello` (proving the secret from its environment),
then handles `open`/`unit`/`control`/`close` messages (queued per session, bounded: `SessionQueue`) and
answers `ping` at once. Mode code runs in a single worker thread (one model per process; GPU work never runs
in the IPC loop), so heartbeats keep flowing while a mode is busy. Units of modes that batch (`on_units`,
the duplex modes) go through `UnitTicker`: each tick takes the waiting unit of every such session and runs
them as one call, so N sessions cost one batched model pass per tick instead of N passes. This module must
never import aiortc; heavy imports (torch, the engine) happen lazily inside the modes that need them.

With `--listen PATH` the worker also serves data links on a Unix socket (mode 0600): each media shard
connects, proves the same secret (`link_hello`) and then sends its sessions' messages itself; a session's
outputs go back on the connection that opened it (`Sessions`), and a link that closes ends its sessions.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import secrets
import socket
import stat
import struct
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference import protocol as p
from inference.capacity import WorkerCapacity
from inference.modes import create_mode, load_extra_modes, mode_names
from inference.modes.base import (
    DEFAULT_TICK_PHASES,
    Flush,
    Mode,
    ModeError,
    Output,
    SessionOptions,
    Speech,
    State,
    Text,
    UnitInput,
    UnitTimings,
    UserTurn,
    batch_runner,
)
from inference.processes import name_this_thread
from MiniCPMO45.audio.rates import MODEL_INPUT_RATE, SPEECH_RATE

log = logging.getLogger("inference.worker")
DEFAULT_GATHER_S = 0.06  # how long a tick waits for the other sessions' units of the same grid line
# A healthy session has a unit or two waiting; one this far behind has lost its real-time flow anyway.
MAX_QUEUED_UNITS = 64
MAX_QUEUED_CONTROLS = 64  # controls and opens waiting in one session
LINK_AUTH_TIMEOUT_S = 5.0  # a data link must answer the challenge within this
SESSION_MESSAGES = (p.OpenSession, p.Unit, p.Control, p.CloseSession)


class Connection:
    """Writes messages to a peer (the server's control connection or a data link); event loop only. Once the
    peer is gone, sends are dropped: what a session still says has nobody to go to."""

    def __init__(self, writer: asyncio.StreamWriter, name: str = "server") -> None:
        self._writer = writer
        self.name = name
        self.closed = False

    async def send(self, message: p.BaseModel, payload: bytes = b"") -> None:
        if self.closed or self._writer.is_closing():
            self.closed = True
            return
        self._writer.write(p.encode(message, payload))
        try:
            await self._writer.drain()
        except ConnectionError:
            self.closed = True


@dataclass
class _Waiting:
    mode: Mode
    unit: UnitInput
    frame: Any
    phase: int
    done: asyncio.Future[list[Output]]


class UnitTicker:
    """The worker's tick loop for batching modes: the units waiting when a tick starts run together.

    Each session has at most one unit waiting (its runner awaits the result before it takes its next
    message), so a tick holds one unit per session. The batching sessions are spread evenly over `phases`
    grids, shifted by 1/phases of a unit: the server cuts a session's units on its phase's grid, so the units
    of one phase arrive within a few tens of ms of each other, and the phases take turns on the GPU. A tick
    holds about 1/phases of the sessions, and so finishes sooner than one tick of all of them would (a
    tick's cost grows less than its batch; with two phases each must fit in half a unit). A tick starts once
    every session of each phase that has a unit waiting has one waiting, or `gather_s` after the first one
    arrived, whichever comes first; units arriving later go into the next tick (a late phase catches up in
    the other phase's tick). A failure fails the units of that tick (their sessions end with `mode_error`)."""

    def __init__(
        self,
        executor: concurrent.futures.Executor,
        members: Callable[[], list[tuple[int, Any]]],
        gather_s: float = DEFAULT_GATHER_S,
        phases: int = 1,
    ) -> None:
        if phases < 1:
            raise ValueError("phases must be at least 1")
        self.executor = executor
        self.members = members  # (phase, `batch_runner`) of each open session whose mode batches
        self.phase_of: dict[str, int] = {}  # every batching session's phase, taken before its mode opens
        self.gather_s = gather_s
        self.phases = phases
        self.waiting: list[_Waiting] = []
        self.wake = asyncio.Event()
        self.ticks = 0
        self.task = asyncio.create_task(self._run(), name="unit-ticker")

    def join(self, session_id: str) -> int:
        """The session's phase: the one it has, else the phase with the fewest sessions."""
        if session_id not in self.phase_of:
            counts = [0] * self.phases
            for phase in self.phase_of.values():
                counts[phase] += 1
            self.phase_of[session_id] = counts.index(min(counts))
        return self.phase_of[session_id]

    def leave(self, session_id: str) -> None:
        self.phase_of.pop(session_id, None)

    def grid_offset_s(self, phase: int, unit_s: float) -> float:
        return phase * unit_s / self.phases

    def _gathered(self) -> bool:
        """Every session of each (phase, mode class) that has a unit waiting has one waiting: modes with units
        of other lengths (chat's 320 ms beside duplex's 1 s) are not waited for."""
        members = self.members()
        keys = [(w.phase, batch_runner(w.mode)) for w in self.waiting]
        return all(keys.count(key) >= members.count(key) for key in set(keys))

    async def _gather(self) -> None:
        deadline = time.monotonic() + self.gather_s
        while not self._gathered() and (left := deadline - time.monotonic()) > 0:
            self.wake.clear()
            try:
                async with asyncio.timeout(left):  # not wait_for: it can lose a cancellation (Python 3.11)
                    await self.wake.wait()
            except TimeoutError:
                break

    async def submit(self, mode: Mode, unit: UnitInput, frame: Any, phase: int = 0) -> list[Output]:
        done: asyncio.Future[list[Output]] = asyncio.get_running_loop().create_future()
        self.waiting.append(_Waiting(mode, unit, frame, phase, done))
        self.wake.set()
        return await done

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            await self._gather()
            self.wake.clear()
            batch, self.waiting = self.waiting, []
            groups: dict[Any, list[_Waiting]] = {}
            for item in batch:
                if not item.done.done():  # its session went away while it waited
                    groups.setdefault(batch_runner(item.mode), []).append(item)
            # the deadline-bound units first (duplex: a unit a second), then the modes that only need to keep
            # ahead of what their callers hear (chat replies: `tick_priority` 1)
            ordered = sorted(groups.items(), key=lambda g: getattr(type(g[1][0].mode), "tick_priority", 0))
            for run, items in ordered:
                self.ticks += 1
                try:
                    outs = await loop.run_in_executor(
                        self.executor, run, [(w.mode, w.unit, w.frame) for w in items]
                    )
                except Exception as exc:
                    log.exception("tick of %d units failed", len(items))
                    for w in items:
                        if not w.done.done():
                            w.done.set_exception(exc)
                    continue
                for w, out in zip(items, outs, strict=True):
                    if not w.done.done():
                        w.done.set_result(out)


Queued = tuple[p.Message, bytes, float]  # message, payload, when it was received


class SessionQueue:
    """A session's messages waiting for its runner, in order, bounded: a unit past `max_units` pushes out the
    oldest waiting unit (fresh audio matters more than stale), a control or open past `max_controls` is
    refused (a state change must not jump ahead of earlier ones); the end marker always goes in."""

    def __init__(self, max_units: int = MAX_QUEUED_UNITS, max_controls: int = MAX_QUEUED_CONTROLS) -> None:
        self.max_units = max_units
        self.max_controls = max_controls
        self.units = 0
        self.controls = 0
        self._items: deque[Queued | None] = deque()
        self._ready = asyncio.Event()

    def put(self, item: Queued) -> p.Message | None:
        """Queue a message; returns the message dropped to respect the bounds, if any."""
        message = item[0]
        dropped: p.Message | None = None
        if isinstance(message, p.Unit):
            if self.units >= self.max_units:
                dropped = self._drop_oldest_unit()
            self.units += 1
        elif self.controls >= self.max_controls:
            return message
        else:
            self.controls += 1
        self._items.append(item)
        self._ready.set()
        return dropped

    def end(self) -> None:
        self._items.append(None)
        self._ready.set()

    def abort(self) -> None:
        """End now: what is still waiting is dropped (its peer is gone), then the end marker."""
        self._items.clear()
        self.units = self.controls = 0
        self.end()

    async def get(self) -> Queued | None:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if item is not None:
            if isinstance(item[0], p.Unit):
                self.units -= 1
            else:
                self.controls -= 1
        return item

    def _drop_oldest_unit(self) -> p.Message:
        for i, item in enumerate(self._items):
            if item is not None and isinstance(item[0], p.Unit):
                del self._items[i]
                self.units -= 1
                return item[0]
        raise AssertionError("no unit queued")


class SessionRunner:
    """Feeds one session's messages to its mode, in order, in the mode thread."""

    def __init__(
        self,
        session_id: str,
        conn: Connection,
        executor: concurrent.futures.Executor,
        ticker: UnitTicker,
        settings: dict[str, Any],
    ) -> None:
        self.session_id = session_id
        self.conn = conn
        self.executor = executor
        self.ticker = ticker
        self.settings = settings
        self.mode: Mode | None = None
        self.phase: int | None = None  # the ticker's phase while the mode batches
        self.output_rate = SPEECH_RATE
        self.queue = SessionQueue()
        self.dropped = 0  # messages the full queue dropped
        self.task = asyncio.create_task(self._run(), name=f"session-{session_id}")

    def submit(self, message: p.Message, payload: bytes, received_at: float) -> p.ErrorOut | None:
        """Queue a message; returns the notice for the session when its full queue dropped one."""
        dropped = self.queue.put((message, payload, received_at))
        if dropped is None:
            return None
        self.dropped += 1
        if self.dropped & (self.dropped - 1) == 0:  # the 1st, 2nd, 4th, ...: a flood must not flood the log
            log.warning(
                "session %s: queue full, %s dropped; %d so far", self.session_id, dropped.type, self.dropped
            )
        if isinstance(dropped, p.Unit):
            return p.ErrorOut(
                session_id=self.session_id,
                code=p.UNITS_DROPPED,
                message=f"unit {dropped.index} dropped: the session is {self.queue.max_units} units behind",
            )
        return p.ErrorOut(
            session_id=self.session_id,
            code=p.CONTROLS_DROPPED,
            message=f"{dropped.type} message dropped: {self.queue.max_controls} messages are waiting",
        )

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _run(self) -> None:
        try:
            while (item := await self.queue.get()) is not None:
                message, payload, received_at = item
                try:
                    await self._handle(message, payload, received_at)
                except Exception as exc:  # a mode failure ends this session only
                    log.exception("session %s: mode failed", self.session_id)
                    await self.conn.send(
                        p.ErrorOut(
                            session_id=self.session_id, code="mode_error", message=str(exc) or repr(exc)
                        )
                    )
                    break
        finally:
            self.ticker.leave(self.session_id)
            await self._close_mode()
            await self.conn.send(p.Closed(session_id=self.session_id))

    async def _close_mode(self) -> None:
        if self.mode is not None:
            mode, self.mode = self.mode, None
            try:
                await self._call(mode.close)
            except Exception:
                log.exception("session %s: close failed", self.session_id)

    async def _handle(self, message: p.Message, payload: bytes, received_at: float) -> None:
        if isinstance(message, p.OpenSession):
            opening = time.monotonic()
            await self._close_mode()  # a second `open` switches the mode
            try:
                mode = create_mode(message.mode, self.settings)
            except KeyError as exc:
                await self.conn.send(
                    p.ErrorOut(session_id=self.session_id, code="unknown_mode", message=str(exc))
                )
                return
            phase = None
            if batch_runner(mode) is not None:  # a batching session keeps its phase across mode switches
                phase = self.ticker.join(self.session_id)
            else:
                self.ticker.leave(self.session_id)
            options = SessionOptions(
                session_id=self.session_id,
                system_prompt=message.options.get("system_prompt"),
                extra=message.options,
                voice=message.options.get("voice"),
                tick_phase=phase or 0,
            )
            setup, outputs = await self._call(mode.open, options)
            self.phase = phase
            self.mode = mode
            self.output_rate = setup.output_rate
            offset = 0.0
            if setup.align_units and self.phase is not None:
                offset = self.ticker.grid_offset_s(self.phase, setup.unit_samples / MODEL_INPUT_RATE)
            await self.conn.send(
                p.Opened(
                    session_id=self.session_id,
                    mode=message.mode,
                    unit_samples=setup.unit_samples,
                    first_unit_samples=setup.first_unit_samples,
                    output_rate=setup.output_rate,
                    video_max_side=setup.video_max_side,
                    align_units=setup.align_units,
                    grid_offset_s=offset,
                    open_ms=(time.monotonic() - opening) * 1000,
                )
            )
            await self._send_outputs(outputs, self.output_rate)
        elif self.mode is None:
            return  # units or controls before a successful open are dropped
        elif isinstance(message, p.Unit):
            pcm, frame = p.split_unit_payload(message, payload)
            started = time.monotonic()
            backlog = self.queue.units
            unit = UnitInput(message.index, pcm, message.completed_at, queued_units=backlog)
            if batch_runner(self.mode) is not None:
                outputs = await self.ticker.submit(self.mode, unit, frame, self.phase or 0)
            else:
                outputs = await self._call(self.mode.on_unit, unit, frame)
            compute_ms = (time.monotonic() - started) * 1000
            timings: dict[str, float] = {}
            for out in outputs:
                if isinstance(out, UnitTimings):
                    timings.update({k: round(float(v), 3) for k, v in out.values.items()})
            await self._send_outputs(outputs, self.output_rate)
            await self.conn.send(
                p.UnitDone(
                    session_id=self.session_id,
                    index=message.index,
                    completed_at=message.completed_at,
                    handoff_ms=(received_at - message.completed_at) * 1000,
                    compute_ms=compute_ms,
                    queue_ms=(started - received_at) * 1000,
                    backlog_units=backlog,
                    timings=timings,
                )
            )
        elif isinstance(message, p.Control):
            outputs = await self._call(self.mode.on_control, message.message)
            await self._send_outputs(outputs, self.output_rate)

    async def _send_outputs(self, outputs: list[Output], output_rate: int) -> None:
        sid = self.session_id
        for out in outputs:
            if isinstance(out, Speech):
                await self.conn.send(
                    p.AudioOut(session_id=sid, turn=out.turn, sample_rate=output_rate, play_at=out.play_at),
                    p.pcm_to_bytes(out.pcm),
                )
            elif isinstance(out, Text):
                await self.conn.send(p.TextOut(session_id=sid, turn=out.turn, text=out.text))
            elif isinstance(out, UserTurn):
                await self.conn.send(
                    p.UserTurnOut(
                        session_id=sid, turn=out.turn, seconds=out.seconds, text=out.text, started=out.started
                    )
                )
            elif isinstance(out, State):
                await self.conn.send(p.StateOut(session_id=sid, state=out.state))
            elif isinstance(out, Flush):
                await self.conn.send(p.FlushOut(session_id=sid, turn=out.turn))
            elif isinstance(out, ModeError):
                await self.conn.send(p.ErrorOut(session_id=sid, code=out.code, message=out.message))


def planned_capacity(settings: dict[str, Any]) -> WorkerCapacity:
    """The capacity known before the model loads (no torch import): the operator's table or number, else one
    session until the preloading GPU worker has measured its card and memory."""
    from inference.capacity import planned_capacity as plan  # pydantic only, no torch

    configured = settings.get("max_sessions")
    return plan(
        explicit_table=str(settings.get("capacity_table") or ""),
        configured=int(configured) if configured else None,
        card=None,
        context=int(settings.get("max_kv_tokens", 4096)),
        modes=mode_names(),
    )


def wants_preload(settings: dict[str, Any], device: str) -> bool:
    """Preload on a worker whose GPU is really there (`preload_engine` in the settings overrides). Checked
    without importing torch (seconds of import with the GIL held would stall this process's IPC loop): a
    worker given a GPU id on a machine without the NVIDIA driver (tests) keeps its mode thread free."""
    if "preload_engine" in settings:
        return bool(settings["preload_engine"])
    return device.startswith("cuda") and Path("/dev/nvidiactl").exists()


def preload_engine(settings: dict[str, Any]) -> WorkerCapacity | None:
    """Load the model, size its caches to the card's memory and capture the duplex graphs (compiling their
    attention kernels) now, on the mode thread, so the first call does not wait for them. Returns the
    capacity the worker then holds; None if preloading failed (logged; the first session tries again and
    reports the error)."""
    try:
        from inference.engine_host import get_host  # torch and the model: only where they are used

        host = get_host(settings)
        host.duplex_batcher()
        return host.capacity
    except Exception:
        log.exception("preloading the engine failed; the first session will try again")
        return None


async def report_capacity(
    conn: Connection, executor: concurrent.futures.Executor, settings: dict[str, Any], plan: WorkerCapacity
) -> None:
    """Preload on the mode thread, then tell the server the capacity the worker holds (the plan if
    preloading failed: the first session then reports the error)."""
    loop = asyncio.get_running_loop()
    capacity = await loop.run_in_executor(executor, preload_engine, settings) or plan
    await conn.send(p.CapacityOut(**capacity.model_dump()))


class Sessions:
    """The worker's sessions, whichever connection opened them. Session ids are unique across connections; a
    session belongs to the connection whose `open` created it: its outputs go back there, and a message about
    it from another connection is ignored."""

    def __init__(self, executor: concurrent.futures.Executor, settings: dict[str, Any]) -> None:
        self.executor = executor
        self.settings = settings
        self.runners: dict[str, SessionRunner] = {}
        self.ticker = UnitTicker(
            executor,
            self.batching_phases,
            float(settings.get("tick_gather_s", DEFAULT_GATHER_S)),
            int(settings.get("tick_phases", DEFAULT_TICK_PHASES)),
        )

    def batching_phases(self) -> list[tuple[int, Any]]:
        return [
            (r.phase, batch_runner(r.mode))
            for r in self.runners.values()
            if r.mode is not None and r.phase is not None and batch_runner(r.mode) is not None
        ]

    async def handle(self, conn: Connection, message: p.Message, payload: bytes, received_at: float) -> None:
        """One message read from `conn`: a ping is answered, a session message goes to its session."""
        if isinstance(message, p.Ping):
            await conn.send(p.Pong(seq=message.seq))
            return
        if not isinstance(message, SESSION_MESSAGES):
            return
        sid = message.session_id
        runner = self.runners.get(sid)
        if runner is not None and not runner.task.done() and runner.conn is not conn:
            log.debug(
                "session %s belongs to %s: %s from %s ignored", sid, runner.conn.name, message.type, conn.name
            )
            return
        if runner is None or runner.task.done():
            if not isinstance(message, p.OpenSession):
                return
            runner = self.runners[sid] = SessionRunner(sid, conn, self.executor, self.ticker, self.settings)
            runner.task.add_done_callback(lambda _t, sid=sid, r=runner: self._forget(sid, r))
        if isinstance(message, p.CloseSession):
            runner.queue.end()
        elif (notice := runner.submit(message, payload, received_at)) is not None:
            await conn.send(notice)

    def _forget(self, sid: str, runner: SessionRunner) -> None:
        if self.runners.get(sid) is runner:  # not a newer session of the same id
            del self.runners[sid]

    def end_owned(self, conn: Connection) -> int:
        """The connection is gone: its sessions end now (their modes close, freeing their KV slots)."""
        owned = [r for r in self.runners.values() if r.conn is conn and not r.task.done()]
        for runner in owned:
            runner.queue.abort()
        return len(owned)

    def end_all(self) -> None:
        for runner in list(self.runners.values()):
            runner.queue.end()


def bind_private_socket(path: str) -> socket.socket:
    """A listening Unix socket at `path`, mode 0600 before it listens (nobody connects to a looser one)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # a previous worker's socket (killed before it could remove it)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _peer_pid(writer: asyncio.StreamWriter) -> int | None:
    """The connecting process's pid as the kernel saw it (Linux SO_PEERCRED); None where unknown."""
    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return None
    return struct.unpack("3i", creds)[0] or None


async def authenticate_link(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes
) -> p.LinkHello:
    """Challenge a new data link; its first message must be a `link_hello` proving the secret, for the pid
    that really connected. Raises ProtocolError (or a read error) otherwise."""
    nonce = secrets.token_hex(32)
    writer.write(p.encode(p.Challenge(nonce=nonce)))
    first, _ = await p.read_message(reader, p.MAX_HELLO_BYTES, 0)
    if not isinstance(first, p.LinkHello):
        raise p.ProtocolError(f"first message is {first.type!r}, not link_hello")
    if first.version != p.PROTOCOL_VERSION:
        raise p.ProtocolError(f"peer speaks protocol {first.version}, worker {p.PROTOCOL_VERSION}")
    if not p.link_proof_ok(secret, nonce, first):
        raise p.ProtocolError(f"link_hello of shard {first.shard_id} without a valid proof")
    peer = _peer_pid(writer)
    if peer is not None and peer != first.pid:
        raise p.ProtocolError(f"link_hello claims pid {first.pid}, the peer is pid {peer}")
    return first


class LinkServer:
    """The worker's data links: a Unix socket server whose authenticated connections carry sessions."""

    def __init__(self, path: str, secret: bytes, sessions: Sessions) -> None:
        self.path = path
        self.secret = secret
        self.sessions = sessions
        self.writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._inode: int | None = None

    async def start(self) -> None:
        sock = bind_private_socket(self.path)
        self._inode = os.stat(self.path).st_ino
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        log.info("data links on %s", self.path)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self.writers):
            writer.close()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:  # ours, not a newer worker's
                os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await asyncio.wait_for(
                authenticate_link(reader, writer, self.secret), LINK_AUTH_TIMEOUT_S
            )
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, p.ProtocolError) as exc:
            why = (
                str(exc)
                if isinstance(exc, p.ProtocolError)
                else f"no valid link_hello ({type(exc).__name__})"
            )
            log.warning("data link rejected: %s", why)
            writer.close()
            return
        conn = Connection(writer, f"link of shard {hello.shard_id} (pid {hello.pid})")
        self.writers.add(writer)
        log.info("%s: up", conn.name)
        try:
            while True:
                message, payload = await p.read_message(reader)
                await self.sessions.handle(conn, message, payload, time.monotonic())
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except p.ProtocolError as exc:
            log.warning("%s: %s; closing it", conn.name, exc)
        finally:
            conn.closed = True
            self.writers.discard(writer)
            writer.close()
            ended = self.sessions.end_owned(conn)
            log.info("%s: closed, %d sessions ended", conn.name, ended)


async def serve(
    host: str,
    port: int,
    worker_id: int,
    device: str,
    settings: dict[str, Any],
    secret: bytes | None = None,
    listen: str | None = None,
) -> None:
    """Serve the server at host:port. With `secret`, the server's challenge comes first and the hello proves
    the secret; without, the hello goes first, unproven (a test server that does not check). With `listen`
    (and `secret`), data links are served on that Unix socket path as well."""
    plan = planned_capacity(settings)
    preload = wants_preload(settings, device)
    settings = {**settings, "device": device}
    name_this_thread("ipc")  # the event loop: the server connection, the data links, the session runners
    executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="mode", initializer=name_this_thread, initargs=("mode",)
    )
    sessions = Sessions(executor, settings)
    links: LinkServer | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        if listen is not None and secret is None:
            log.error("no secret: data links on %s are not served", listen)
        elif listen is not None and secret is not None:
            links = LinkServer(listen, secret, sessions)
            try:
                await links.start()
            except OSError:  # the control connection still serves: the in-process media mode works
                log.exception("cannot serve data links on %s", listen)
                links = None
        reader, writer = await asyncio.open_connection(host, port)
        conn = Connection(writer)
        proof = ""
        if secret is not None:
            challenge, _ = await p.read_message(reader, p.MAX_HELLO_BYTES, 0)
            if not isinstance(challenge, p.Challenge):
                raise p.ProtocolError(f"expected the server's challenge, got {challenge.type!r}")
            proof = p.hello_proof(secret, challenge.nonce, worker_id, os.getpid())
        await conn.send(
            p.Hello(
                worker_id=worker_id,
                pid=os.getpid(),
                device=device,
                modes=mode_names(),
                capacity=plan.sessions,
                capacity_by_mode=plan.by_mode,
                capacity_source=plan.source,
                capacity_final=not preload,
                proof=proof,
            )
        )
        if preload:
            asyncio.create_task(report_capacity(conn, executor, settings, plan), name="preload")
        while True:
            try:
                message, payload = await p.read_message(reader)
            except asyncio.IncompleteReadError:
                return  # the server went away: nothing left to serve
            await sessions.handle(conn, message, payload, time.monotonic())
    finally:
        if links is not None:
            links.close()
        sessions.end_all()
        sessions.ticker.task.cancel()
        executor.shutdown(wait=False, cancel_futures=True)
        if writer is not None:
            writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="MiniCPM-o 4.5 inference worker (started by the server)")
    parser.add_argument("--connect", required=True, help="HOST:PORT of the server's worker listener")
    parser.add_argument("--worker-id", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--settings", default="{}", help="JSON settings for the modes")
    parser.add_argument("--listen", default=None, help="Unix socket path to serve data links on (mode 0600)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"worker{args.worker_id} %(levelname)s %(message)s")
    # out of the environment of anything this process starts; a worker without it is refused by the server
    secret = bytes.fromhex(os.environ.pop(p.AUTH_ENV, "")) or None
    load_extra_modes()
    host, _, port = args.connect.rpartition(":")
    settings = json.loads(args.settings)
    try:
        asyncio.run(serve(host, int(port), args.worker_id, args.device, settings, secret, args.listen))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
