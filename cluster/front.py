"""A cluster front: the signalling API over Ray, placing each call on a node and routing the rest to it.

A front holds no call state: it asks the registry actor where a new call goes and which node owns a call, and
passes offers, trickled candidates and hang-ups to that node's agent. Media never passes through it, so a
front that dies takes no call with it, and any other front (behind the same HTTP load balancer) serves the
calls' PATCH and DELETE. Routes: `POST /api/sessions`, `GET|DELETE /api/sessions/{id}`, `POST /whip`,
`PATCH|DELETE /whip/{id}`, admin `GET /api/sessions`, `GET /api/cluster` and `GET /api/admin/status`
(every node), `/metrics`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import ray
from aiohttp import web
from ray.exceptions import RayActorError

from cluster.agent import agent_name
from cluster.messages import NodeStatus, OfferIn, Reply
from cluster.registry import NODE_LOST
from rtc_server import events as ev
from rtc_server.app import MAX_BODY_KEY, auth_middleware, json_errors, limit_body
from rtc_server.client_limits import client_of
from rtc_server.config import AppConfig
from rtc_server.metrics import CONTENT_TYPE, Exposition
from rtc_server.signalling import (
    SDP_TYPE,
    TRICKLE_TYPE,
    ApiError,
    check_admin,
    parse_sdpfrag,
    read_session_request,
    read_text,
    require_type,
    whip_query,
)

log = logging.getLogger("cluster.front")
FRONT_KEY = web.AppKey("cluster_front", "ClusterFront")
OFFER_ATTEMPTS = 3  # nodes an offer may try when the first ones turn out dead


class ClusterFront:
    """The Ray side of a front: the registry and the node agents it talks to."""

    def __init__(self, config: AppConfig, registry: Any) -> None:
        self.config = config
        self.registry = registry
        self.agents: dict[str, Any] = {}

    def agent(self, node: str) -> Any:
        handle = self.agents.get(node)
        if handle is None:
            handle = ray.get_actor(agent_name(node), namespace=self.config.cluster.namespace)
            self.agents[node] = handle
        return handle

    async def call_node(self, node: str, method: str, *args: Any) -> Reply:
        """Call an agent's method; a dead or missing agent is a 503 `node_lost` (and the registry hears). A
        handle this front kept of an agent that has since started again is looked up anew once."""
        for attempt in range(2):
            cached = node in self.agents
            try:
                raw = await getattr(self.agent(node), method).remote(*args)
            except (RayActorError, ValueError) as exc:
                self.agents.pop(node, None)
                if cached and attempt == 0:
                    continue
                await self.registry.node_failed.remote(node, f"{method} failed: {type(exc).__name__}")
                return Reply(ok=False, status=503, code=NODE_LOST, message=f"node {node} is gone")
            return Reply.model_validate(raw)
        raise AssertionError("unreachable")

    async def create(self, offer: OfferIn) -> Reply:
        """Place the call and pass its offer to that node; a node found dead on the way (the registry had not
        noticed yet) is skipped and the call placed again."""
        for _ in range(OFFER_ATTEMPTS):
            placed = await self.registry.place.remote(offer.mode)
            if placed is None:
                return Reply(ok=False, status=503, code="no_nodes", message="no node of the cluster is up")
            node, key = placed["node"], placed["key"]
            reply = await self.call_node(node, "offer", offer.model_dump())
            if reply.ok:
                await self.registry.bind.remote(key, node, reply.session_id, offer.mode)
                return reply
            await self.registry.unplace.remote(key, node)
            if reply.code != NODE_LOST:
                return reply
        return reply

    async def route(self, session_id: str, method: str, *args: Any) -> Reply:
        """A request about a call, sent to the node that owns it."""
        where = await self.registry.where.remote(session_id)
        if "ended" in where:
            code, why = where["ended"]
            return Reply(ok=False, status=410, code=code, message=why)
        if "node" not in where:
            return Reply(ok=False, status=404, code="unknown_session", message="no session at this URL")
        return await self.call_node(where["node"], method, session_id, *args)

    async def nodes(self) -> list[dict[str, Any]]:
        """Every node with its status as of now (the admin views and /metrics)."""
        return await self.registry.nodes.remote(True)


def _front(request: web.Request) -> ClusterFront:
    return request.app[FRONT_KEY]


def _raise(reply: Reply) -> None:
    if not reply.ok:
        headers = {"Retry-After": reply.retry_after} if reply.retry_after else None
        raise ApiError(reply.status, reply.code, reply.message, headers=headers)


def _offer(request: web.Request, sdp: str, mode: str, **extra: Any) -> OfferIn:
    front = _front(request)
    bearer = request.headers.get("Authorization") if front.config.auth.api_token else None
    client = client_of(request.remote, bearer)
    return OfferIn(sdp=sdp, mode=mode, client_address=client.address, client_token=client.token, **extra)


async def create_session(request: web.Request) -> web.Response:
    body, options = await read_session_request(request)
    offer = _offer(
        request, body.sdp, body.mode, system_prompt=body.system_prompt, voice=body.voice, options=options
    )
    reply = await _front(request).create(offer)
    _raise(reply)
    answer = ev.SessionAnswer(session_id=reply.session_id, sdp=reply.sdp)
    return web.json_response(
        answer.model_dump(), status=201, headers={"Location": f"/api/sessions/{reply.session_id}"}
    )


async def get_session(request: web.Request) -> web.Response:
    reply = await _front(request).route(request.match_info["session_id"], "info")
    _raise(reply)
    return web.json_response(reply.info)


async def delete_session(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    _raise(await _front(request).route(session_id, "hangup", "hangup (DELETE)"))
    return web.json_response({"session_id": session_id, "closed": True})


async def list_sessions(request: web.Request) -> web.Response:
    check_admin(request, _front(request).config.auth.admin_token)
    sessions: list[dict[str, Any]] = []
    for node in await _front(request).nodes():
        if node["up"] and node["status"] is not None:
            sessions += [{**call, "node": node["name"]} for call in node["status"]["calls"] or []]
    return web.json_response({"sessions": sessions})


async def admin_status(request: web.Request) -> web.Response:
    """Every up node's own admin status (workers, calls, queue, recent errors), by node."""
    check_admin(request, _front(request).config.auth.admin_token)
    front = _front(request)
    nodes = []
    for node in await front.nodes():
        status = None
        if node["up"]:
            try:
                status = await front.agent(node["name"]).admin_status.remote()
            except (RayActorError, ValueError):
                front.agents.pop(node["name"], None)
        nodes.append({"name": node["name"], "up": status is not None, "status": status})
    return web.json_response({"nodes": nodes}, headers={"Cache-Control": "no-store"})


async def cluster_nodes(request: web.Request) -> web.Response:
    check_admin(request, _front(request).config.auth.admin_token)
    return web.json_response({"nodes": await _front(request).nodes()})


async def whip_offer(request: web.Request) -> web.Response:
    require_type(request, SDP_TYPE)
    mode, system_prompt, voice = whip_query(request)
    offer = _offer(request, await read_text(request), mode, system_prompt=system_prompt, voice=voice)
    reply = await _front(request).create(offer)
    _raise(reply)
    return web.Response(
        status=201, text=reply.sdp, content_type=SDP_TYPE, headers={"Location": f"/whip/{reply.session_id}"}
    )


async def whip_patch(request: web.Request) -> web.Response:
    require_type(request, TRICKLE_TYPE)
    candidates, end = parse_sdpfrag(await read_text(request))
    _raise(await _front(request).route(request.match_info["session_id"], "trickle", candidates, end))
    return web.Response(status=204)


async def whip_delete(request: web.Request) -> web.Response:
    _raise(await _front(request).route(request.match_info["session_id"], "hangup", "hangup (WHIP DELETE)"))
    return web.Response(status=204)


async def metrics(request: web.Request) -> web.Response:
    nodes = await _front(request).nodes()
    out = Exposition()
    up_rows, call_rows, free_rows, queue_rows, cap_rows, worker_rows, placed_rows = [], [], [], [], [], [], []
    for node in nodes:
        labels = {"node": node["name"]}
        up_rows.append((labels, int(node["up"])))
        placed_rows.append((labels, node["placed_total"]))
        if not node["up"] or node["status"] is None:
            continue
        status = NodeStatus.model_validate(node["status"])
        call_rows.append((labels, status.call_count))
        free_rows.append((labels, round(status.load.free_share(), 4)))
        queue_rows.append((labels, status.load.queued))
        cap_rows += [({**labels, "mode": m}, n) for m, n in status.load.capacity_by_mode().items()]
        worker_rows += [
            ({**labels, "worker": str(w["worker_id"]), "device": w["device"]}, int(w["up"]))
            for w in status.workers
        ]
    out.metric("rtc_cluster_node_up", "gauge", "1 while the node's agent answers.", up_rows)
    out.metric("rtc_cluster_node_calls", "gauge", "Live calls on each node.", call_rows)
    out.metric(
        "rtc_cluster_node_free_share",
        "gauge",
        "Free worker share of each node (1.0 = one idle worker).",
        free_rows,
    )
    out.metric(
        "rtc_cluster_node_queue_length", "gauge", "Callers waiting in each node's FIFO queue.", queue_rows
    )
    out.metric("rtc_cluster_node_capacity", "gauge", "Calls of each mode a node's up workers hold.", cap_rows)
    out.metric(
        "rtc_cluster_worker_up", "gauge", "1 while the worker process of a node is connected.", worker_rows
    )
    out.metric(
        "rtc_cluster_calls_placed_total",
        "counter",
        "Calls placed on each node since the registry started.",
        placed_rows,
    )
    return web.Response(body=out.text().encode(), headers={"Content-Type": CONTENT_TYPE})


def make_front_app(config: AppConfig, front: ClusterFront) -> web.Application:
    middlewares = [json_errors]
    if config.auth.api_token:
        middlewares.append(auth_middleware(config.auth.api_token))
    middlewares.append(limit_body)
    app = web.Application(middlewares=middlewares, client_max_size=config.server.max_body_bytes)
    app[FRONT_KEY] = front
    app[MAX_BODY_KEY] = config.server.max_body_bytes
    app.router.add_post("/api/sessions", create_session)
    app.router.add_get("/api/sessions", list_sessions)
    app.router.add_get("/api/sessions/{session_id}", get_session)
    app.router.add_delete("/api/sessions/{session_id}", delete_session)
    app.router.add_get("/api/cluster", cluster_nodes)
    app.router.add_get("/api/admin/status", admin_status)
    app.router.add_post("/whip", whip_offer)
    app.router.add_patch("/whip/{session_id}", whip_patch)
    app.router.add_delete("/whip/{session_id}", whip_delete)
    app.router.add_get("/metrics", metrics)
    return app


@dataclass
class RunningFront:
    url: str
    front: ClusterFront
    runner: web.AppRunner

    async def stop(self) -> None:
        if self.runner.server is not None:  # not stopped yet
            await self.runner.cleanup()


async def start_front(config: AppConfig, registry: Any) -> RunningFront:
    """Serve a front on `server.host:port` (plain HTTP when `server.http`, else the self-signed HTTPS)."""
    from rtc_server.app import REPO_ROOT
    from rtc_server.certs import server_ssl_context

    await registry.ensure_started.remote()
    front = ClusterFront(config, registry)
    runner = web.AppRunner(make_front_app(config, front), access_log=None, handle_signals=False)
    await runner.setup()
    ssl_context = None if config.server.http else server_ssl_context(REPO_ROOT / config.server.certs_dir)
    site = web.TCPSite(runner, config.server.host, config.server.port, ssl_context=ssl_context)
    await site.start()
    port = runner.addresses[0][1]
    scheme = "http" if config.server.http else "https"
    host = "localhost" if config.server.host in ("0.0.0.0", "::") else config.server.host
    return RunningFront(f"{scheme}://{host}:{port}", front, runner)
