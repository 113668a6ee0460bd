"""Child processes and background tasks of the server: stopping them, the same way for workers and shards."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import signal
import sys

PR_SET_NAME = 15  # prctl option: the calling thread's name


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


def name_this_thread(name: str) -> None:
    """Give the calling OS thread a name (15 bytes at most) that `top -H` and /proc/<pid>/task/*/comm show, so
    a process's CPU can be told apart by thread (the benchmark reads it). Linux only; elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
