"""Camera frames that come ahead of their units (`protocol.FrameAhead`), encoded between ticks: `FramesAhead`.

An omni unit's frame is taken ~150 ms before the unit's audio is complete (`rtc_server.call_uplink`). Sent
then, the worker runs it through the vision tower while the GPU is between tick phases (or right after the
other phase's tick), and the unit's own tick only feeds the rows: the vision tower is off the unit's round trip.
The encodes run on the mode thread like the ticks, so a tick and an encode never overlap and a unit's tick
finds the encode done that was queued before it. Frames arriving within `GATHER_S` of each other go in one
call, and one encode takes every frame that came while it waited for the mode thread (a phase's frames come
while the other phase's tick runs).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import Any

import numpy as np

from inference.modes.base import WorkerMode, frames_ahead_encoder

log = logging.getLogger("inference.worker")
GATHER_S = 0.02  # how long the first frame waits for others before its encode is queued


class FramesAhead:
    def __init__(self, executor: concurrent.futures.Executor) -> None:
        """`executor`: the mode thread."""
        self.executor = executor
        self._lock = threading.Lock()  # `pending` is filled on the event loop and taken on the mode thread
        # (encoder, mode, frame, its unit's index)
        self._pending: list[tuple[Any, WorkerMode, np.ndarray, int]] = []
        self._queued = False  # an encode is queued that has not taken the pending frames yet
        self.encoded = 0  # frames through the tower
        self.failed = 0  # frames whose encode failed (their units encode them in their ticks)

    def add(self, mode: WorkerMode, frame: np.ndarray, index: int) -> bool:
        """Encode the frame of this session's unit `index` before that unit comes; False when its mode takes none."""
        encoder = frames_ahead_encoder(mode)
        if encoder is None:
            return False
        with self._lock:
            self._pending.append((encoder, mode, frame, index))
            if self._queued:
                return True
            self._queued = True
        asyncio.get_running_loop().call_later(GATHER_S, self._queue)
        return True

    def _queue(self) -> None:
        future = asyncio.get_running_loop().run_in_executor(self.executor, self._encode)
        future.add_done_callback(_log_failure)

    def _encode(self) -> None:
        """On the mode thread: every pending frame, one call per mode class. A failure is logged and leaves
        those units to encode their frames in their ticks."""
        with self._lock:
            batch, self._pending = self._pending, []
            self._queued = False
        groups: dict[Any, list[tuple[WorkerMode, np.ndarray, int]]] = {}
        for encoder, mode, frame, index in batch:
            groups.setdefault(encoder, []).append((mode, frame, index))
        for encoder, items in groups.items():
            try:
                encoder(items)
            except Exception:
                self.failed += len(items)
                log.exception(
                    "encoding %d frames ahead of their units failed; their ticks encode them", len(items)
                )
            else:
                self.encoded += len(items)


def _log_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("frames ahead: %r", future.exception())
