"""A media shard: one process, one event loop, the peer connections of the calls the front placed here.

Each call is an `rtc_server.session.CallSession`, exactly as in the front's in-process mode; what it asks of
its manager is answered here:
- worker messages go over this process's own data links to the GPU workers (`inference.links.WorkerLinks`),
  never through the front;
- admission stays in the front: a call that connects says so (`connected`), the front answers `admit` or
  `queue` (or `reject`), and a mode switch or the end of a call is reported (`switched`, `ended`);
- every second the shard sends a snapshot of its calls and counters for `/api/sessions`, admin and metrics.

If the front's connection drops, the shard closes its calls and exits (the front restarts shards).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from inference.links import WorkerLinks
from inference.protocol import Challenge, ProtocolError
from media_shard import messages as m
from rtc_server.client_limits import Client
from rtc_server.config import AppConfig
from rtc_server.events import ErrorEvent
from rtc_server.manager import configure_ice_consent
from rtc_server.realtime.webrtc import shard_port
from rtc_server.session import BadCandidate, BadOffer, CallSession
from rtc_server.stats import ServerStats, process_cpu_s

log = logging.getLogger("media_shard")
SNAPSHOT_INTERVAL_S = 1.0


class AdmissionLink:
    """What a call asks of admission, forwarded to the front (which holds the real `Admission`)."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self.positions: dict[str, int] = {}

    def switch(self, session: CallSession, mode: str) -> None:
        self.shard.send(m.Switched(session_id=session.id, mode=mode))

    def leave(self, session: CallSession) -> None:
        self.positions.pop(session.id, None)

    def position(self, session: CallSession) -> int | None:
        return self.positions.get(session.id)


class Shard:
    """The manager of this process's calls (the interface `CallSession` uses), and its link to the front."""

    def __init__(self, shard_id: int, config: AppConfig, secret: bytes) -> None:
        self.shard_id = shard_id
        self.config = config
        self.secret = secret
        self.sessions: dict[str, CallSession] = {}
        self.stats = ServerStats()
        self.admission = AdmissionLink(self)
        self.supervisor = WorkerLinks(secret, shard_id)  # `supervisor`: the name CallSession uses
        self._known_modes: list[str] = []
        self._writer: asyncio.StreamWriter | None = None
        configure_ice_consent(config.rtc.consent_interval_s, config.rtc.consent_failures)

    # ---- the manager interface of CallSession ----

    def known_modes(self) -> list[str]:
        return self._known_modes

    def connected(self, session: CallSession) -> None:
        self.send(m.Connected(session_id=session.id, mode=session.mode))

    def forget(self, session: CallSession, why: str = "") -> None:
        if self.sessions.pop(session.id, None) is not None:
            self.stats.close_call(session)
            self.send(m.Ended(session_id=session.id, reason=why or "closed"))

    # ---- the front link ----

    def send(self, message: m.BaseModel) -> None:
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(m.encode(message))

    async def run(self, host: str, port: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        challenge = await m.read_hello(reader)
        if not isinstance(challenge, Challenge):
            raise ProtocolError(f"expected the front's challenge, got {challenge.type!r}")
        proof = m.shard_proof(self.secret, challenge.nonce, self.shard_id, os.getpid())
        writer.write(m.encode(m.ShardHello(shard_id=self.shard_id, pid=os.getpid(), proof=proof)))
        self._writer = writer
        snapshots = asyncio.create_task(self._snapshots(), name="snapshots")
        try:
            while True:
                try:
                    message = await m.read(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    log.info("shard %d: the front went away", self.shard_id)
                    return
                await self._handle(message)
        finally:
            snapshots.cancel()
            self._writer = None
            await asyncio.gather(*(s.close("media shard stopping") for s in list(self.sessions.values())))
            await self.supervisor.close()
            writer.close()

    async def _handle(self, message: m.ShardMessage) -> None:
        if isinstance(message, m.Workers):
            self._known_modes = message.known_modes
            self.supervisor.set_workers(message.workers)
        elif isinstance(message, m.Offer):
            asyncio.create_task(self._offer(message), name=f"offer-{message.session_id[:8]}")
        elif isinstance(message, m.Trickle):
            asyncio.create_task(self._trickle(message), name="trickle")
        elif isinstance(message, m.Hangup):
            asyncio.create_task(self._hangup(message), name="hangup")
        elif isinstance(message, m.Admit):
            asyncio.create_task(self._admit(message), name="admit")
        elif isinstance(message, m.QueueUpdate):
            session = self.sessions.get(message.session_id)
            if session is not None:
                self.admission.positions[session.id] = message.position
                session.queue_update(message.position, message.eta_s)
        elif isinstance(message, m.Rejected):
            session = self.sessions.get(message.session_id)
            if session is not None:
                session.reject(message.code, message.message)

    async def _offer(self, offer: m.Offer) -> None:
        self._known_modes = offer.known_modes
        session = CallSession(
            self,
            offer.mode,
            offer.system_prompt,
            offer.voice,
            offer.options,
            client=Client(address="front"),  # per-client limits are the front's
            session_id=offer.session_id,
        )
        self.sessions[session.id] = session
        if offer.realtime is not None:  # POST /v1/realtime/calls: the `oai-events` channel speaks that API
            session.realtime = shard_port(session, offer.realtime, self.config)
        if offer.notice is not None:
            session.send_event(ErrorEvent(code=offer.notice[0], message=offer.notice[1]))
        try:
            sdp = await session.answer(offer.sdp)
        except BadOffer as exc:
            await session.close("setup failed")
            self.send(m.Refused(request_id=offer.request_id, code="bad_sdp", message=str(exc)))
            return
        except Exception as exc:
            log.exception("shard %d: answering an offer failed", self.shard_id)
            await session.close("setup failed")
            self.send(m.Refused(request_id=offer.request_id, code="internal_error", message=str(exc)))
            return
        self.stats.sessions_started[offer.mode] = self.stats.sessions_started.get(offer.mode, 0) + 1
        self.send(m.Answer(request_id=offer.request_id, sdp=sdp))

    async def _trickle(self, trickle: m.Trickle) -> None:
        session = self.sessions.get(trickle.session_id)
        if session is None:
            self.send(
                m.Refused(request_id=trickle.request_id, code="unknown_session", message="no such call")
            )
            return
        try:
            await session.add_candidates(trickle.candidates, trickle.end)
        except BadCandidate as exc:
            self.send(m.Refused(request_id=trickle.request_id, code="bad_candidate", message=str(exc)))
            return
        self.send(m.Done(request_id=trickle.request_id))

    async def _hangup(self, hangup: m.Hangup) -> None:
        session = self.sessions.get(hangup.session_id)
        if session is not None:
            await session.close(hangup.reason)
        self.send(m.Done(request_id=hangup.request_id))

    async def _admit(self, admit: m.Admit) -> None:
        session = self.sessions.get(admit.session_id)
        if session is None:
            return  # ended meanwhile: its `ended` is on its way to the front, which frees the slot
        self.admission.positions.pop(session.id, None)
        if not await self.supervisor.ensure(admit.worker_id):
            log.warning("shard %d: no data link to worker %d", self.shard_id, admit.worker_id)
        session.admit(admit.worker_id)  # a missing link fails the call with `worker_failed`

    async def _snapshots(self) -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_INTERVAL_S)
            self.send(self.snapshot())

    def snapshot(self) -> m.Snapshot:
        calls = [s.snapshot() for s in self.sessions.values() if s.phase != "closed"]
        return m.Snapshot(calls=calls, stats=self.stats.snapshot(self.sessions.values(), process_cpu_s()))


async def serve(host: str, port: int, shard_id: int, config: AppConfig, secret: bytes) -> None:
    shard = Shard(shard_id, config, secret)
    started = time.monotonic()
    try:
        await shard.run(host, port)
    finally:
        log.info("shard %d: stopped after %.0f s", shard_id, time.monotonic() - started)
