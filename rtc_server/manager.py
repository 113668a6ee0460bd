"""The set of live calls, with the supervisor and admission they share, and the server's counters."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import aioice.ice

from inference.modes import mode_names
from inference.supervisor import WorkerSupervisor
from rtc_server.admission import Admission, QueueFull
from rtc_server.config import AppConfig
from rtc_server.metrics import Histogram
from rtc_server.session import CallSession

log = logging.getLogger("rtc_server.manager")


class UnknownMode(ValueError):
    pass


@dataclass
class ServerStats:
    units_sent: int = 0
    units_done: int = 0
    frames_in_closed: int = 0  # media frames of sessions that have ended (live ones are read at scrape time)
    frames_out_closed: int = 0
    sessions_started: dict[str, int] = field(default_factory=dict)
    unit_roundtrip: Histogram = field(default_factory=Histogram)
    unit_handoff: Histogram = field(default_factory=Histogram)
    recent_handoff_ms: deque[float] = field(default_factory=lambda: deque(maxlen=20000))  # for the benchmark

    def record_unit(self, handoff_ms: float, roundtrip_ms: float) -> None:
        self.units_done += 1
        self.unit_handoff.observe(handoff_ms / 1000)
        self.recent_handoff_ms.append(handoff_ms)
        self.unit_roundtrip.observe(roundtrip_ms / 1000)


def configure_ice_consent(interval_s: float, failures: int) -> None:
    """aioice checks consent (RFC 7675) with module-level constants; the server process owns them."""
    aioice.ice.CONSENT_INTERVAL = interval_s
    aioice.ice.CONSENT_FAILURES = failures


class SessionManager:
    def __init__(self, config: AppConfig, supervisor: WorkerSupervisor) -> None:
        self.config = config
        self.supervisor = supervisor
        self.admission = Admission(supervisor, config.queue.max_length, config.queue.default_session_s)
        self.sessions: dict[str, CallSession] = {}
        self.stats = ServerStats()
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
        """A worker came up or went down: queued callers may now fit."""
        self.admission.dispatch()

    async def create(
        self,
        offer_sdp: str,
        mode: str,
        system_prompt: str | None,
        voice: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> CallSession:
        """Answer an offer and admit or queue the call. Raises UnknownMode, QueueFull or BadOffer."""
        if mode not in self.known_modes():
            raise UnknownMode(f"unknown mode {mode!r}; known modes: {', '.join(self.known_modes())}")
        if not self.admission.would_accept(mode):
            raise QueueFull("all session slots are busy and the queue is full")
        session = CallSession(self, mode, system_prompt, voice, options)
        self.sessions[session.id] = session
        try:
            await session.answer(offer_sdp)
            self.admission.request(session)
        except BaseException:
            await session.close("setup failed")
            raise
        self.stats.sessions_started[mode] = self.stats.sessions_started.get(mode, 0) + 1
        return session

    def get(self, session_id: str) -> CallSession | None:
        return self.sessions.get(session_id)

    def forget(self, session: CallSession) -> None:
        if self.sessions.pop(session.id, None) is not None:
            if session.inbound is not None:
                self.stats.frames_in_closed += session.inbound.frames_in
            self.stats.frames_out_closed += session.speech.frames_out

    async def close_all(self) -> None:
        if self._queue_task is not None:
            self._queue_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._queue_task
        await asyncio.gather(*(s.close("server shutdown") for s in list(self.sessions.values())))
