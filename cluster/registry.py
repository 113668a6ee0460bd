"""The cluster's one state: the nodes, where each call lives, and placement (a named, detached Ray actor).

Every front asks it where a new call goes (so offers from all fronts are placed in one order, on one view of
the nodes) and which node owns a call (so PATCH, DELETE and a call's info work from any front). It polls each
node agent for its status; an agent that Ray reports dead (or that misses `node_timeout_s` of polls) is marked
down: placement stops using it and its calls end with `node_lost`, which their callers get from any front. A
node whose agent starts again under the same name is used again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import OrderedDict
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from cluster.agent import agent_name
from cluster.messages import NodeStatus
from cluster.placement import Placer

log = logging.getLogger("cluster.registry")
REGISTRY_NAME = "rtc-registry"
NODE_LOST = "node_lost"
HEAD_RESOURCE = "node:__internal_head__"  # Ray's own resource of the head node
KEPT_CALLS = 100_000  # call -> node entries kept (live calls and the most recent ended ones)


@ray.remote(num_cpus=0, max_concurrency=1000)
class Registry:
    def __init__(self, namespace: str, poll_interval_s: float, node_timeout_s: float) -> None:
        self.namespace = namespace
        self.poll_interval_s = poll_interval_s
        self.node_timeout_s = node_timeout_s
        self.placer = Placer()
        self.status: dict[str, NodeStatus] = {}
        self.up: dict[str, bool] = {}
        self.last_seen: dict[str, float] = {}
        self.handles: dict[str, Any] = {}
        self.calls: OrderedDict[str, str] = OrderedDict()  # session id -> node
        self.ended: OrderedDict[str, tuple[str, str]] = OrderedDict()  # session id -> (code, why)
        self.keys = itertools.count(1)
        self.placed_total: dict[str, int] = {}
        self.task: asyncio.Task[None] | None = None

    async def ensure_started(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._poll_forever())

    # ---- nodes ----

    async def add_node(self, name: str) -> None:
        """A node agent has started (or started again): poll it now, and place calls there."""
        self.handles.pop(name, None)
        self.last_seen[name] = time.monotonic()
        await self._poll(name)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.gather(*(self._poll(name) for name in list(self.last_seen)))
            await asyncio.sleep(self.poll_interval_s)

    async def _poll(self, name: str, detail: bool = False) -> NodeStatus | None:
        """Ask node `name` for its status and take it in; None if it did not answer."""
        try:
            handle = self.handles.get(name)
            if handle is None:
                handle = ray.get_actor(agent_name(name), namespace=self.namespace)
                self.handles[name] = handle
            report = await asyncio.wait_for(handle.status.remote(detail), self.node_timeout_s)
        except (RayActorError, ValueError) as exc:  # dead, or no actor of that name (any more)
            self.handles.pop(name, None)
            self._down(name, f"Ray reports its agent gone ({type(exc).__name__})")
            return None
        except (TimeoutError, GetTimeoutError):
            if time.monotonic() - self.last_seen.get(name, 0.0) > self.node_timeout_s:
                self._down(name, f"no status for {self.node_timeout_s} s")
            return None
        status = NodeStatus.model_validate(report)
        self.last_seen[name] = time.monotonic()
        if not self.up.get(name):
            log.info("node %s: up", name)
        self.up[name] = True
        self.status[name] = status
        # a bound call still connecting is in neither the node's load nor its queue yet: it stays pending
        connecting = set(status.connecting)
        counted = [
            k
            for k, _ in self.placer.pending.get(name, [])
            if not k.startswith("pending-") and k not in connecting
        ]
        self.placer.report(status.load, counted)
        return status

    def _down(self, name: str, why: str) -> None:
        if self.up.get(name) is False:
            return
        self.up[name] = False
        log.warning("node %s: down (%s)", name, why)
        self.placer.node_down(name)
        for session_id, node in list(self.calls.items()):
            if node == name and session_id not in self.ended:
                self._end(session_id, NODE_LOST, f"the node that carried the call ({name}) stopped: {why}")

    def _end(self, session_id: str, code: str, why: str) -> None:
        self.ended[session_id] = (code, why)
        while len(self.ended) > KEPT_CALLS:
            self.ended.popitem(last=False)

    async def nodes(self, fresh: bool = False) -> list[dict[str, Any]]:
        """Every node ever registered: up or not, and its last status (`fresh`: asked for now, with every
        call's info)."""
        names = sorted(self.last_seen)
        detailed: dict[str, NodeStatus | None] = {}
        if fresh:
            reports = await asyncio.gather(*(self._poll(name, detail=True) for name in names))
            detailed = dict(zip(names, reports, strict=True))
        out = []
        for name in names:
            status = detailed.get(name) or self.status.get(name)
            out.append(
                {
                    "name": name,
                    "up": bool(self.up.get(name)),
                    "placed_total": self.placed_total.get(name, 0),
                    "status": status.model_dump() if status is not None else None,
                }
            )
        return out

    # ---- calls ----

    async def place(self, mode: str) -> dict[str, Any] | None:
        """The node for a new call of `mode` (with a key to `bind` or `unplace` it), or None if none is up."""
        chosen = self.placer.choose(mode)
        if chosen is None:
            return None
        name, admitted = chosen
        key = f"pending-{next(self.keys)}"
        self.placer.placed(name, key, mode)
        return {"node": name, "admitted": admitted, "key": key}

    async def bind(self, key: str, node: str, session_id: str, mode: str) -> None:
        """The node answered the call placed under `key`: it is `session_id` from now on."""
        self.placer.rename(node, key, session_id)
        self.calls[session_id] = node
        self.placed_total[node] = self.placed_total.get(node, 0) + 1
        while len(self.calls) > KEPT_CALLS:
            self.calls.popitem(last=False)
        if self.up.get(node) is False:  # the node died while it answered
            self._end(session_id, NODE_LOST, f"the node that carried the call ({node}) stopped")

    async def unplace(self, key: str, node: str) -> None:
        self.placer.unplace(node, key)

    async def where(self, session_id: str) -> dict[str, Any]:
        """{"node": name} for a call a node may still hold, {"ended": [code, why]} for one whose node died,
        or {} for an unknown id."""
        ended = self.ended.get(session_id)
        if ended is not None:
            return {"ended": list(ended)}
        node = self.calls.get(session_id)
        return {"node": node} if node is not None else {}

    async def node_failed(self, name: str, why: str) -> None:
        """A front saw the node's agent die on a request: do not wait for the next poll."""
        self.handles.pop(name, None)
        with contextlib.suppress(Exception):
            await self._poll(name)
        if self.up.get(name):
            return
        self._down(name, why)


def get_or_create_registry(namespace: str, poll_interval_s: float, node_timeout_s: float) -> Any:
    """The cluster's registry actor: created detached by the first front or node, found by name after. It
    lives on the head node (whose loss ends the Ray cluster anyway), never on a node that may die alone."""
    return Registry.options(
        name=REGISTRY_NAME,
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        resources={HEAD_RESOURCE: 0.001},
    ).remote(namespace, poll_interval_s, node_timeout_s)
