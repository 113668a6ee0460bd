"""Server-side management of worker processes: spawn, hello, heartbeats, restart, message routing.

The supervisor listens on 127.0.0.1 (an ephemeral port); each worker connects to it and says `hello`.
A worker on another host would connect the same way (listen address in config). Any local process can
connect, so a connection counts only once its `hello` proves the per-start secret (protocol.py) for the
worker id and pid the supervisor spawned; anything else is logged and closed, and does not touch the workers.
Heartbeats: a `ping` every `heartbeat_interval_s`; a worker silent for `heartbeat_timeout_s`, whose
connection drops, or whose process exits is killed and restarted after `restart_delay_s`. Its sessions get
`on_worker_lost` and the server closes them; other workers' sessions are untouched.

Data links: at `start()` the supervisor makes a private runtime directory (mode 0700, removed at `stop()`) and
starts each worker with `--listen <dir>/worker-<id>.sock` (`WorkerHandle.link_path`). Media shard processes
connect there themselves (`inference.links.WorkerLinks`), proving `secret`; the supervisor keeps the control
connection (hello, heartbeats, capacity, restarts) and the sessions it opens itself.

Used inside the server's event loop; nothing here blocks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from inference import protocol as p
from inference.processes import cancel_all, kill, terminate
from inference.settings import SupervisorSettings, WorkerSettings

log = logging.getLogger("inference.supervisor")
REPO_ROOT = Path(__file__).resolve().parent.parent


class SessionSink(Protocol):
    """The server side of one session, as the supervisor sees it."""

    def on_worker_message(self, message: p.Message, payload: bytes) -> None: ...

    def on_worker_lost(self, reason: str) -> None: ...


@dataclass
class WorkerHandle:
    worker_id: int
    gpu: int | None
    capacity: int
    up: bool = False
    pid: int | None = None
    restarts: int = 0
    modes: list[str] = field(default_factory=list)
    capacity_by_mode: dict[str, int] = field(default_factory=dict)
    capacity_source: str = "configured"  # where the numbers come from (inference/capacity.py)
    capacity_final: bool = True  # False while a GPU worker loads its model and sizes its caches
    process: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None
    last_pong: float = 0.0
    hello: asyncio.Future[None] | None = None
    sinks: dict[str, SessionSink] = field(default_factory=dict)
    dropped_units: int = 0
    link_path: str | None = None  # the worker's data-link Unix socket (media shards connect there)

    @property
    def device(self) -> str:
        return "cpu" if self.gpu is None else f"cuda:{self.gpu}"


def _private_dir() -> str:
    """A fresh directory only this user can enter, for the workers' Unix sockets. A socket path must fit in
    108 bytes: a long $TMPDIR falls back to /tmp."""
    path = tempfile.mkdtemp(prefix="minicpmo45-")
    if len(path) > 80:
        os.rmdir(path)
        path = tempfile.mkdtemp(prefix="minicpmo45-", dir="/tmp")
    os.chmod(path, 0o700)
    return path


class WorkerSupervisor:
    def __init__(
        self,
        settings: SupervisorSettings,
        worker_settings: WorkerSettings,
        on_workers_changed: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.worker_settings = worker_settings
        self.on_workers_changed = on_workers_changed
        gpus: list[int | None] = list(settings.gpus) or [None]
        self.workers = [
            WorkerHandle(i, gpu, settings.capacity_per_gpu if gpu is not None else settings.cpu_capacity)
            for i, gpu in enumerate(gpus)
        ]
        self._server: asyncio.Server | None = None
        self._port = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._seq = 0
        self._secret = b""
        self._link_dir: str | None = None

    @property
    def secret(self) -> bytes:
        """This start's worker secret: media shards prove it on the workers' data links (never log it)."""
        return self._secret

    @property
    def link_dir(self) -> str | None:
        return self._link_dir

    # ---- lifecycle ----

    async def start(self, wait_ready: bool = True) -> None:
        self._secret = secrets.token_bytes(32)
        self._link_dir = _private_dir()
        for worker in self.workers:
            worker.link_path = os.path.join(self._link_dir, f"worker-{worker.worker_id}.sock")
        self._server = await asyncio.start_server(self._on_connection, "127.0.0.1", 0)
        self._port = self._server.sockets[0].getsockname()[1]
        for worker in self.workers:
            self._tasks.append(
                asyncio.create_task(self._keep_alive(worker), name=f"worker-{worker.worker_id}")
            )
        self._tasks.append(asyncio.create_task(self._heartbeat(), name="worker-heartbeat"))
        if wait_ready:
            await self.wait_ready(self.settings.start_timeout_s)

    async def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not all(w.up for w in self.workers):
            if time.monotonic() > deadline:
                raise TimeoutError("workers did not start in time")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self._closing = True
        await cancel_all(self._tasks)
        for worker in self.workers:
            await self._terminate(worker)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._link_dir is not None:
            shutil.rmtree(self._link_dir, ignore_errors=True)
            self._link_dir = None

    # ---- sessions ----

    def attach(self, worker_id: int, session_id: str, sink: SessionSink) -> None:
        self.workers[worker_id].sinks[session_id] = sink

    def detach(self, worker_id: int, session_id: str) -> None:
        worker = self.workers[worker_id]
        if worker.sinks.pop(session_id, None) is not None:
            self.send(worker_id, p.CloseSession(session_id=session_id))

    def send(self, worker_id: int, message: p.BaseModel, payload: bytes = b"") -> bool:
        """Queue a message for a worker without waiting; False if the worker is down or too far behind."""
        worker = self.workers[worker_id]
        writer = worker.writer
        if not worker.up or writer is None or writer.is_closing():
            return False
        outcome = p.write_bounded(writer, message, payload)
        if outcome == "stalled":  # the connection loss restarts the worker
            self._kill(worker, f"not reading its connection (over {p.MAX_WRITE_BACKLOG >> 20} MiB unsent)")
        elif outcome == "dropped" and isinstance(message, p.Unit):  # a frame ahead goes with its unit instead
            self._count_dropped(worker, f"over {p.MAX_WRITE_BUFFER >> 20} MiB unsent")
        return outcome == "sent"

    # ---- internals ----

    def _command(self, worker: WorkerHandle) -> list[str]:
        listen = ["--listen", worker.link_path] if worker.link_path is not None else []
        return [
            sys.executable,
            "-m",
            "inference.worker",
            "--connect",
            f"127.0.0.1:{self._port}",
            "--worker-id",
            str(worker.worker_id),
            "--device",
            worker.device,
            "--settings",
            self.worker_settings.model_dump_json(),
            *listen,
        ]

    def _count_dropped(self, worker: WorkerHandle, why: str) -> None:
        worker.dropped_units += 1
        count = worker.dropped_units
        if count & (count - 1) == 0:  # the 1st, 2nd, 4th, ... drop: a flood must not flood the log
            log.warning("worker %d: unit dropped (%s); %d so far", worker.worker_id, why, count)

    def _env(self, worker: WorkerHandle) -> dict[str, str]:
        env = dict(os.environ)
        env[p.AUTH_ENV] = self._secret.hex()  # not in argv: any local user can read a command line
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env["CUDA_VISIBLE_DEVICES"] = "" if worker.gpu is None else str(worker.gpu)
        if worker.gpu is not None and self.worker_settings.model.expandable_segments:
            env.setdefault(
                "PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"
            )  # an operator's own setting wins
        return env

    async def _keep_alive(self, worker: WorkerHandle) -> None:
        """Run the worker process; whenever it ends, fail its sessions and start it again."""
        first = True
        while not self._closing:
            if not first:
                worker.restarts += 1
                await asyncio.sleep(self.settings.restart_delay_s)
            first = False
            worker.hello = asyncio.get_running_loop().create_future()
            try:
                worker.process = await asyncio.create_subprocess_exec(
                    *self._command(worker),
                    cwd=REPO_ROOT,
                    env=self._env(worker),
                    stdin=asyncio.subprocess.DEVNULL,
                )
            except OSError:
                log.exception("worker %d: cannot start", worker.worker_id)
                continue
            worker.pid = worker.process.pid
            log.info("worker %d: started pid %d on %s", worker.worker_id, worker.pid, worker.device)
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the task's cancellation
                # when the hello arrives at the same moment, and stop() would then wait for this task forever
                async with asyncio.timeout(self.settings.start_timeout_s):
                    await asyncio.shield(worker.hello)
            except TimeoutError:
                log.error(
                    "worker %d: no hello within %.0f s", worker.worker_id, self.settings.start_timeout_s
                )
                await self._terminate(worker)
            code = await worker.process.wait()
            if not self._closing:
                log.warning(
                    "worker %d: pid %d exited with %s; restarting", worker.worker_id, worker.pid, code
                )
            self._mark_down(worker, f"worker process exited ({code})")

    def _mark_down(self, worker: WorkerHandle, reason: str) -> None:
        was_up = worker.up
        worker.up = False
        if worker.writer is not None:
            worker.writer.close()
            worker.writer = None
        sinks = list(worker.sinks.values())
        worker.sinks.clear()
        for sink in sinks:
            try:
                sink.on_worker_lost(reason)
            except Exception:
                log.exception("worker %d: session cleanup failed", worker.worker_id)
        if was_up and self.on_workers_changed is not None:
            self.on_workers_changed()

    async def _terminate(self, worker: WorkerHandle) -> None:
        await terminate(worker.process, 3.0)

    def _kill(self, worker: WorkerHandle, why: str) -> None:
        log.error("worker %d: %s; killing pid %s", worker.worker_id, why, worker.pid)
        kill(worker.process)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            now = time.monotonic()
            for worker in self.workers:
                if not worker.up:
                    continue
                if now - worker.last_pong > self.settings.heartbeat_timeout_s:
                    self._kill(worker, f"no heartbeat for {now - worker.last_pong:.1f} s")
                    continue
                self._seq += 1
                self.send(worker.worker_id, p.Ping(seq=self._seq))

    async def _authenticate(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[WorkerHandle, p.Hello]:
        """Challenge a new connection; its first message must be a `hello` proving the secret for a worker
        we spawned and that is not up yet. Raises ProtocolError (or a read error) otherwise."""
        nonce = secrets.token_hex(32)
        writer.write(p.encode(p.Challenge(nonce=nonce)))
        first, _ = await p.read_message(reader, p.MAX_HELLO_BYTES, 0)
        if not isinstance(first, p.Hello):
            raise p.ProtocolError(f"first message is {first.type!r}, not hello")
        if not p.proof_ok(self._secret, nonce, first):
            raise p.ProtocolError(f"hello for worker {first.worker_id} without a valid proof")
        if not 0 <= first.worker_id < len(self.workers):
            raise p.ProtocolError(f"hello for unknown worker {first.worker_id}")
        if first.version != p.PROTOCOL_VERSION:
            raise p.ProtocolError(f"worker speaks protocol {first.version}, server {p.PROTOCOL_VERSION}")
        worker = self.workers[first.worker_id]
        if first.pid != worker.pid or worker.up:
            raise p.ProtocolError(f"unexpected hello from pid {first.pid} for worker {worker.worker_id}")
        return worker, first

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            worker, hello = await asyncio.wait_for(
                self._authenticate(reader, writer), self.settings.auth_timeout_s
            )
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, p.ProtocolError) as exc:
            why = str(exc) if isinstance(exc, p.ProtocolError) else f"no valid hello ({type(exc).__name__})"
            log.warning("worker connection from %s rejected: %s", peer, why)
            writer.close()
            return
        try:
            await self._serve_worker(worker, hello, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except p.ProtocolError as exc:
            log.error("worker %d: %s", worker.worker_id, exc)
        finally:
            writer.close()
            if worker.writer is writer and not self._closing:
                self._kill(worker, "connection lost")

    def _set_capacity(self, worker: WorkerHandle, report: p.CapacityOut) -> None:
        """The worker loaded its model and sized its caches: admission may use it now."""
        worker.capacity = report.sessions
        worker.capacity_by_mode = dict(report.by_mode)
        worker.capacity_source = report.source
        worker.capacity_final = True
        log.info(
            "worker %d: capacity %d sessions %s (%s)",
            worker.worker_id,
            report.sessions,
            report.by_mode or "",
            report.source,
        )
        if self.on_workers_changed is not None:
            self.on_workers_changed()

    async def _serve_worker(
        self,
        worker: WorkerHandle,
        hello: p.Hello,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        worker.writer = writer
        worker.modes = hello.modes
        # a worker that knows nothing better ("default") keeps the supervisor's configured number, if any
        if hello.capacity and (hello.capacity_source != "default" or worker.capacity < 1):
            worker.capacity = hello.capacity
            worker.capacity_source = hello.capacity_source
        worker.capacity_by_mode = dict(hello.capacity_by_mode)
        worker.capacity_final = hello.capacity_final
        worker.last_pong = time.monotonic()
        worker.up = True
        if worker.hello is not None and not worker.hello.done():
            worker.hello.set_result(None)
        log.info("worker %d: up (pid %d, modes %s)", worker.worker_id, hello.pid, ", ".join(hello.modes))
        if self.on_workers_changed is not None:
            self.on_workers_changed()
        while True:
            message, payload = await p.read_message(reader)
            if isinstance(message, p.Pong):
                worker.last_pong = time.monotonic()
                continue
            if isinstance(message, p.CapacityOut):
                self._set_capacity(worker, message)
                continue
            if isinstance(message, p.ErrorOut) and message.code == p.UNITS_DROPPED:
                worker.dropped_units += 1  # the worker dropped it from the session's full queue
            sid = getattr(message, "session_id", None)
            sink = worker.sinks.get(sid) if sid is not None else None
            if sink is None:
                continue
            if isinstance(message, p.Closed):
                worker.sinks.pop(sid, None)
            try:
                sink.on_worker_message(message, payload)
            except Exception:
                log.exception("worker %d: session %s failed on %s", worker.worker_id, sid, message.type)
