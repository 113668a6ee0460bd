"""`GET /api/admin/status`: workers, live sessions, the queue and recent errors, for the /admin dashboard.

Protected by `auth.admin_token` (header `X-Admin-Token`) when one is set, a separate header from the API
bearer token, so that a server with both tokens set can check both; without one, loopback clients only.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from media_shard.messages import CallSnapshot
from rtc_server.info_api import VERSION
from rtc_server.signalling import ADMIN_HEADER as ADMIN_HEADER  # re-exported: the header's name lives there
from rtc_server.signalling import MANAGER_KEY, require_admin

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
    capacity_by_mode: dict[str, int]  # sessions per mode, where the worker knows them
    capacity_source: str  # table | configured | shipped | default, ", memory-limited" when memory clamped it
    warming_up: bool  # loading its model and sizing its caches: no session is admitted to it yet
    rss_mb: float | None  # resident memory of the worker process (host RAM; Linux only)
    dropped_units: int


class AdminSession(CallSnapshot):
    """A live call on the dashboard: its snapshot (from whichever process holds its media) and its place in the
    queue. `units`: units with a measured round trip (the most recent 600); `speech_buffered_s`: speech queued
    in the outbound track; `send_lateness_p95_ms`: how late the outbound 20 ms frames left (pacing lag)."""

    queue_position: int | None


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


def process_rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


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
            sessions=sum(1 for b in admission.busy.values() if b.worker_id == w.worker_id),
            capacity=w.capacity,
            capacity_by_mode=dict(w.capacity_by_mode),
            capacity_source=w.capacity_source,
            warming_up=w.up and not w.capacity_final,
            rss_mb=process_rss_mb(w.pid) if w.up else None,
            dropped_units=w.dropped_units,
        )
        for w in manager.supervisor.workers
    ]
    now = time.monotonic()
    totals = manager.totals().stats
    live = []
    for s in sessions:
        if s.phase == "closed":
            continue
        snap = s.snapshot()
        live.append(AdminSession(**snap.model_dump(), queue_position=admission.position(s)))
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
        units_sent=totals.units_sent,
        units_done=totals.units_done,
        sessions_started=dict(totals.sessions_started),
        workers=workers,
        sessions=live,
        queue=queue,
        errors=list(reversed(request.app[ERRORS_KEY].records)),
    )


async def get_admin_status(request: web.Request) -> web.Response:
    require_admin(request)
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
