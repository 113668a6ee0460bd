"""Shared test fixtures: where the parity fixtures live, and the decompressed tiny checkpoint."""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


FIXTURES_IN_REPO = REPO_ROOT / "tests" / "fixtures"


def fixtures_root() -> Path:
    """The golden fixtures kept in the repo (`tests/fixtures`), or $MINICPMO45_FIXTURES.

    Missing fixtures are an error, not a skip: a parity test that cannot run must not pass silently."""
    root = Path(os.environ.get("MINICPMO45_FIXTURES", FIXTURES_IN_REPO))
    if not (root / "minicpmo45-tiny").is_dir() or not (root / "token2wav-tiny").is_dir():
        raise FileNotFoundError(f"parity fixtures not found at {root} (set MINICPMO45_FIXTURES)")
    return root


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare_tiny_model(cache: Path) -> Path:
    """Copy the tiny fixture model into `cache` with its weights decompressed and checked."""
    src = fixtures_root() / "minicpmo45-tiny" / "model"
    dest = cache / "minicpmo45-tiny"
    weights = dest / "model.safetensors"
    index = json.loads((src / "weights_index.json").read_text())
    expected_sha = index.get("sha256_uncompressed")
    if weights.is_file() and (expected_sha is None or _sha256(weights) == expected_sha):
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".xz":
            shutil.copy2(f, dest / f.name)
    tmp = weights.with_suffix(".tmp")
    with lzma.open(src / "model.safetensors.xz") as zin, tmp.open("wb") as zout:
        shutil.copyfileobj(zin, zout)
    if expected_sha is not None and _sha256(tmp) != expected_sha:
        raise RuntimeError("decompressed tiny weights do not match the sha256 in weights_index.json")
    tmp.rename(weights)
    return dest


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return fixtures_root()


@pytest.fixture(scope="session")
def tiny_fixture_dir() -> Path:
    return fixtures_root() / "minicpmo45-tiny"


@pytest.fixture(scope="session")
def token2wav_fixture_dir() -> Path:
    return fixtures_root() / "token2wav-tiny"


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny official-format checkpoint, decompressed once into .cache/ in the repo."""
    return prepare_tiny_model(REPO_ROOT / ".cache" / "fixtures")


# ---- WebRTC server fixtures (rtc_server tests) ----


def server_test_config(**sections: dict):
    """A config for an in-process test server: plain HTTP on 127.0.0.1, a free port, quick timeouts."""
    from rtc_server.config import build_config

    values: dict = {
        "server": {"host": "127.0.0.1", "port": 0, "http": True},
        "workers": {"heartbeat_interval_s": 0.3, "heartbeat_timeout_s": 3.0, "restart_delay_s": 0.2},
        "queue": {"update_interval_s": 0.5},
        "rtc": {"consent_interval_s": 0.5, "consent_failures": 3, "connect_timeout_s": 10.0},
        "recording": {"dir": tempfile.mkdtemp(prefix="recordings-")},  # on, as by default, off the repo
    }
    for name, overrides in sections.items():
        values.setdefault(name, {}).update(overrides)
    return build_config(values)


@pytest.fixture
async def start_test_server():
    """Call it with config sections (e.g. `queue={"max_length": 1}`) to get a running server; all are
    stopped at the end of the test, and the test fails if a worker process or session was left behind."""
    from rtc_server.app import start_server

    servers = []

    async def start(**sections: dict):
        server = await start_server(server_test_config(**sections))
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()
        assert not server.manager.sessions, "sessions left after stop"
        for worker in server.supervisor.workers:
            assert worker.process is None or worker.process.returncode is not None, "worker process leaked"
        for shard in server.manager.shards.shards if server.manager.shards is not None else []:
            assert shard.process is None or shard.process.returncode is not None, "media shard process leaked"
