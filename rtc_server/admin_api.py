"""`GET /api/admin/status`: workers, live sessions, the queue and recent errors, for the /admin dashboard.

Protected by `auth.admin_token` (header `X-Admin-Token`) when one is set; a separate header from the API
bearer token, so that a server with both tokens set can check both.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections import deque
from collections.abc import Sequence

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from rtc_server.info_api import VERSION
from rtc_server.signalling import MANAGER_KEY, ApiError

ADMIN_HEADER = "X-Admin-Token"
WATCHED_LOGGERS = ("rtc_server", "inference", "media_tracks")
STARTED_KEY = web.AppKey("admin_started_at", float)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorkerStatus(_Model):
    worker_id: int
    device: str  # "cpu" or "cuda:N"
    up: bool
    pid: int | None
    restarts: int
    modes: list[str]
    sessions: int
    capacity: int
    rss_mb: float | None  # resident memory of the worker process (host RAM; Linux only)
    dropped_units: int


class AdminSession(_Model):
    session_id: str
    mode: str
    phase: str
    state: str
    worker_id: int | None
    age_s: float
    queue_position: int | None
    units: int  # units with a measured round trip (most recent 600 kept)
    unit_latency_p50_ms: float | None
    unit_latency_p95_ms: float | None
    speech_buffered_s: float  # speech queued in the outbound track, not yet sent
    send_lateness_p95_ms: float  # how late the outbound track's 20 ms frames left (pacing lag)


class QueueEntry(_Model):
    position: int
    session_id: str
    mode: str
    eta_s: float
    waited_s: float


class ErrorRecord(_Model):
    time: float  # Unix time
    level: str
    logger: str
    message: str


class AdminStatus(_Model):
    """Body of `GET /api/admin/status`."""

    version: str
    uptime_s: float
    embedded_model: bool
    capacity: int
    units_sent: int
    units_done: int
    sessions_started: dict[str, int]
    workers: list[WorkerStatus]
    sessions: list[AdminSession]
    queue: list[QueueEntry]
    errors: list[ErrorRecord]


class RecentErrors(logging.Handler):
    """Keeps the latest WARNING-and-above log records of the server's own loggers."""

    def __init__(self, keep: int = 50) -> None:
        super().__init__(logging.WARNING)
        self.records: deque[ErrorRecord] = deque(maxlen=keep)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not break logging
            message = str(record.msg)
        if record.exc_info and record.exc_info[1] is not None:
            message += f" ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
        self.records.append(
            ErrorRecord(time=record.created, level=record.levelname, logger=record.name, message=message)
        )

    def attach(self) -> None:
        for name in WATCHED_LOGGERS:
            logging.getLogger(name).addHandler(self)

    def detach(self) -> None:
        for name in WATCHED_LOGGERS:
            logging.getLogger(name).removeHandler(self)


ERRORS_KEY = web.AppKey("recent_errors", RecentErrors)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of `values`, or None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n*q/100), at least 1
    return round(ordered[int(rank) - 1], 2)


def process_rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def check_admin_token(request: web.Request) -> None:
    expected = request.app[MANAGER_KEY].config.auth.admin_token
    if not expected:
        return
    given = request.headers.get(ADMIN_HEADER, "")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(401, "admin_unauthorized", f"missing or wrong {ADMIN_HEADER} header")


def admin_status(request: web.Request) -> AdminStatus:
    manager = request.app[MANAGER_KEY]
    sessions = list(manager.sessions.values())
    admission = manager.admission
    workers = [
        WorkerStatus(
            worker_id=w.worker_id,
            device=w.device,
            up=w.up,
            pid=w.pid,
            restarts=w.restarts,
            modes=list(w.modes),
            sessions=len(w.sinks),
            capacity=w.capacity,
            rss_mb=process_rss_mb(w.pid) if w.up else None,
            dropped_units=w.dropped_units,
        )
        for w in manager.supervisor.workers
    ]
    now = time.monotonic()
    live = [
        AdminSession(
            session_id=s.id,
            mode=s.mode,
            phase=s.phase,
            state=s.state,
            worker_id=s.worker_id,
            age_s=round(now - s.created_at, 1),
            queue_position=admission.position(s),
            units=len(s.unit_roundtrip_ms),
            unit_latency_p50_ms=percentile(s.unit_roundtrip_ms, 50),
            unit_latency_p95_ms=percentile(s.unit_roundtrip_ms, 95),
            speech_buffered_s=round(s.speech.buffered_s, 3),
            send_lateness_p95_ms=round(s.speech.pacing.percentile(95) * 1000, 2),
        )
        for s in sessions
        if s.phase != "closed"
    ]
    queue = [
        QueueEntry(
            position=i,
            session_id=t.id,
            mode=getattr(t, "mode", ""),
            eta_s=round(eta, 1),
            waited_s=round(now - getattr(t, "created_at", now), 1),
        )
        for i, (t, eta) in enumerate(zip(admission.waiting, admission.etas(), strict=True), start=1)
    ]
    return AdminStatus(
        version=VERSION,
        uptime_s=round(now - request.app[STARTED_KEY], 1),
        embedded_model=not manager.config.model.path,
        capacity=admission.capacity,
        units_sent=manager.stats.units_sent,
        units_done=manager.stats.units_done,
        sessions_started=dict(manager.stats.sessions_started),
        workers=workers,
        sessions=live,
        queue=queue,
        errors=list(reversed(request.app[ERRORS_KEY].records)),
    )


async def get_admin_status(request: web.Request) -> web.Response:
    check_admin_token(request)
    return web.json_response(admin_status(request).model_dump(), headers={"Cache-Control": "no-store"})


def add_admin_routes(app: web.Application) -> None:
    errors = RecentErrors()
    app[ERRORS_KEY] = errors
    app[STARTED_KEY] = time.monotonic()

    async def on_startup(app: web.Application) -> None:
        errors.attach()

    async def on_cleanup(app: web.Application) -> None:
        errors.detach()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_get("/api/admin/status", get_admin_status)
