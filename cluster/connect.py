"""Joining the Ray cluster at start-up, with clear errors when Ray is missing or out of reach."""

from __future__ import annotations

import importlib
import os
import socket
from typing import Any

from rtc_server.config import AppConfig

INSTALL_HINT = "pip install -r requirements-cluster.txt"
CONNECT_TIMEOUT_S = 3.0


class ClusterError(RuntimeError):
    """Cluster mode cannot start: Ray is not installed, or the cluster cannot be reached."""


def connect(config: AppConfig) -> Any:
    """`ray.init` on `cluster.address` (auto, HOST:PORT of a cluster's head, or ray://HOST:PORT); returns the
    ray module. Raises ClusterError with what to do."""
    address = config.cluster.address
    try:
        ray = importlib.import_module("ray")
    except ImportError:
        raise ClusterError(
            f"cluster mode ({address}) needs Ray, which is not installed: {INSTALL_HINT}"
        ) from None
    if ray.is_initialized():
        return ray
    _reachable(address)
    # Ray Client (ray://) retries for minutes by default; a front that cannot reach the cluster should say so
    os.environ.setdefault("RAY_CLIENT_RECONNECT_GRACE_PERIOD", "5")
    try:
        ray.init(
            address=address,
            namespace=config.cluster.namespace,
            log_to_driver=False,
            logging_level="WARNING",
            # the repo on every node of this cluster is the same checkout at the same path (docs/CLUSTER.md)
            runtime_env={"env_vars": {"PYTHONPATH": _repo_root()}},
        )
    except (ConnectionError, RuntimeError, TimeoutError, ValueError) as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address!r}: {exc}") from None
    return ray


def _reachable(address: str) -> None:
    """A HOST:PORT (or ray://HOST:PORT) that refuses TCP fails here at once: `ray.init` would wait for the
    GCS for minutes (Ray Client: 30 s) before it says so."""
    if address == "auto":
        return  # ray.init finds the local cluster or says at once that there is none
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterError(f"cluster.address must be auto, HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address!r}: {exc}") from None


def _repo_root() -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parent.parent)
