"""A call whose media lives on a media shard, as the front sees it.

It stands in the front's session registry and admission queue where an in-process `CallSession` would: the
signalling routes answer, trickle and hang up through it, admission admits or queues it (the news goes to
the shard), and what the dashboard and `/metrics` read of it comes from the shard's last snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from media_shard import messages as m
from rtc_server import events as ev
from rtc_server.client_limits import Client
from rtc_server.shards import ShardError, ShardHandle, ShardPool

if TYPE_CHECKING:
    from rtc_server.manager import SessionManager

log = logging.getLogger("rtc_server.remote_call")


class RemoteCall:
    def __init__(
        self,
        manager: SessionManager,
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

    def ended(self, reason: str) -> None:
        """The call is over on the shard (or the shard is gone): free its slot and forget it."""
        if self.phase == "closed":
            return
        log.info("session %s: ended on shard %d (%s)", self.id, self.shard.shard_id, reason)
        self.phase = "closed"
        self.shard.calls.discard(self.id)
        self.manager.admission.leave(self)
        self.manager.forget(self)
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

    def latest(self) -> m.CallSnapshot | None:
        snapshot = self.shard.snapshot
        if snapshot is None:
            return None
        return next((c for c in snapshot.calls if c.session_id == self.id), None)

    def snapshot(self) -> m.CallSnapshot:
        seen = self.latest()
        if seen is not None:
            self.state = seen.state  # type: ignore[assignment]
            return seen.model_copy(
                update={"phase": self.phase, "worker_id": self.worker_id, "age_s": self.age_s()}
            )
        return m.CallSnapshot(
            session_id=self.id,
            mode=self.mode,
            phase=self.phase,
            state=self.state,
            worker_id=self.worker_id,
            age_s=self.age_s(),
            units=0,
            unit_latency_p50_ms=None,
            unit_latency_p95_ms=None,
            speech_buffered_s=0.0,
            send_lateness_p95_ms=0.0,
            frames_in=0,
            frames_out=0,
            frames_dropped=0,
        )

    def age_s(self) -> float:
        return round(time.monotonic() - self.created_at, 3)

    def info(self) -> ev.SessionInfo:
        seen = self.latest()
        return ev.SessionInfo(
            session_id=self.id,
            mode=seen.mode if seen is not None else self.mode,
            phase=self.phase,
            state=seen.state if seen is not None else self.state,  # type: ignore[arg-type]
            worker_id=self.worker_id,
            queue_position=self.manager.admission.position(self),
            age_s=self.age_s(),
        )
