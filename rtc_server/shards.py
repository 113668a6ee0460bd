"""The front's side of the media shards: start them, authenticate them, talk to them, restart them.

Each shard is a `python -m media_shard` process that connects back to a listener on 127.0.0.1 and proves the
server's per-start secret (the same secret the workers use; it travels in the environment). The front places
each new call on the shard with the fewest calls, sends it the offer and returns the shard's answer; trickled
candidates and hang-ups go to the owning shard. A shard that dies loses its calls: the front frees their slots
(`on_lost`) and starts it again; the other shards' calls go on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from inference.processes import cancel_all, kill, terminate
from inference.protocol import AUTH_ENV, Challenge, ProtocolError
from media_shard import messages as m

log = logging.getLogger("rtc_server.shards")
REPO_ROOT = Path(__file__).resolve().parent.parent
REQUEST_TIMEOUT_S = 15.0
AUTH_TIMEOUT_S = 5.0


class ShardError(Exception):
    """A request to a shard failed: the shard refused it (`code`) or is gone."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class ShardHandle:
    shard_id: int
    up: bool = False
    pid: int | None = None
    restarts: int = 0
    process: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None
    hello: asyncio.Future[None] | None = None
    calls: set[str] = field(default_factory=set)  # ids of the calls placed here
    replies: dict[int, asyncio.Future[m.ShardMessage]] = field(default_factory=dict)
    stats: m.StatsSnapshot | None = None  # from the shard's last snapshot
    call_views: dict[str, m.CallSnapshot] = field(default_factory=dict)  # its live calls then, by id


class ShardEvents(Protocol):
    """What the front's manager does with a shard's news (implemented by `SessionManager`)."""

    def on_shard_message(self, shard: ShardHandle, message: m.ShardMessage) -> None: ...

    def on_shard_up(self, shard: ShardHandle) -> None: ...

    def on_shard_lost(self, shard: ShardHandle, calls: set[str]) -> None: ...


class ShardPool:
    def __init__(
        self,
        count: int,
        config_json: str,
        secret: bytes,
        events: ShardEvents,
        start_timeout_s: float = 60.0,
        restart_delay_s: float = 0.5,
    ) -> None:
        self.shards = [ShardHandle(i) for i in range(count)]
        self.config_json = config_json
        self.secret = secret
        self.events = events
        self.start_timeout_s = start_timeout_s
        self.restart_delay_s = restart_delay_s
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._port = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    # ---- lifecycle ----

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connection, "127.0.0.1", 0)
        self._port = self._server.sockets[0].getsockname()[1]
        for shard in self.shards:
            self._tasks.append(asyncio.create_task(self._keep_alive(shard), name=f"shard-{shard.shard_id}"))
        deadline = time.monotonic() + self.start_timeout_s
        while not all(s.up for s in self.shards):
            if time.monotonic() > deadline:
                raise TimeoutError("media shards did not start in time")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self._closing = True
        await cancel_all(self._tasks)
        for shard in self.shards:
            await self._terminate(shard)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    # ---- placing calls and talking to shards ----

    def choose(self) -> ShardHandle | None:
        """The up shard with the fewest calls (new calls spread evenly)."""
        up = [s for s in self.shards if s.up]
        return min(up, key=lambda s: len(s.calls)) if up else None

    def send(self, shard: ShardHandle, message: m.BaseModel) -> bool:
        writer = shard.writer
        if not shard.up or writer is None or writer.is_closing():
            return False
        writer.write(m.encode(message))
        return True

    def broadcast(self, message: m.BaseModel) -> None:
        for shard in self.shards:
            self.send(shard, message)

    def next_request_id(self) -> int:
        return next(self._ids)

    async def request(self, shard: ShardHandle, message: m.Offer | m.Trickle | m.Hangup) -> m.ShardMessage:
        """Send a request and wait for its answer; ShardError if refused, lost or late."""
        future: asyncio.Future[m.ShardMessage] = asyncio.get_running_loop().create_future()
        shard.replies[message.request_id] = future
        try:
            if not self.send(shard, message):
                raise ShardError("shard_unavailable", f"media shard {shard.shard_id} is not running")
            try:
                reply = await asyncio.wait_for(future, REQUEST_TIMEOUT_S)
            except TimeoutError:
                raise ShardError("shard_timeout", f"media shard {shard.shard_id} did not answer") from None
        finally:
            shard.replies.pop(message.request_id, None)
        if isinstance(reply, m.Refused):
            raise ShardError(reply.code, reply.message)
        return reply

    # ---- processes ----

    def _command(self, shard: ShardHandle) -> list[str]:
        return [
            sys.executable,
            "-m",
            "media_shard",
            "--connect",
            f"127.0.0.1:{self._port}",
            "--shard-id",
            str(shard.shard_id),
            "--config",
            self.config_json,
        ]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env[AUTH_ENV] = self.secret.hex()
        return env

    async def _keep_alive(self, shard: ShardHandle) -> None:
        first = True
        while not self._closing:
            if not first:
                shard.restarts += 1
                await asyncio.sleep(self.restart_delay_s)
            first = False
            shard.hello = asyncio.get_running_loop().create_future()
            try:
                shard.process = await asyncio.create_subprocess_exec(
                    *self._command(shard), cwd=REPO_ROOT, env=self._env(), stdin=asyncio.subprocess.DEVNULL
                )
            except OSError:
                log.exception("media shard %d: cannot start", shard.shard_id)
                continue
            shard.pid = shard.process.pid
            log.info("media shard %d: started pid %d", shard.shard_id, shard.pid)
            try:
                async with asyncio.timeout(self.start_timeout_s):  # not wait_for: see WorkerSupervisor
                    await asyncio.shield(shard.hello)
            except TimeoutError:
                log.error("media shard %d: no hello in time", shard.shard_id)
                await self._terminate(shard)
            code = await shard.process.wait()
            if not self._closing:
                log.warning(
                    "media shard %d: pid %d exited with %s; restarting", shard.shard_id, shard.pid, code
                )
            self._mark_down(shard)

    def _mark_down(self, shard: ShardHandle) -> None:
        shard.up = False
        if shard.writer is not None:
            shard.writer.close()
            shard.writer = None
        for future in shard.replies.values():
            if not future.done():
                future.set_exception(ShardError("shard_lost", f"media shard {shard.shard_id} stopped"))
        shard.replies.clear()
        calls, shard.calls = shard.calls, set()
        shard.stats, shard.call_views = None, {}
        if calls and not self._closing:
            self.events.on_shard_lost(shard, calls)

    async def _terminate(self, shard: ShardHandle) -> None:
        await terminate(shard.process, 5.0)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        shard: ShardHandle | None = None
        try:
            nonce = secrets.token_hex(16)
            writer.write(m.encode(Challenge(nonce=nonce)))
            hello = await asyncio.wait_for(m.read_hello(reader), AUTH_TIMEOUT_S)
            shard = self._authenticate(hello, nonce)
            if shard is None:
                return
            shard.writer = writer
            shard.up = True
            if shard.hello is not None and not shard.hello.done():
                shard.hello.set_result(None)
            log.info("media shard %d: up (pid %d)", shard.shard_id, shard.pid)
            self.events.on_shard_up(shard)
            while True:
                message = await m.read(reader)
                self._dispatch(shard, message)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        except ProtocolError as exc:
            log.error("media shard connection: %s", exc)
        finally:
            writer.close()
            if shard is not None and shard.writer is writer and not self._closing:
                self._kill(shard, "connection lost")

    def _authenticate(self, hello: m.ShardMessage, nonce: str) -> ShardHandle | None:
        if not isinstance(hello, m.ShardHello) or not 0 <= hello.shard_id < len(self.shards):
            log.error("media shard connection rejected: expected a hello from a known shard")
            return None
        shard = self.shards[hello.shard_id]
        if hello.pid != shard.pid or shard.up or not m.proof_ok(self.secret, nonce, hello):
            log.error("media shard connection rejected: bad proof or claim (shard %d)", hello.shard_id)
            return None
        return shard

    def _dispatch(self, shard: ShardHandle, message: m.ShardMessage) -> None:
        if isinstance(message, m.Answer | m.Done | m.Refused):
            future = shard.replies.get(message.request_id)
            if future is not None and not future.done():
                future.set_result(message)
            return
        if isinstance(message, m.Snapshot):
            shard.stats = message.stats
            shard.call_views = {c.session_id: c for c in message.calls}
            return
        self.events.on_shard_message(shard, message)

    def _kill(self, shard: ShardHandle, why: str) -> None:
        log.error("media shard %d: %s; killing pid %s", shard.shard_id, why, shard.pid)
        kill(shard.process)


def default_media_procs(gpus: list[int], cpu_count: int | None = None) -> int:
    """Media shards when `workers.media_procs` is 0: none on the CPU default (calls stay in the front process);
    with GPUs, one shard per 16 calls the GPUs may hold (64 each, the H100 figure), at most the cores left
    after one per worker and one for the front."""
    if not gpus:
        return 0
    cores = cpu_count or os.cpu_count() or 2
    wanted = -(-64 * len(gpus) // 16)
    return max(1, min(wanted, cores - len(gpus) - 1))
