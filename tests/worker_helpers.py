"""What the worker tests share: the embedded model's settings, and a session sink that records what arrives."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from inference import protocol as p
from inference.settings import ModelSettings, WorkerSettings
from tests.conftest import REPO_ROOT


def embedded(model: dict[str, Any] | None = None, **settings: Any) -> WorkerSettings:
    """Worker settings of the embedded model, with these `[model]` keys and other settings."""
    cache_dir = str(REPO_ROOT / ".cache" / "embedded")
    return WorkerSettings(model=ModelSettings(cache_dir=cache_dir, **(model or {})), **settings)


EMBEDDED = embedded()


class Sink:
    """A session as the supervisor or a media shard sees it: collects what the worker sends."""

    def __init__(self) -> None:
        self.got: list[tuple[p.Message, bytes]] = []
        self.lost: list[str] = []
        self.changed = asyncio.Event()

    def on_worker_message(self, message: p.Message, payload: bytes) -> None:
        self.got.append((message, payload))
        self.changed.set()

    def on_worker_lost(self, reason: str) -> None:
        self.lost.append(reason)
        self.changed.set()

    def of(self, kind: type) -> list:
        return [m for m, _ in self.got if isinstance(m, kind)]

    def errors(self, code: str) -> list[p.ErrorOut]:
        return [m for m in self.of(p.ErrorOut) if m.code == code]

    async def wait(self, ready: Callable[[], bool], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), max(0.0, deadline - time.monotonic()))
