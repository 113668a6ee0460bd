"""The node agent: a Ray actor pinned to one host that owns that host's media and workers.

It runs the single-host server of `rtc_server.app` in its own process (worker supervisor, media shards or
in-process media, admission and the node's FIFO queue, all unchanged) and takes the fronts' requests through
Ray: an offer (answered with this host's ICE candidates: media goes from the caller straight here), trickled
candidates, a hang-up, a call's info, and a status report of its capacity per mode, free share, workers and
calls. The node's own HTTP server listens on `cluster.node_http_host` (127.0.0.1 by default) for pages and
local debugging; callers reach the cluster through the fronts.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any, cast

import ray
from aiohttp import web
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.messages import NodeStatus, OfferIn, Reply
from cluster.placement import NodeLoad, WorkerLoad
from rtc_server.admin_api import admin_status
from rtc_server.admission import QueueFull
from rtc_server.app import RunningServer, start_server
from rtc_server.client_limits import Client, TooManyRequests
from rtc_server.config import AppConfig
from rtc_server.events import quote
from rtc_server.manager import ServerBusy, UnknownMode
from rtc_server.session import BadCandidate, BadOffer
from rtc_server.shards import ShardError
from rtc_server.voices import voice_exists

log = logging.getLogger("cluster.agent")
AGENT_PREFIX = "rtc-node-"


def agent_name(node: str) -> str:
    return AGENT_PREFIX + node


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=1000)
class NodeAgent:
    def __init__(self, name: str, config_json: str) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self.name = name
        self.config = AppConfig.model_validate_json(config_json)
        self.server: RunningServer | None = None

    async def start(self) -> dict[str, Any]:
        """Start this host's workers, media shards and local server; returns the first status."""
        if self.server is None:
            self.server = await start_server(self.config)
            log.info("node %s: serving on %s", self.name, self.server.url)
        return await self.status()

    async def stop(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            await server.stop()

    def _server(self) -> RunningServer:
        if self.server is None:
            raise RuntimeError("the node agent has not started")
        return self.server

    # ---- calls ----

    async def offer(self, request: dict[str, Any]) -> dict[str, Any]:
        offer = OfferIn.model_validate(request)
        manager = self._server().manager
        client = Client(address=offer.client_address, token=offer.client_token)
        retry = str(max(1, round(self.config.rtc.connect_timeout_s)))
        voice, notice = offer.voice, None
        if voice is not None and not voice_exists(self._server().runner.app, voice):
            # as on one host: a voice this node does not have must not block the call; the default speaks
            notice = ("unknown_voice", f"no voice {quote(voice)} on this server; the default voice speaks")
            voice = None
        try:
            call = await manager.create(
                offer.sdp, offer.mode, offer.system_prompt, voice, offer.options, client=client, notice=notice
            )
        except UnknownMode as exc:
            return _refused(400, "unknown_mode", exc)
        except BadOffer as exc:
            return _refused(400, "bad_sdp", exc)
        except TooManyRequests as exc:
            return _refused(429, "too_many_requests", exc, exc.retry_after)
        except ServerBusy as exc:
            return _refused(503, "server_busy", exc, retry)
        except QueueFull as exc:
            return _refused(503, "queue_full", exc, "30")
        return Reply(session_id=call.id, sdp=call.answer_sdp).model_dump()

    async def trickle(
        self, session_id: str, candidates: list[tuple[str | None, str]], end: bool
    ) -> dict[str, Any]:
        call, refusal = self._call(session_id)
        if call is None:
            return refusal
        try:
            await call.add_candidates([(mid, line) for mid, line in candidates], end)
        except BadCandidate as exc:
            return _refused(400, "bad_candidate", exc)
        except ShardError as exc:
            status = 400 if exc.code == "bad_candidate" else 404 if exc.code == "unknown_session" else 503
            return _refused(status, exc.code, exc)
        return Reply(session_id=session_id).model_dump()

    async def hangup(self, session_id: str, reason: str) -> dict[str, Any]:
        call, refusal = self._call(session_id)
        if call is None:
            return refusal
        await call.close(reason)
        return Reply(session_id=session_id).model_dump()

    async def info(self, session_id: str) -> dict[str, Any]:
        call, refusal = self._call(session_id)
        if call is None:
            return refusal
        return Reply(session_id=session_id, info=call.info().model_dump()).model_dump()

    def _call(self, session_id: str) -> tuple[Any, dict[str, Any]]:
        manager = self._server().manager
        call = manager.get(session_id)
        if call is not None:
            return call, {}
        ended = manager.how_ended(session_id)
        if ended is not None:
            return None, Reply(ok=False, status=410, code=ended[0], message=ended[1]).model_dump()
        return None, Reply(
            ok=False, status=404, code="unknown_session", message="no session at this URL"
        ).model_dump()

    # ---- reports ----

    async def admin_status(self) -> dict[str, Any]:
        """The node's `/api/admin/status` (workers, calls, queue, recent errors), as its own dashboard has it."""
        app = self._server().runner.app
        # admin_status reads only `request.app`: the node's application stands in for a request to it
        return admin_status(cast(web.Request, SimpleNamespace(app=app))).model_dump()

    async def status(self, detail: bool = False) -> dict[str, Any]:
        """Load, workers and health (the registry's poll, kept small: no per-call list); `detail`: also every
        call's info (the admin views)."""
        server = self._server()
        manager, admission = server.manager, server.manager.admission
        workers = [
            WorkerLoad(
                worker_id=w.worker_id,
                up=w.up and w.capacity_final,
                capacity_by_mode={m: float(n) for m, n in w.capacity_by_mode.items()},
                capacity=float(w.capacity),
                load=admission.load(w),
            )
            for w in server.supervisor.workers
        ]
        live = [c for c in manager.sessions.values() if c.phase != "closed"]
        load = NodeLoad(
            name=self.name, workers=workers, queued=len(admission.waiting), modes=manager.known_modes()
        )
        shards = manager.shards.shards if manager.shards is not None else []
        totals = manager.totals().stats
        return NodeStatus(
            load=load,
            ray_node_id=ray.get_runtime_context().get_node_id(),
            url=server.url,
            call_count=sum(1 for c in live),
            connecting=[c.id for c in live if c.phase == "connecting"],
            calls=[c.info().model_dump() for c in live] if detail else None,
            workers=[
                {
                    "worker_id": w.worker_id,
                    "device": w.device,
                    "up": w.up,
                    "restarts": w.restarts,
                    "pid": w.pid,
                    "capacity": w.capacity,
                    "capacity_by_mode": dict(w.capacity_by_mode),
                }
                for w in server.supervisor.workers
            ],
            shards_up=sum(1 for s in shards if s.up),
            shards=len(shards),
            frames_in=totals.frames_in,
            frames_out=totals.frames_out,
        ).model_dump()


def _refused(status: int, code: str, exc: BaseException, retry_after: str | None = None) -> dict[str, Any]:
    return Reply(ok=False, status=status, code=code, message=str(exc), retry_after=retry_after).model_dump()


def node_config(config: AppConfig) -> AppConfig:
    """The single-host config a node runs: its own server on the node's local address, any free port."""
    server = config.server.model_copy(update={"host": config.cluster.node_http_host, "port": 0, "http": True})
    return config.model_copy(update={"server": server})


def start_agent(
    name: str,
    config: AppConfig,
    *,
    ray_node_id: str | None = None,
    resource: str | None = None,
) -> ray.actor.ActorHandle:
    """Start the agent of node `name` (named and detached: fronts find it by name, and it outlives the
    process that started it), pinned to the Ray node `ray_node_id` or to the nodes that have the custom
    resource `resource`. Call `start` on it (the caller awaits that)."""
    options: dict[str, Any] = {
        "name": agent_name(name),
        "namespace": config.cluster.namespace,
        "lifetime": "detached",
    }
    if ray_node_id is not None:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(ray_node_id, soft=False)
    if resource is not None:
        options["resources"] = {resource: 0.001}
    return NodeAgent.options(**options).remote(name, node_config(config).model_dump_json())
