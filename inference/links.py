"""Data links: a media shard's own connections to the workers, beside the supervisor's control connection.

A worker started with `--listen PATH` (the supervisor does that, `WorkerHandle.link_path`) serves a Unix
socket there. `WorkerLinks` runs inside a media shard process (its asyncio loop): for each worker that is up it
keeps one link open, proving the supervisor's secret (the front hands it to the shard in its environment):

    worker -> challenge(nonce);  shard -> link_hello(shard_id, pid, link_proof(...)), ping;  worker -> pong

The link is open once that `pong` arrives (the worker has accepted the hello). It then carries session
messages exactly like the control connection: the shard sends `open`/`unit`/`control`/`close`, the worker
answers on the same link (a session belongs to the connection that opened it). The interface mirrors
`WorkerSupervisor.attach/detach/send`, with the same `SessionSink`s. A link that drops (the worker died, or
was marked down by `set_workers`) loses its sessions: each sink gets `on_worker_lost` and is removed; the
worker ends those sessions on its side too (their KV slots are freed).

Nothing here blocks: `send` queues bytes on the transport (`protocol.write_bounded`: units are dropped past
`MAX_WRITE_BUFFER` unsent, a link past `MAX_WRITE_BACKLOG` is aborted), reading and reconnecting run in one task per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass

from pydantic import BaseModel

from inference import protocol as p
from inference.supervisor import SessionSink

log = logging.getLogger("inference.links")
LINK_TIMEOUT_S = 5.0  # connect, challenge, hello and the first pong
RETRY_MIN_S = 0.05
RETRY_MAX_S = 1.0
LINK_LOST = "worker link lost"


class LinkTarget(BaseModel):
    """A worker as the front tells its shards: where its data link is and whether it is up."""

    worker_id: int
    path: str | None = None
    up: bool = False


@dataclass(eq=False)
class _Link:
    worker_id: int
    path: str
    writer: asyncio.StreamWriter | None = None  # set while the link is authenticated and open
    task: asyncio.Task[None] | None = None
    closed: bool = False  # no longer wanted: stop reconnecting

    @property
    def open(self) -> bool:
        return self.writer is not None and not self.writer.is_closing()


class WorkerLinks:
    """A media shard's data links to the workers (see the module doc). Event loop only."""

    def __init__(self, secret: bytes, shard_id: int) -> None:
        self._secret = secret
        self.shard_id = shard_id
        self._links: dict[int, _Link] = {}
        self._sinks: dict[int, dict[str, SessionSink]] = {}
        self._changed = asyncio.Event()  # set (and replaced) whenever a link opens or the targets change
        self._closing = False
        # units dropped on the way to a worker: here (its link too far behind) or in its full session queue
        self.dropped_units = 0
        self.dropped_by_worker: dict[int, int] = {}

    # ---- workers ----

    def set_workers(self, workers: list[LinkTarget]) -> None:
        """The workers as they are now: links to workers that went down, moved or vanished are closed (their
        sinks get `on_worker_lost`); an up worker without a link gets one (retrying while it is wanted)."""
        if self._closing:
            return
        wanted = {w.worker_id: w for w in workers if w.up and w.path}
        for worker_id, link in list(self._links.items()):
            target = wanted.get(worker_id)
            if target is None or target.path != link.path:
                self._drop(link, "worker down" if target is None else "worker moved")
        for worker_id, target in wanted.items():
            if worker_id not in self._links:
                assert target.path is not None
                link = self._links[worker_id] = _Link(worker_id, target.path)
                link.task = asyncio.create_task(self._run(link), name=f"worker-link-{worker_id}")
        self._notify()

    def up(self, worker_id: int) -> bool:
        link = self._links.get(worker_id)
        return link is not None and link.open

    async def ensure(self, worker_id: int, timeout: float = 5.0) -> bool:
        """Wait until the worker's link is authenticated and open; False if it is not within `timeout` (or
        the worker is not wanted: `set_workers` did not list it as up)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.up(worker_id):
            left = deadline - loop.time()
            if left <= 0 or self._closing or worker_id not in self._links:
                return self.up(worker_id)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):  # not wait_for: it can lose a cancellation (Python 3.11)
                    await self._changed.wait()
        return True

    # ---- sessions ----

    def attach(self, worker_id: int, session_id: str, sink: SessionSink) -> None:
        self._sinks.setdefault(worker_id, {})[session_id] = sink

    def detach(self, worker_id: int, session_id: str) -> None:
        if self._sinks.get(worker_id, {}).pop(session_id, None) is not None:
            self.send(worker_id, p.CloseSession(session_id=session_id))

    def send(self, worker_id: int, message: p.BaseModel, payload: bytes = b"") -> bool:
        """Queue a message on the worker's link without waiting; False if the link is not open or too far
        behind (a unit past `MAX_WRITE_BUFFER` unsent is dropped and counted in `dropped_units`)."""
        link = self._links.get(worker_id)
        if link is None or not link.open:
            return False
        writer = link.writer
        assert writer is not None
        outcome = p.write_bounded(writer, message, payload)
        if outcome == "stalled":  # the reader sees the loss and ends the sessions
            log.error(
                "worker %d: link not read (over %d MiB unsent); closed", worker_id, p.MAX_WRITE_BACKLOG >> 20
            )
        elif outcome == "dropped" and isinstance(message, p.Unit):  # a frame ahead goes with its unit instead
            self._count_dropped(worker_id, f"over {p.MAX_WRITE_BUFFER >> 20} MiB unsent")
        return outcome == "sent"

    async def close(self) -> None:
        """Close every link; attached sinks get `on_worker_lost`."""
        self._closing = True
        links = list(self._links.values())
        for link in links:
            self._drop(link, "worker links closed")
        for link in links:
            if link.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await link.task
        self._notify()

    # ---- internals ----

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _count_dropped(self, worker_id: int, why: str) -> None:
        self.dropped_units += 1
        count = self.dropped_by_worker[worker_id] = self.dropped_by_worker.get(worker_id, 0) + 1
        if count & (count - 1) == 0:  # the 1st, 2nd, 4th, ...: a flood must not flood the log
            log.warning("worker %d: unit dropped (%s); %d so far", worker_id, why, count)

    def _drop(self, link: _Link, reason: str) -> None:
        """The link is no longer wanted: close it now and lose its sessions."""
        link.closed = True
        if self._links.get(link.worker_id) is link:
            del self._links[link.worker_id]
        if link.writer is not None:
            link.writer.close()
            link.writer = None
        if link.task is not None:
            link.task.cancel()
        self._lose(link.worker_id, reason)

    def _lose(self, worker_id: int, reason: str) -> None:
        sinks = self._sinks.pop(worker_id, {})
        for session_id, sink in sinks.items():
            try:
                sink.on_worker_lost(reason)
            except Exception:
                log.exception("worker %d: session %s cleanup failed", worker_id, session_id)

    async def _connect(self, link: _Link) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_unix_connection(link.path)
        try:
            challenge, _ = await p.read_message(reader, p.MAX_HELLO_BYTES, 0)
            if not isinstance(challenge, p.Challenge):
                raise p.ProtocolError(f"expected the worker's challenge, got {challenge.type!r}")
            pid = os.getpid()
            proof = p.link_proof(self._secret, challenge.nonce, self.shard_id, pid)
            writer.write(p.encode(p.LinkHello(shard_id=self.shard_id, pid=pid, proof=proof)))
            writer.write(p.encode(p.Ping(seq=0)))
            answer, _ = await p.read_message(reader, p.MAX_HELLO_BYTES, 0)
            if not isinstance(answer, p.Pong):
                raise p.ProtocolError(f"expected pong, got {answer.type!r}")
        except BaseException:
            writer.close()
            raise
        return reader, writer

    async def _run(self, link: _Link) -> None:
        """Keep the link open while it is wanted: connect, authenticate, read; reconnect after a loss."""
        delay = RETRY_MIN_S
        while not link.closed:
            try:
                reader, writer = await asyncio.wait_for(self._connect(link), LINK_TIMEOUT_S)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, p.ProtocolError) as exc:
                log.debug("worker %d: no link yet (%s)", link.worker_id, exc)
                if self._links.get(link.worker_id) is link:
                    self._lose(link.worker_id, LINK_LOST)  # nobody waits on a link that is not there
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            delay = RETRY_MIN_S
            link.writer = writer
            log.info("worker %d: link open (%s)", link.worker_id, link.path)
            self._notify()
            try:
                await self._read(link, reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            except p.ProtocolError as exc:
                log.error("worker %d: %s; closing the link", link.worker_id, exc)
            finally:
                writer.close()
                if link.writer is writer:
                    link.writer = None
                if self._links.get(link.worker_id) is link:  # not replaced: its sessions are gone
                    log.warning("worker %d: link lost", link.worker_id)
                    self._lose(link.worker_id, LINK_LOST)
            await asyncio.sleep(delay)

    async def _read(self, link: _Link, reader: asyncio.StreamReader) -> None:
        while True:
            message, payload = await p.read_message(reader)
            if isinstance(message, p.ErrorOut) and message.code == p.UNITS_DROPPED:
                self._count_dropped(link.worker_id, "the session's queue in the worker is full")
            sid = getattr(message, "session_id", None)
            sinks = self._sinks.get(link.worker_id, {})
            sink = sinks.get(sid) if sid is not None else None
            if sink is None:
                continue
            if isinstance(message, p.Closed):
                sinks.pop(sid, None)
            try:
                sink.on_worker_message(message, payload)
            except Exception:
                log.exception("worker %d: session %s failed on %s", link.worker_id, sid, message.type)
