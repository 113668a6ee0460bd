"""The aiohttp application: middlewares (JSON errors, Origin check, bearer auth), routes, static pages, and
start/stop."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from inference.settings import WorkerSettings
from inference.supervisor import WorkerSupervisor
from rtc_server.certs import server_ssl_context
from rtc_server.config import AppConfig, AuthSettings
from rtc_server.http_security import NON_PAGE_ROOTS, OriginPolicy, origin_guard, response_headers
from rtc_server.manager import SessionManager
from rtc_server.metrics import CONTENT_TYPE, Exposition
from rtc_server.pages import public_file
from rtc_server.presets import add_preset_routes
from rtc_server.realtime.client_secrets import add_secret_routes, ephemeral_allowed
from rtc_server.realtime.webrtc import add_call_routes
from rtc_server.realtime.websocket import add_socket_routes
from rtc_server.recordings_api import add_recording_routes
from rtc_server.shards import ShardPool, default_media_procs
from rtc_server.signalling import MANAGER_KEY, ApiError, add_routes
from rtc_server.ui_routes import add_ui_routes
from rtc_server.voices import add_voice_routes

log = logging.getLogger("rtc_server.app")
REPO_ROOT = Path(__file__).resolve().parent.parent
# these paths and everything below them; pages are public
PROTECTED_ROOTS = ("/api", "/whip", "/v1", "/metrics")


MAX_BODY_KEY = web.AppKey("max_body", int)
STARTED_KEY = web.AppKey("started_at", float)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_protected(path: str) -> bool:
    return any(path == root or path.startswith(root + "/") for root in PROTECTED_ROOTS)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error answer is JSON: `{"error": {"code", "message"}}`."""
    try:
        return await handler(request)
    except ApiError:
        raise
    except web.HTTPException as exc:
        if exc.status < 400 or not is_protected(request.path):
            raise
        codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        code = codes.get(exc.status, "http_error")
        message = (
            exc.text if exc.status != 413 else f"the body is larger than {request.app[MAX_BODY_KEY]} bytes"
        )
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None  # a 405 must name them
        raise ApiError(exc.status, code, message or exc.reason, headers=allow) from None
    except Exception:
        if not is_protected(request.path):
            raise
        log.exception("%s %s failed", request.method, request.path)
        raise ApiError(500, "internal_error", "the server failed on this request; see its log") from None


def auth_middleware(token: str) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if is_protected(request.path) and request.method != "OPTIONS":
            given = request.headers.get("Authorization", "").encode()
            # a Realtime client secret (`ek_...`) opens its one route instead of the token
            if not hmac.compare_digest(given, expected) and not ephemeral_allowed(request):
                raise ApiError(
                    401,
                    "unauthorized",
                    "missing or wrong bearer token",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await handler(request)

    return check_token


@web.middleware
async def limit_body(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse an oversized body from its Content-Length before reading it (aiohttp also caps the read)."""
    limit = request.app[MAX_BODY_KEY]
    if request.path == "/api/voices":
        return await handler(request)  # uploads have their own limit (voices.max_bytes)
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "too_large", f"the body is larger than {limit} bytes")
    return await handler(request)


async def metrics(request: web.Request) -> web.Response:
    manager = request.app[MANAGER_KEY]
    out = Exposition()
    counts: dict[tuple[str, str], int] = {}
    for mode in manager.known_modes():
        for phase in ("queued", "active"):
            counts[(mode, phase)] = 0
    snapshots = [s.snapshot() for s in manager.sessions.values() if s.phase != "closed"]
    totals = manager.totals()
    for snap in snapshots:
        counts[(snap.mode, snap.phase)] = counts.get((snap.mode, snap.phase), 0) + 1
    out.metric(
        "rtc_sessions",
        "gauge",
        "Live sessions by mode and phase (queued: waiting for a worker slot).",
        [({"mode": m, "state": s}, n) for (m, s), n in sorted(counts.items())],
    )
    talk: dict[tuple[str, str], int] = {}
    for snap in snapshots:
        if snap.phase == "active":
            talk[(snap.mode, snap.state)] = talk.get((snap.mode, snap.state), 0) + 1
    out.metric(
        "rtc_sessions_talking",
        "gauge",
        "Active sessions by mode and conversation state (listening, thinking, speaking).",
        [({"mode": m, "state": s}, n) for (m, s), n in sorted(talk.items())],
    )
    out.metric(
        "rtc_sessions_started_total",
        "counter",
        "Sessions answered since start, by mode.",
        [({"mode": m}, n) for m, n in sorted(totals.stats.sessions_started.items())],
    )
    out.metric(
        "rtc_queue_length",
        "gauge",
        "Callers waiting for a worker slot.",
        [({}, len(manager.admission.waiting))],
    )
    out.metric(
        "rtc_session_capacity", "gauge", "Session slots over all workers.", [({}, manager.admission.capacity)]
    )
    out.metric(
        "rtc_units_sent_total", "counter", "Audio units handed to workers.", [({}, totals.stats.units_sent)]
    )
    out.metric(
        "rtc_units_processed_total",
        "counter",
        "Units the workers finished.",
        [({}, totals.stats.units_done)],
    )
    out.histogram(
        "rtc_unit_latency_seconds",
        "Unit complete at the server to the worker's result back at the server.",
        totals.unit_roundtrip,
    )
    out.histogram(
        "rtc_unit_handoff_seconds",
        "Unit complete at the server to unit received by the worker.",
        totals.unit_handoff,
    )
    out.histogram(
        "rtc_chat_turn_to_speech_seconds",
        "Chat: a user turn's end (its last unit complete, or a typed turn taken by the worker) to the reply's "
        "first speech out of the worker.",
        totals.turn_to_speech,
    )
    out.metric(
        "rtc_chat_early_replies_total",
        "counter",
        "Chat replies started a unit before their turn's end: answered (the turn ended; sent at once) or dropped "
        "(the caller spoke on; never sent, its GPU work wasted).",
        [
            ({"outcome": "answered"}, totals.stats.early_replies),
            ({"outcome": "dropped"}, totals.stats.early_dropped),
        ],
    )
    workers = manager.supervisor.workers
    out.metric(
        "rtc_worker_up",
        "gauge",
        "1 while the worker process is connected.",
        [({"worker": str(w.worker_id), "device": w.device}, int(w.up)) for w in workers],
    )
    capacity_rows: list[tuple[dict[str, str], float]] = []
    for w in workers:
        labels = {"worker": str(w.worker_id), "source": w.capacity_source}
        capacity_rows.append(({**labels, "mode": "any"}, w.capacity))
        capacity_rows += [({**labels, "mode": m}, n) for m, n in sorted(w.capacity_by_mode.items())]
    out.metric(
        "rtc_worker_capacity",
        "gauge",
        "Sessions a worker holds (mode any: of its most expensive mode), and where the number comes from.",
        capacity_rows,
    )
    out.metric(
        "rtc_worker_restarts_total",
        "counter",
        "Worker process restarts.",
        [({"worker": str(w.worker_id)}, w.restarts) for w in workers],
    )
    out.metric(
        "rtc_media_frames_in_total",
        "counter",
        "Inbound audio frames decoded.",
        [({}, totals.stats.frames_in)],
    )
    out.metric(
        "rtc_media_frames_out_total",
        "counter",
        "Outbound audio frames sent.",
        [({}, totals.stats.frames_out)],
    )
    out.metric(
        "rtc_media_frames_dropped_total",
        "counter",
        "Inbound audio frames dropped because a caller sent faster than real time.",
        [({}, totals.stats.frames_dropped)],
    )
    out.metric(
        "rtc_media_inbound_lost_seconds_total",
        "counter",
        "Inbound audio that never arrived: timestamp jumps too long to fill (the callers are told).",
        [({}, round(totals.stats.audio_lost_s, 3))],
    )
    out.metric(
        "rtc_media_cpu_seconds_total",
        "counter",
        "CPU time of the media processes (the front, and every media shard), user + system.",
        [({}, round(totals.stats.cpu_s, 3))],
    )
    if manager.shards is not None:
        shards = manager.shards.shards
        out.metric(
            "rtc_media_shard_up",
            "gauge",
            "1 while the media shard process is connected.",
            [({"shard": str(sh.shard_id)}, int(sh.up)) for sh in shards],
        )
        out.metric(
            "rtc_media_shard_calls",
            "gauge",
            "Calls placed on each media shard.",
            [({"shard": str(sh.shard_id)}, len(sh.calls)) for sh in shards],
        )
        out.metric(
            "rtc_media_shard_restarts_total",
            "counter",
            "Media shard process restarts.",
            [({"shard": str(sh.shard_id)}, sh.restarts) for sh in shards],
        )
    out.metric(
        "rtc_uptime_seconds",
        "gauge",
        "Seconds since the server started.",
        [({}, round(time.monotonic() - request.app[STARTED_KEY], 3))],
    )
    return web.Response(body=out.text().encode(), headers={"Content-Type": CONTENT_TYPE})


def make_app(config: AppConfig, manager: SessionManager) -> web.Application:
    policy = OriginPolicy(config.server.allowed_origins)
    middlewares = [json_errors, origin_guard(policy)]
    if config.auth.api_token:
        middlewares.append(auth_middleware(config.auth.api_token))
    middlewares.append(limit_body)
    app = web.Application(middlewares=middlewares, client_max_size=config.server.max_body_bytes)
    app.on_response_prepare.append(response_headers(policy, config.rtc.ice_servers))
    app[MANAGER_KEY] = manager
    app[MAX_BODY_KEY] = config.server.max_body_bytes
    app[STARTED_KEY] = time.monotonic()
    add_routes(app)
    add_voice_routes(app, config, voices_dir(config))
    add_preset_routes(app)
    add_call_routes(app)
    add_secret_routes(app)
    add_socket_routes(app)
    add_recording_routes(app, config)
    app.router.add_get("/metrics", metrics)
    public = (REPO_ROOT / config.server.public_dir).resolve()
    add_ui_routes(app, public)

    async def index(request: web.Request) -> web.StreamResponse:
        if (public / "index.html").is_file():
            return web.FileResponse(public / "index.html")
        raise web.HTTPFound("/call.html")

    async def page(request: web.Request) -> web.StreamResponse:
        path = public_file(public, request.match_info["path"])
        if path is None:
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    app.router.add_get("/", index)
    # static pages, registered last; never under the API roots, so that an unknown API path or method gets
    # the API's own 404 or 405 (with its Allow header) rather than the page route's
    api = "|".join(root.lstrip("/") for root in NON_PAGE_ROOTS)
    app.router.add_get(f"/{{path:(?!(?:{api})(?:/|$)).+}}", page)
    return app


@dataclass
class RunningServer:
    """A started server: its URL and the parts tests and the CLI need to reach."""

    url: str
    config: AppConfig
    supervisor: WorkerSupervisor
    manager: SessionManager
    runner: web.AppRunner

    async def stop(self) -> None:
        await self.manager.close_all()
        await self.runner.cleanup()
        if self.manager.shards is not None:
            await self.manager.shards.stop()
        await self.supervisor.stop()


def worker_settings(config: AppConfig) -> WorkerSettings:
    """What the worker processes get from the server config (sent to each as JSON, parsed once there)."""
    workers = config.workers
    return WorkerSettings(
        model=config.model,
        loopback=config.loopback,
        # None: a GPU worker finds its own capacity (inference/capacity.py)
        max_sessions=(workers.capacity_per_gpu or None) if workers.gpus else workers.cpu_capacity,
        voices_dir=str(voices_dir(config)),
        tick_gather_ms=workers.tick_gather_ms,
        tick_phases=workers.tick_phases,
        prepare_threads=workers.prepare_threads,
    )


def voices_dir(config: AppConfig) -> Path:
    return REPO_ROOT / config.voices.dir


async def start_server(config: AppConfig) -> RunningServer:
    """Start the workers, then serve the app; returns once everything is up."""
    manager_ref: list[SessionManager] = []
    supervisor = WorkerSupervisor(
        config.workers,  # a SupervisorSettings with the front's own keys
        worker_settings(config),
        on_workers_changed=lambda: manager_ref[0].workers_changed() if manager_ref else None,
    )
    manager = SessionManager(config, supervisor)
    manager_ref.append(manager)
    await supervisor.start()
    procs = config.workers.media_procs
    if procs < 0:
        procs = default_media_procs(config.workers.gpus)
    if procs:
        # the shards get the configuration without the tokens (a command line is readable by local users)
        shard_config = config.model_copy(update={"auth": AuthSettings()}).model_dump_json()
        manager.shards = ShardPool(
            procs,
            shard_config,
            supervisor.secret,
            manager,
            start_timeout_s=config.workers.start_timeout_s,
            restart_delay_s=config.workers.restart_delay_s,
        )
        try:
            await manager.shards.start()
        except BaseException:
            await manager.shards.stop()
            await supervisor.stop()
            raise
    manager.start()
    app = make_app(config, manager)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    ssl_context = None if config.server.http else server_ssl_context(REPO_ROOT / config.server.certs_dir)
    site = web.TCPSite(runner, config.server.host, config.server.port, ssl_context=ssl_context)
    try:
        await site.start()
    except BaseException:
        await manager.close_all()
        await runner.cleanup()
        if manager.shards is not None:
            await manager.shards.stop()
        await supervisor.stop()
        raise
    port = runner.addresses[0][1]  # the real port when config asked for 0
    scheme = "http" if config.server.http else "https"
    host = "localhost" if config.server.host in ("0.0.0.0", "::") else config.server.host
    return RunningServer(f"{scheme}://{host}:{port}", config, supervisor, manager, runner)
