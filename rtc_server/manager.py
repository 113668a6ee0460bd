"""The set of live calls, with the supervisor and admission they share, and the server's counters."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from typing import Any

import aioice.ice

from inference.links import LinkTarget
from inference.modes import mode_names
from inference.supervisor import WorkerSupervisor
from media_shard import messages as m
from rtc_server import events as ev
from rtc_server.admission import Admission, QueueFull
from rtc_server.client_limits import Client, RateWindow, TooManyRequests
from rtc_server.config import AppConfig
from rtc_server.events import quote
from rtc_server.remote_call import RemoteCall
from rtc_server.session import BadOffer, CallSession, new_session_id
from rtc_server.shards import ShardError, ShardHandle, ShardPool
from rtc_server.stats import ServerStats, Totals, add_up, process_cpu_s

log = logging.getLogger("rtc_server.manager")
Call = CallSession | RemoteCall  # a call whose media is in this process, or on a media shard
MIN_PENDING = 8  # the bound on connecting calls over all clients is never lower than this
# An ended call's URL answers 410 with how it ended for this long (a caller whose media process died learns
# why there: its data channel died with that process), for the most recent calls only.
ENDED_KEPT_S = 600.0
ENDED_KEPT = 1024
MEDIA_PROCESS_LOST = "media_process_lost"


class UnknownMode(ValueError):
    pass


class ServerBusy(Exception):
    """Too many calls, of all clients together, are answered but not yet connected."""


def configure_ice_consent(interval_s: float, failures: int) -> None:
    """aioice checks consent (RFC 7675) with module-level constants; the server process owns them."""
    aioice.ice.CONSENT_INTERVAL = interval_s
    aioice.ice.CONSENT_FAILURES = failures


class SessionManager:
    def __init__(self, config: AppConfig, supervisor: WorkerSupervisor) -> None:
        self.config = config
        self.supervisor = supervisor
        self.admission = Admission(supervisor, config.queue.max_length, config.queue.default_session_s)
        self.sessions: dict[str, Call] = {}
        self.shards: ShardPool | None = None  # set when media shards own the calls (workers.media_procs)
        self.offer_rate = RateWindow(config.rtc.offers_per_minute, window_s=60.0)
        self.stats = ServerStats()
        self.ended: OrderedDict[str, tuple[float, str, str]] = OrderedDict()  # id -> (when, code, why)
        self._queue_task: asyncio.Task[None] | None = None
        configure_ice_consent(config.rtc.consent_interval_s, config.rtc.consent_failures)

    def known_modes(self) -> list[str]:
        """The modes the running workers serve (from their hello), or the built-in registry before any is up."""
        served: list[str] = []
        for worker in self.supervisor.workers:
            served += [m for m in worker.modes if m not in served]
        return served or mode_names()

    def start(self) -> None:
        self._queue_task = asyncio.create_task(self._queue_updates(), name="queue-updates")

    async def _queue_updates(self) -> None:
        while True:
            await asyncio.sleep(self.config.queue.update_interval_s)
            self.admission.notify_queue()

    def workers_changed(self) -> None:
        """A worker came up, went down or said its capacity: shards learn where to reach it, and queued
        callers may now fit."""
        if self.shards is not None:
            self.shards.broadcast(self._workers_message())
        self.admission.dispatch()

    def pending(self) -> list[Call]:
        """Calls answered but not yet connected: they hold no worker slot and no queue place."""
        return [s for s in self.sessions.values() if s.phase == "connecting"]

    def max_pending(self) -> int:
        return max(self.admission.capacity + self.config.queue.max_length, MIN_PENDING)

    def check_new_call(self, mode: str, client: Client) -> None:
        """Refuse an offer before answering it: TooManyRequests (this client), ServerBusy or QueueFull."""
        rtc = self.config.rtc
        wait_s = self.offer_rate.acquire(client.address)
        if wait_s > 0:
            raise TooManyRequests(f"more than {rtc.offers_per_minute} offers a minute", wait_s)
        pending = self.pending()
        of_client = [s for s in pending if s.client is not None and s.client.same_as(client)]
        if len(of_client) >= rtc.max_pending_per_client:
            raise TooManyRequests(
                f"{rtc.max_pending_per_client} calls of this client are still connecting",
                rtc.connect_timeout_s,
            )
        if len(pending) >= self.max_pending():
            raise ServerBusy(f"{len(pending)} calls are still connecting; try again shortly")
        if not self.admission.would_accept(mode):
            raise QueueFull("all session slots are busy and the queue is full")

    async def create(
        self,
        offer_sdp: str,
        mode: str,
        system_prompt: str | None,
        voice: str | None = None,
        options: dict[str, Any] | None = None,
        *,
        client: Client,
        notice: tuple[str, str] | None = None,
        realtime: dict[str, Any] | None = None,
    ) -> Call:
        """Answer an offer; the call asks for a slot once it connects (`connected`). `notice` (code, message):
        an `error` event the call sends once its events channel opens, and goes on (e.g. `unknown_voice`).

        Raises UnknownMode, TooManyRequests, ServerBusy, QueueFull or BadOffer.
        """
        if mode not in self.known_modes():
            known = ", ".join(self.known_modes())
            raise UnknownMode(f"unknown mode {quote(mode)}; known modes: {known}")
        self.check_new_call(mode, client)
        if self.shards is not None:
            return await self._create_remote(
                self.shards, offer_sdp, mode, system_prompt, voice, options, client, notice, realtime
            )
        session = CallSession(self, mode, system_prompt, voice, options, client)
        self.sessions[session.id] = session
        if notice is not None:
            session.send_event(ev.ErrorEvent(code=notice[0], message=notice[1]))
        try:
            await session.answer(offer_sdp)
        except BaseException:
            await session.close("setup failed")
            raise
        self.stats.sessions_started[mode] = self.stats.sessions_started.get(mode, 0) + 1
        return session

    def connected(self, session: CallSession) -> None:
        """The call's ICE and DTLS are up: it takes a worker slot or a queue place now; a full queue ends it."""
        try:
            self.admission.request(session)
        except QueueFull as exc:
            session.reject("queue_full", str(exc))

    def get(self, session_id: str) -> Call | None:
        return self.sessions.get(session_id)

    def forget(self, session: Call, why: str = "", code: str = "session_ended") -> None:
        if self.sessions.pop(session.id, None) is None:
            return
        if isinstance(session, CallSession):
            self.stats.close_call(session)
        now = time.monotonic()
        self.ended[session.id] = (now, code, why or "the call has ended")
        while self.ended and (
            len(self.ended) > ENDED_KEPT or next(iter(self.ended.values()))[0] < now - ENDED_KEPT_S
        ):
            self.ended.popitem(last=False)

    def how_ended(self, session_id: str) -> tuple[str, str] | None:
        """(code, why) of a call that ended lately, else None."""
        seen = self.ended.get(session_id)
        if seen is None or seen[0] < time.monotonic() - ENDED_KEPT_S:
            return None
        return seen[1], seen[2]

    # ---- media shards (rtc_server/shards.py): the calls whose media lives in another process ----

    async def _create_remote(
        self,
        pool: ShardPool,
        offer_sdp: str,
        mode: str,
        system_prompt: str | None,
        voice: str | None,
        options: dict[str, Any] | None,
        client: Client,
        notice: tuple[str, str] | None = None,
        realtime: dict[str, Any] | None = None,
    ) -> RemoteCall:
        shard = pool.choose()
        if shard is None:
            raise ServerBusy("no media process is running; try again shortly")
        call = RemoteCall(self, pool, shard, new_session_id(), mode, client)
        self.sessions[call.id] = call
        shard.calls.add(call.id)
        offer = m.Offer(
            request_id=pool.next_request_id(),
            session_id=call.id,
            mode=mode,
            sdp=offer_sdp,
            system_prompt=system_prompt,
            voice=voice,
            options=options,
            known_modes=self.known_modes(),
            notice=notice,
            realtime=realtime,
        )
        try:
            await call.offer(offer)
        except ShardError as exc:
            call.ended(f"setup failed: {exc.code}")
            if exc.code == "bad_sdp":
                raise BadOffer(str(exc)) from None
            raise ServerBusy(f"the media process could not take the call ({exc.code})") from None
        return call

    def on_shard_up(self, shard: ShardHandle) -> None:
        if self.shards is not None:
            self.shards.send(shard, self._workers_message())

    def on_shard_lost(self, shard: ShardHandle, calls: set[str]) -> None:
        for session_id in calls:
            call = self.sessions.get(session_id)
            if isinstance(call, RemoteCall):
                call.ended(
                    f"the media process that carried the call (shard {shard.shard_id}) stopped",
                    code=MEDIA_PROCESS_LOST,
                )

    def on_shard_message(self, shard: ShardHandle, message: m.ShardMessage) -> None:
        call = self.sessions.get(getattr(message, "session_id", ""))
        if not isinstance(call, RemoteCall) or call.shard is not shard:
            return
        if isinstance(message, m.Connected):
            call.phase = "queued"
            try:
                self.admission.request(call)
            except QueueFull as exc:
                call.reject("queue_full", str(exc))
        elif isinstance(message, m.Switched):
            call.mode = message.mode
            self.admission.switch(call, message.mode)
        elif isinstance(message, m.Ended):
            call.ended(message.reason)

    def _workers_message(self) -> m.Workers:
        targets = [
            LinkTarget(worker_id=w.worker_id, path=w.link_path, up=w.up) for w in self.supervisor.workers
        ]
        return m.Workers(workers=targets, known_modes=self.known_modes())

    def totals(self) -> Totals:
        """Counters of this process and of every media shard (from their last snapshots)."""
        live = [s for s in self.sessions.values() if isinstance(s, CallSession)]
        snapshots = [self.stats.snapshot(live, process_cpu_s())]
        if self.shards is not None:
            snapshots += [s.stats for s in self.shards.shards if s.stats is not None]
        return add_up(snapshots)

    async def close_all(self) -> None:
        if self._queue_task is not None:
            self._queue_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._queue_task
        await asyncio.gather(*(s.close("server shutdown") for s in list(self.sessions.values())))
