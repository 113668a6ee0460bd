"""`run.py --cluster ADDRESS` (a front) and `run.py --cluster ADDRESS --node` (this host's node agent)."""

from __future__ import annotations

import asyncio
import signal
import socket

from cluster.connect import ClusterError, connect
from rtc_server.config import AppConfig


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _registry(config: AppConfig):  # noqa: ANN202 (a Ray actor handle)
    from cluster.registry import get_or_create_registry

    cluster = config.cluster
    return get_or_create_registry(cluster.namespace, cluster.poll_interval_s, cluster.node_timeout_s)


async def serve_front(config: AppConfig) -> None:
    connect(config)
    from cluster.front import start_front

    front = await start_front(config, _registry(config))
    print(f"cluster front serving on {front.url} (Ray at {config.cluster.address}); Ctrl-C stops", flush=True)
    try:
        await _until_signalled()
    finally:
        await front.stop()


async def serve_node(config: AppConfig) -> None:
    """Start this host's agent, pinned to the local Ray node, register it, and keep it until stopped."""
    ray = connect(config)
    from cluster.agent import start_agent

    name = config.cluster.node_name or socket.gethostname()
    try:
        agent = start_agent(name, config, ray_node_id=ray.get_runtime_context().get_node_id())
    except ValueError as exc:  # the name is taken: that node's agent runs (here or on another host)
        raise ClusterError(
            f"node {name!r} already has a running agent (set cluster.node_name): {exc}"
        ) from None
    registry = _registry(config)
    await registry.ensure_started.remote()
    status = await agent.start.remote()
    await registry.add_node.remote(name)
    print(f"node {name} up: its own server on {status['url']}; Ctrl-C stops", flush=True)
    try:
        await _until_signalled()
    finally:
        await agent.stop.remote()
        ray.kill(agent)
