"""Cluster mode (issue 20) on a real local Ray cluster: a head and two nodes of distinct custom resources, a
node agent on each (its own CPU worker and media; loopback calls, so the tiny model is not even loaded), the
registry actor, two fronts, and real aiortc callers.

One cluster for the module (Ray's start-up is seconds, and the machine has two cores); the tests run in order.
Ray is installed by `scripts/test.sh` (requirements-cluster.txt); without it these tests fail and say so.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from tests.conftest import server_test_config
from tests.rtc_client import RATE, Call

REPO_ROOT = Path(__file__).resolve().parent.parent
TONE = (0.2 * np.sin(2 * np.pi * 300 * np.arange(RATE * 30) / RATE)).astype(np.float32)
NAMESPACE = f"rtc-test-{os.getpid()}"
CAPACITY = {"a": 2, "b": 1}  # CPU worker sessions per node: placement must follow them


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        pytest.fail("Ray is not installed: pip install -r requirements-cluster.txt (scripts/test.sh does)")
    return ray


PUBLIC = {"a": "203.0.113.7", "b": ""}  # node a stands behind a (pretend) 1:1 NAT: its answers offer this too


def node_config(capacity: int, public_address: str = "") -> Any:
    return server_test_config(
        workers={"cpu_capacity": capacity, "media_procs": 0},
        # the test's callers share the event loop that starts a Ray node (seconds, blocking): consent 5 s
        rtc={
            "consent_interval_s": 0.5,
            "consent_failures": 10,
            "connect_timeout_s": 10.0,
            "public_address": public_address,
        },
        cluster={"namespace": NAMESPACE, "poll_interval_s": 0.3, "node_timeout_s": 3.0},
    )


class LocalCluster:
    """The Ray cluster of this module, with helpers to start node agents and fronts."""

    def __init__(self) -> None:
        ray = _ray()
        from ray.cluster_utils import Cluster

        store = 80 * 1024 * 1024
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 1, "object_store_memory": store, "include_dashboard": False},
        )
        self.nodes = {
            name: self.cluster.add_node(num_cpus=1, resources={f"node_{name}": 1}, object_store_memory=store)
            for name in CAPACITY
        }
        self.cluster.wait_for_nodes()
        from cluster.connect import connect

        connect(
            node_config(1).model_copy(
                update={
                    "cluster": node_config(1).cluster.model_copy(update={"address": self.cluster.address})
                }
            )
        )
        from cluster.registry import get_or_create_registry

        self.registry = get_or_create_registry(NAMESPACE, 0.3, 3.0)
        ray.get(self.registry.ensure_started.remote())
        self.agents = {name: self.start_agent(name) for name in CAPACITY}
        self.ray = ray

    def start_agent(self, name: str) -> Any:
        from cluster.agent import start_agent

        agent = start_agent(name, node_config(CAPACITY[name], PUBLIC[name]), resource=f"node_{name}")
        _ray().get(agent.start.remote(), timeout=120)
        _ray().get(self.registry.add_node.remote(name))
        return agent

    def kill_node(self, name: str) -> None:
        self.cluster.remove_node(self.nodes.pop(name))

    async def add_node(self, name: str) -> None:
        """A fresh Ray node of that name's resource (Ray starts it in the main thread: a second or two with
        this event loop blocked), then its agent (awaited)."""
        from cluster.agent import start_agent

        self.nodes[name] = self.cluster.add_node(
            num_cpus=1, resources={f"node_{name}": 1}, object_store_memory=80 * 1024 * 1024
        )
        agent = start_agent(name, node_config(CAPACITY[name], PUBLIC[name]), resource=f"node_{name}")
        await asyncio.wait_for(agent.start.remote(), 120)
        await self.registry.add_node.remote(name)
        self.agents[name] = agent

    def close(self) -> None:
        for agent in self.agents.values():
            try:
                self.ray.get(agent.stop.remote(), timeout=30)
            except Exception:  # noqa: BLE001 (a killed node's agent is gone already)
                pass
        self.ray.shutdown()
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[LocalCluster]:
    cluster = LocalCluster()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
async def fronts(ray_cluster: LocalCluster):  # noqa: ANN201
    from cluster.front import start_front

    config = node_config(1)
    started = [await start_front(config, ray_cluster.registry) for _ in range(2)]
    yield started
    for front in started:
        await front.stop()


async def wait_for(predicate, timeout: float = 20.0, what: str = "condition") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def get_json(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, await resp.json()


async def listed(front_url: str) -> dict[str, dict[str, Any]]:
    """Every live call of the cluster (admin list through a front), by id."""
    status, body = await get_json(f"{front_url}/api/sessions")
    assert status == 200, body
    return {s["session_id"]: s for s in body["sessions"]}


async def open_call(front_url: str) -> Call:
    call = Call(front_url, TONE)
    await call.start_json("loopback")
    await call.wait_connected(20)
    return call


async def delete(front_url: str, call: Call) -> int:
    async with aiohttp.ClientSession() as http, http.delete(f"{front_url}{call.location}") as resp:
        return resp.status


async def close_all(calls: list[Call]) -> None:
    for call in calls:
        await call.close()


async def test_calls_placed_by_capacity_two_fronts_one_queue_delete_through_other_front(
    ray_cluster: LocalCluster, fronts: list[Any]
) -> None:
    one, two = (f.url for f in fronts)
    calls = [await open_call(one) for _ in range(sum(CAPACITY.values()))]
    try:
        for call in calls:
            await call.wait_event("session", phase="active", timeout=20)
        seen = await listed(two)  # the other front sees every node's calls
        assert set(seen) == {c.session_id for c in calls}
        assert Counter(s["node"] for s in seen.values()) == Counter(CAPACITY), seen
        # each answer carries its node's own candidates; node a's also its public address (same ports)
        for call in calls:
            answer = call.pc.remoteDescription.sdp
            public = f" {PUBLIC['a']} " in answer and "typ srflx raddr" in answer
            assert public == (seen[call.session_id]["node"] == "a"), answer
        # media flows from each caller straight to its node: each hears its own tone back
        deadline = time.monotonic() + 20
        while not all(c.recorder.samples > RATE for c in calls):  # 1 s of audio
            assert time.monotonic() < deadline, "no loopback audio from the nodes"
            await asyncio.sleep(0.1)

        # the cluster is full: a caller through the other front waits in a queue and hears its place
        waiting = await open_call(two)
        calls.append(waiting)
        await waiting.wait_event("queue", position=1, timeout=20)
        node = (await listed(one))[waiting.session_id]["node"]
        assert (await listed(one))[waiting.session_id]["phase"] == "queued"
        status, admin = await get_json(f"{two}/api/admin/status")  # each node's own admin view, by node
        assert status == 200 and [n["name"] for n in admin["nodes"]] == sorted(CAPACITY)
        for entry in admin["nodes"]:
            assert entry["up"] and entry["status"]["workers"][0]["up"]
            assert entry["status"]["capacity"] == CAPACITY[entry["name"]]
        queues = {n["name"]: [q["session_id"] for q in n["status"]["queue"]] for n in admin["nodes"]}
        assert queues == {name: [waiting.session_id] if name == node else [] for name in CAPACITY}, queues

        # DELETE through the other front ends a call on that node; the waiting caller gets its slot
        (leaving,) = [c for c in calls[:-1] if seen[c.session_id]["node"] == node][:1]
        assert await delete(two, leaving) == 200
        await waiting.wait_event("session", phase="active", timeout=20)
        status, gone = await get_json(f"{one}/api/sessions/{leaving.session_id}")
        assert status == 410 and gone["error"]["code"] == "session_ended", gone

        async with aiohttp.ClientSession() as http, http.get(f"{one}/metrics") as resp:
            text = await resp.text()
        for name in CAPACITY:
            assert f'rtc_cluster_node_up{{node="{name}"}} 1' in text
            assert f'rtc_cluster_node_capacity{{node="{name}",mode="loopback"}} {CAPACITY[name]}' in text
        for i, call in enumerate(c for c in calls if c is not leaving):
            assert await delete((one, two)[i % 2], call) == 200
        assert not await listed(one)
    finally:
        await close_all(calls)


async def test_node_killed_mid_call_its_callers_get_an_error_new_calls_placed_and_rejoin(
    ray_cluster: LocalCluster, fronts: list[Any]
) -> None:
    one, two = (f.url for f in fronts)
    calls = [await open_call(one) for _ in range(sum(CAPACITY.values()))]
    try:
        seen = await listed(one)
        on_b = [c for c in calls if seen[c.session_id]["node"] == "b"]
        on_a = [c for c in calls if seen[c.session_id]["node"] == "a"]
        assert len(on_b) == 1 and len(on_a) == 2
        status, nodes = await get_json(f"{one}/api/cluster")
        (b_status,) = [n["status"] for n in nodes["nodes"] if n["name"] == "b"]
        b_worker = b_status["workers"][0]["pid"]

        ray_cluster.kill_node("b")

        async def b_call_ended() -> bool:
            status, body = await get_json(f"{two}/api/sessions/{on_b[0].session_id}")
            return status == 410 and body["error"]["code"] == "node_lost"

        await wait_for(b_call_ended, 15, "the dead node's call to end with node_lost")
        assert on_a[0].session_id in await listed(two)  # the other node's calls go on
        # the dead node's worker process does not outlive its agent
        deadline = time.monotonic() + 15
        while Path(f"/proc/{b_worker}").exists():
            assert time.monotonic() < deadline, "the dead node's worker process is still running"
            await asyncio.sleep(0.2)

        # a new call is placed on the node that is left (room made there first)
        assert await delete(two, on_a[0]) == 200
        fresh = await open_call(one)
        calls.append(fresh)
        assert (await listed(two))[fresh.session_id]["node"] == "a"
        await fresh.wait_event("session", phase="active", timeout=20)

        # node b comes back: its new agent registers and takes the next call (a is full again)
        await ray_cluster.add_node("b")
        again = await open_call(two)
        calls.append(again)
        assert (await listed(one))[again.session_id]["node"] == "b"
        await again.wait_event("session", phase="active", timeout=20)
        # the front that placed `fresh` goes away: its media goes on, and the other front hangs it up
        await fronts[0].stop()
        heard = fresh.recorder.samples
        await asyncio.sleep(1.0)
        assert fresh.recorder.samples > heard + 0.4 * RATE, (
            "the call's media stopped with the front that placed it"
        )
        for call in (on_a[1], fresh, again):
            assert await delete(two, call) == 200
    finally:
        await close_all(calls)
