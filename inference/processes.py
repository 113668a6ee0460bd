"""Child processes and background tasks of the server: stopping them, the same way for workers and shards."""

from __future__ import annotations

import asyncio
import contextlib
import signal


async def terminate(process: asyncio.subprocess.Process | None, grace_s: float) -> None:
    """SIGTERM, then SIGKILL if the process has not exited after `grace_s`."""
    if process is None or process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), grace_s)
    except TimeoutError:
        kill(process)
        await process.wait()


def kill(process: asyncio.subprocess.Process | None) -> None:
    if process is not None and process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()


async def cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the tasks and wait for them to end; the list is emptied."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    tasks.clear()
