"""The life cycle shared by the inbound track readers: one asyncio task per reader, started once, stoppable
more than once, awaitable until the track ends."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod


class TrackReader(ABC):
    task_name = "track-reader"

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    @abstractmethod
    async def _run(self) -> None:
        """Read the track until it ends."""

    def start(self) -> None:
        """Start the reader task on the running event loop."""
        if self._task is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.task_name)

    async def stop(self) -> None:
        """Cancel the reader and wait for it; safe to call more than once."""
        task = self._task
        if task is None or task.done():
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    async def wait_ended(self) -> None:
        """Wait until the reader has finished (track ended or stopped)."""
        if self._task is not None:
            await asyncio.wait({self._task})
