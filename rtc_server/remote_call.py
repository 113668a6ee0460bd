"""A call whose media lives on a media shard, as the front sees it.

It stands in the front's session registry and admission queue where an in-process `CallSession` would: the
signalling routes answer, trickle and hang up through it, admission admits or queues it (the news goes to
the shard), and what the dashboard and `/metrics` read of it comes from the shard's last snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import time

from media_shard import messages as m
from rtc_server import events as ev
from rtc_server.call_host import FrontCallHost
from rtc_server.client_limits import Client
from rtc_server.shards import ShardError, ShardHandle, ShardPool

log = logging.getLogger("rtc_server.remote_call")


class RemoteCall:
    def __init__(
        self,
        manager: FrontCallHost,
        pool: ShardPool,
        shard: ShardHandle,
        session_id: str,
        mode: str,
        client: Client,
    ) -> None:
        self.manager = manager
        self.pool = pool
        self.shard = shard
        self.id = session_id
        self.mode = mode
        self.client = client
        self.phase: ev.SessionPhase = "connecting"
        self.state: ev.TalkState = "listening"
        self.worker_id: int | None = None
        self.created_at = time.monotonic()
        self.answer_sdp = ""
        self.closed = asyncio.Event()

    # ---- signalling ----

    async def offer(self, offer: m.Offer) -> str:
        reply = await self.pool.request(self.shard, offer)
        assert isinstance(reply, m.Answer)
        self.answer_sdp = reply.sdp
        return reply.sdp

    async def add_candidates(self, candidates: list[tuple[str | None, str]], end: bool) -> None:
        """Raises ShardError (`bad_candidate`, or the shard is gone)."""
        request = m.Trickle(
            request_id=self.pool.next_request_id(), session_id=self.id, candidates=candidates, end=end
        )
        await self.pool.request(self.shard, request)

    async def close(self, reason: str) -> None:
        """Hang up: the shard closes the call and says `ended`; a shard that is gone frees it here."""
        if self.phase == "closed":
            return
        try:
            await self.pool.request(
                self.shard,
                m.Hangup(request_id=self.pool.next_request_id(), session_id=self.id, reason=reason),
            )
        except ShardError as exc:
            log.info("session %s: hang-up on shard %d failed (%s)", self.id, self.shard.shard_id, exc)
        self.ended(reason)

    def ended(self, reason: str, code: str = "session_ended") -> None:
        """The call is over on the shard (or the shard is gone): free its slot and forget it."""
        if self.phase == "closed":
            return
        log.info("session %s: ended on shard %d (%s)", self.id, self.shard.shard_id, reason)
        self.phase = "closed"
        self.shard.calls.discard(self.id)
        self.manager.admission.leave(self)
        self.manager.forget(self, reason, code)
        self.closed.set()

    # ---- admission (rtc_server.admission's Ticket) ----

    def admit(self, worker_id: int) -> None:
        self.phase = "active"
        self.worker_id = worker_id
        self.pool.send(self.shard, m.Admit(session_id=self.id, worker_id=worker_id))

    def queue_update(self, position: int, eta_s: float) -> None:
        self.pool.send(self.shard, m.QueueUpdate(session_id=self.id, position=position, eta_s=eta_s))

    def reject(self, code: str, message: str) -> None:
        self.pool.send(self.shard, m.Rejected(session_id=self.id, code=code, message=message))

    # ---- what the registry shows ----

    def snapshot(self) -> m.CallSnapshot:
        """The shard's last view of the call (mode, talk state, media counters) with the front's own phase,
        worker and age; before the first snapshot, the front's fields alone."""
        seen = self.shard.call_views.get(self.id)
        mine = {"phase": self.phase, "worker_id": self.worker_id, "age_s": self.age_s()}
        if seen is not None:
            return seen.model_copy(update=mine)
        return m.CallSnapshot(
            session_id=self.id,
            mode=self.mode,
            state=self.state,
            units=0,
            unit_latency_p50_ms=None,
            unit_latency_p95_ms=None,
            speech_buffered_s=0.0,
            send_lateness_p95_ms=0.0,
            frames_in=0,
            frames_out=0,
            frames_dropped=0,
            **mine,
        )

    def age_s(self) -> float:
        return round(time.monotonic() - self.created_at, 3)

    def info(self) -> ev.SessionInfo:
        view = self.snapshot()
        return ev.SessionInfo(
            session_id=self.id,
            mode=view.mode,
            phase=self.phase,
            state=view.state,  # type: ignore[arg-type]
            worker_id=self.worker_id,
            queue_position=self.manager.admission.position(self),
            age_s=view.age_s,
        )
