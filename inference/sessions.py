"""The worker's sessions: each one's bounded message queue (`SessionQueue`), the runner that feeds its mode in
order on the mode thread (`SessionRunner`), and the table of sessions across connections (`Sessions`).

A mode's outputs are the protocol's own session messages (`inference.modes.base.Output`): the runner fills in
the session id (and the speech's rate) and sends them; the mode's `UnitMetrics` go into the unit's
`unit_done` with the worker's own timings.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import deque
from typing import Any

import numpy as np

from inference import protocol as p
from inference.frames_ahead import FramesAhead
from inference.modes import create_mode
from inference.modes.base import (
    ModeUnit,
    Output,
    SessionOptions,
    WorkerMode,
    batch_runner,
    catches_up,
)
from inference.processes import name_this_thread
from inference.settings import WorkerSettings
from inference.ticker import UnitTicker
from MiniCPMO45.audio.rates import MODEL_INPUT_RATE, SPEECH_RATE

log = logging.getLogger("inference.worker")
# A healthy session has a unit or two waiting; one this far behind has lost its real-time flow anyway.
MAX_QUEUED_UNITS = 64
# units without one from a batching session after which its phase's ticks stop waiting for it
QUIET_UNITS = 2.0
MAX_QUEUED_CONTROLS = 64  # controls and opens waiting in one session
FRAMES_AHEAD_KEPT = 2  # frames that came ahead of their units a session keeps (the newest)
SESSION_MESSAGES = (p.OpenSession, p.Unit, p.FrameAhead, p.Control, p.CloseSession)


class Connection:
    """Writes messages to a peer (the server's control connection or a data link); event loop only. Once the
    peer is gone, sends are dropped: what a session still says has nobody to go to."""

    def __init__(self, writer: asyncio.StreamWriter, name: str = "server") -> None:
        self._writer = writer
        self.name = name
        self.closed = False

    async def send(self, message: p.BaseModel, payload: bytes = b"") -> None:
        if self.closed or self._writer.is_closing():
            self.closed = True
            return
        self._writer.write(p.encode(message, payload))
        try:
            await self._writer.drain()
        except ConnectionError:
            self.closed = True


Queued = tuple[p.Message, bytes, float]  # message, payload, when it was received


class SessionQueue:
    """A session's messages waiting for its runner, in order, bounded: a unit past `max_units` pushes out the
    oldest waiting unit (fresh audio matters more than stale), a control or open past `max_controls` is
    refused (a state change must not jump ahead of earlier ones); the end marker always goes in."""

    def __init__(self, max_units: int = MAX_QUEUED_UNITS, max_controls: int = MAX_QUEUED_CONTROLS) -> None:
        self.max_units = max_units
        self.max_controls = max_controls
        self.units = 0
        self.controls = 0
        self._items: deque[Queued | None] = deque()
        self._ready = asyncio.Event()

    def put(self, item: Queued) -> p.Message | None:
        """Queue a message; returns the message dropped to respect the bounds, if any."""
        message = item[0]
        dropped: p.Message | None = None
        if isinstance(message, p.Unit):
            if self.units >= self.max_units:
                dropped = self._drop_oldest_unit()
            self.units += 1
        elif self.controls >= self.max_controls:
            return message
        else:
            self.controls += 1
        self._items.append(item)
        self._ready.set()
        return dropped

    def end(self) -> None:
        self._items.append(None)
        self._ready.set()

    def abort(self) -> None:
        """End now: what is still waiting is dropped (its peer is gone), then the end marker."""
        self._items.clear()
        self.units = self.controls = 0
        self.end()

    async def get(self) -> Queued | None:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if item is not None:
            if isinstance(item[0], p.Unit):
                self.units -= 1
            else:
                self.controls -= 1
        return item

    def take_units(self) -> list[Queued]:
        """The units at the head of the queue, up to the first message that is not one (a control must still
        come after the units before it)."""
        taken: list[Queued] = []
        while self._items and (item := self._items[0]) is not None and isinstance(item[0], p.Unit):
            taken.append(item)
            self._items.popleft()
            self.units -= 1
        return taken

    def _drop_oldest_unit(self) -> p.Message:
        for i, item in enumerate(self._items):
            if item is not None and isinstance(item[0], p.Unit):
                del self._items[i]
                self.units -= 1
                return item[0]
        raise AssertionError("no unit queued")


class SessionRunner:
    """Feeds one session's messages to its mode, in order, in the mode thread."""

    def __init__(
        self,
        session_id: str,
        conn: Connection,
        executor: concurrent.futures.Executor,
        ticker: UnitTicker,
        settings: WorkerSettings,
        frames_ahead: FramesAhead,
    ) -> None:
        """`executor`: the mode thread; `frames_ahead`: the worker's encodes of frames that come ahead."""
        self.session_id = session_id
        self.conn = conn
        self.executor = executor
        self.ticker = ticker
        self.frames_ahead = frames_ahead
        # frames that came ahead of their units (`protocol.FrameAhead`), by unit index, until their units come
        self.early_frames: dict[int, np.ndarray] = {}
        self.settings = settings
        self.mode: WorkerMode | None = None
        self.phase: int | None = None  # the ticker's phase while the mode batches
        # the grid its units tick on: its phase, or None when the mode's sessions of every phase tick together
        self.grid: int | None = None
        # when the session last sent a unit (or its mode opened) and how often it does: a batching session that
        # has sent none for `QUIET_UNITS` units (a paused call) no longer holds its phase's ticks back
        self.heard_at = 0.0
        self.unit_s = 1.0
        self.output_rate = SPEECH_RATE
        self.queue = SessionQueue()
        self.dropped = 0  # messages the full queue dropped
        # one batch of outputs at a time: a unit's early ones, then the rest, in order
        self.sending = asyncio.Lock()
        self.task = asyncio.create_task(self._run(), name=f"session-{session_id}")

    def submit(self, message: p.Message, payload: bytes, received_at: float) -> p.ErrorOut | None:
        """Queue a message; returns the notice for the session when its full queue dropped one."""
        dropped = self.queue.put((message, payload, received_at))
        if dropped is None:
            return None
        self.dropped += 1
        if self.dropped & (self.dropped - 1) == 0:  # the 1st, 2nd, 4th, ...: a flood must not flood the log
            log.warning(
                "session %s: queue full, %s dropped; %d so far", self.session_id, dropped.type, self.dropped
            )
        if isinstance(dropped, p.Unit):
            return p.ErrorOut(
                session_id=self.session_id,
                code=p.UNITS_DROPPED,
                message=f"unit {dropped.index} dropped: the session is {self.queue.max_units} units behind",
            )
        return p.ErrorOut(
            session_id=self.session_id,
            code=p.CONTROLS_DROPPED,
            message=f"{dropped.type} message dropped: {self.queue.max_controls} messages are waiting",
        )

    def frame_ahead(self, message: p.FrameAhead, payload: bytes) -> None:
        """A frame of a unit still to come: kept for that unit, and encoded now where the mode can."""
        try:
            frame = p.frame_ahead_pixels(message, payload)
        except p.ProtocolError as exc:
            log.warning("session %s: %s (unit %d will have no frame)", self.session_id, exc, message.index)
            return
        self.early_frames.pop(message.index, None)
        self.early_frames[message.index] = frame
        for index in list(self.early_frames)[:-FRAMES_AHEAD_KEPT]:  # the oldest to come go first
            del self.early_frames[index]
        if self.mode is not None:
            self.frames_ahead.add(self.mode, frame, message.index)

    def _unit_frame(self, units: list[p.Unit], frame: np.ndarray | None) -> np.ndarray | None:
        """The frame of the newest of these units: its own, or the one that came ahead of it. The frames that
        came ahead of these units or earlier ones are let go."""
        last = units[-1]
        early = self.early_frames.pop(last.index, None)
        for index in [i for i in self.early_frames if i <= last.index]:
            del self.early_frames[index]
        if not last.frame_ahead:
            return frame
        if early is None:
            log.warning(
                "session %s: unit %d's frame went ahead but never came: no frame", self.session_id, last.index
            )
        return early

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _run(self) -> None:
        try:
            while (item := await self.queue.get()) is not None:
                message, payload, received_at = item
                try:
                    if isinstance(message, p.Unit):
                        more = self.queue.take_units() if self.mode and catches_up(self.mode) else []
                        await self._handle_units([item, *more])
                    else:
                        await self._handle(message, payload, received_at)
                except Exception as exc:  # a mode failure ends this session only
                    log.exception("session %s: mode failed", self.session_id)
                    await self.conn.send(
                        p.ErrorOut(
                            session_id=self.session_id, code="mode_error", message=str(exc) or repr(exc)
                        )
                    )
                    break
        finally:
            self.ticker.leave(self.session_id)
            await self._close_mode()
            await self.conn.send(p.Closed(session_id=self.session_id))

    async def _close_mode(self) -> None:
        if self.mode is not None:
            mode, self.mode = self.mode, None
            try:
                await self._call(mode.close)
            except Exception:
                log.exception("session %s: close failed", self.session_id)

    async def _handle(self, message: p.Message, payload: bytes, received_at: float) -> None:
        if isinstance(message, p.OpenSession):
            opening = time.monotonic()
            await self._close_mode()  # a second `open` switches the mode
            self.early_frames.clear()  # its units count from 0 again
            try:
                mode = create_mode(message.mode, self.settings)
            except KeyError as exc:
                await self.conn.send(
                    p.ErrorOut(session_id=self.session_id, code="unknown_mode", message=str(exc))
                )
                return
            phase = None
            if batch_runner(mode) is not None:  # a batching session keeps its phase across mode switches
                phase = self.ticker.join(self.session_id)
            else:
                self.ticker.leave(self.session_id)
            options = SessionOptions(
                session_id=self.session_id,
                system_prompt=message.options.get("system_prompt"),
                extra=message.options,
                voice=message.options.get("voice"),
                tick_phase=phase or 0,
            )
            setup, outputs = await self._call(mode.open, options)
            self.phase = phase
            self.grid = None if setup.one_grid else phase
            self.mode = mode
            self.output_rate = setup.output_rate
            self.unit_s = max(setup.unit_samples, setup.first_unit_samples or 0) / MODEL_INPUT_RATE
            self.heard_at = time.monotonic()
            offset = 0.0
            if setup.align_units and self.grid is not None:
                offset = self.ticker.grid_offset_s(self.grid, setup.unit_samples / MODEL_INPUT_RATE)
            await self.conn.send(
                p.Opened(
                    session_id=self.session_id,
                    mode=message.mode,
                    unit_samples=setup.unit_samples,
                    first_unit_samples=setup.first_unit_samples,
                    output_rate=setup.output_rate,
                    video_max_side=setup.video_max_side,
                    video_fit=setup.video_fit,
                    frames_ahead=setup.frames_ahead,
                    align_units=setup.align_units,
                    grid_offset_s=offset,
                    open_ms=(time.monotonic() - opening) * 1000,
                )
            )
            await self._send_outputs(outputs, self.output_rate)
        elif self.mode is None:
            return  # units or controls before a successful open are dropped
        elif isinstance(message, p.Control):
            outputs = await self._call(self.mode.on_control, message.message)
            await self._send_outputs(outputs, self.output_rate)

    async def _handle_units(self, items: list[Queued]) -> None:
        """A unit, or several waiting units of a mode that `catches_up` taken as one: run it (in its tick where the
        mode batches) and send its outputs, then a `unit_done` for each unit taken."""
        if self.mode is None:
            return  # units before a successful open are dropped
        started = time.monotonic()
        backlog = self.queue.units
        pieces = [p.split_unit_payload(message, payload) for message, payload, _ in items]
        last = items[-1][0]
        assert isinstance(last, p.Unit)
        unit = ModeUnit(last.index, pieces[0][0], last.completed_at, queued_units=backlog)
        if len(items) > 1:  # the parts as one unit, each part's length and completion time kept
            unit.pcm = np.concatenate([pcm for pcm, _ in pieces])
            unit.parts = [
                (pcm.size, msg.completed_at) for (pcm, _), (msg, _, _) in zip(pieces, items, strict=True)
            ]
        # the newest frame (a mode that catches up takes none)
        frame = self._unit_frame([m for m, _, _ in items if isinstance(m, p.Unit)], pieces[-1][1])
        loop = asyncio.get_running_loop()
        early: list[asyncio.Task[None]] = []
        rate = self.output_rate

        def send_early(outs: list[Output]) -> None:
            early.append(loop.create_task(self._send_outputs(outs, rate)))

        # outputs the mode sends from inside the tick (from the mode thread), ahead of those it returns
        unit.emit = lambda outs: loop.call_soon_threadsafe(send_early, outs)
        if batch_runner(self.mode) is not None:
            self.heard_at = time.monotonic()
            outputs = await self.ticker.submit(self.mode, unit, frame, self.grid, session_id=self.session_id)
        else:
            outputs = await self._call(self.mode.on_unit, unit, frame)
        unit.emit = None
        if early:  # sent before the tick's own outputs (the lock keeps them in order)
            await asyncio.gather(*early)
        compute_ms = (time.monotonic() - started) * 1000
        metrics = p.UnitMetrics()
        for out in outputs:  # a mode's numbers for the unit (several: merged in order)
            if isinstance(out, p.UnitMetrics):
                metrics = metrics.model_copy(update=out.model_dump(exclude_unset=True))
        await self._send_outputs(outputs, self.output_rate)
        for message, _, received_at in items:
            assert isinstance(message, p.Unit)
            # the mode's numbers (its stages, a reply's turn-to-speech) once, on the last unit taken
            mode_metrics = metrics if message is last else p.UnitMetrics()
            measured = {
                "handoff_ms": (received_at - message.completed_at) * 1000,
                "compute_ms": compute_ms,
                "queue_ms": (started - received_at) * 1000,
                "backlog_units": backlog,
                "merged_units": len(items) if len(items) > 1 else None,
            }
            await self.conn.send(
                p.UnitDone(
                    session_id=self.session_id,
                    index=message.index,
                    completed_at=message.completed_at,
                    metrics=mode_metrics.model_copy(update=measured).rounded(3),
                )
            )

    async def _send_outputs(self, outputs: list[Output], output_rate: int) -> None:
        """Send the mode's outputs as they are, with this session's id (speech with the mode's rate, its PCM as
        the payload); its `UnitMetrics` go into the unit's `unit_done` instead."""
        async with self.sending:
            await self._send_each(outputs, output_rate)

    async def _send_each(self, outputs: list[Output], output_rate: int) -> None:
        for out in outputs:
            if isinstance(out, p.UnitMetrics):
                continue
            if isinstance(out, p.AudioOut):
                assert out.pcm is not None, "a mode's speech carries its PCM"
                stamped = out.model_copy(update={"session_id": self.session_id, "sample_rate": output_rate})
                await self.conn.send(stamped, p.pcm_to_bytes(out.pcm))
            else:
                await self.conn.send(out.model_copy(update={"session_id": self.session_id}))


class Sessions:
    """The worker's sessions, whichever connection opened them. Session ids are unique across connections; a
    session belongs to the connection whose `open` created it: its outputs go back there, and a message about
    it from another connection is ignored."""

    def __init__(self, executor: concurrent.futures.Executor, settings: WorkerSettings) -> None:
        self.executor = executor
        self.settings = settings
        # batching modes' per-unit CPU work before their tick (chat's VAD: onnxruntime, which lets go of the GIL)
        # beside the mode thread
        self.preparer = concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.prepare_threads,
            thread_name_prefix="prepare",
            initializer=name_this_thread,
            initargs=("prepare",),
        )
        self.runners: dict[str, SessionRunner] = {}
        self.frames_ahead = FramesAhead(executor)
        self.ticker = UnitTicker(
            executor,
            self.batching_grids,
            settings.tick_gather_s,
            settings.tick_phases,
            preparer=self.preparer,
            prepare_threads=settings.prepare_threads,
            queued=self.queued_units,
        )

    def batching_grids(self) -> list[tuple[str, int | None, Any]]:
        """(session id, grid, batch runner) of each batching session whose next unit a tick should wait for: not one that has
        sent no unit for `QUIET_UNITS` of its units (paused, or its audio stalled) until it sends one again."""
        now = time.monotonic()
        return [
            (r.session_id, r.grid, batch_runner(r.mode))
            for r in self.runners.values()
            if r.mode is not None
            and r.phase is not None
            and batch_runner(r.mode) is not None
            and now - r.heard_at < QUIET_UNITS * r.unit_s
        ]

    def queued_units(self) -> set[str]:
        """The sessions with a unit in their queue (their runner is still on an earlier one)."""
        return {sid for sid, r in self.runners.items() if r.queue.units}

    async def handle(self, conn: Connection, message: p.Message, payload: bytes, received_at: float) -> None:
        """One message read from `conn`: a ping is answered, a session message goes to its session."""
        if isinstance(message, p.Ping):
            await conn.send(p.Pong(seq=message.seq))
            return
        if not isinstance(message, SESSION_MESSAGES):
            return
        sid = message.session_id
        runner = self.runners.get(sid)
        if runner is not None and not runner.task.done() and runner.conn is not conn:
            log.debug(
                "session %s belongs to %s: %s from %s ignored", sid, runner.conn.name, message.type, conn.name
            )
            return
        if runner is None or runner.task.done():
            if not isinstance(message, p.OpenSession):
                return
            runner = self.runners[sid] = SessionRunner(
                sid, conn, self.executor, self.ticker, self.settings, self.frames_ahead
            )
            runner.task.add_done_callback(lambda _t, sid=sid, r=runner: self._forget(sid, r))
        if isinstance(message, p.CloseSession):
            runner.queue.end()
        elif isinstance(message, p.FrameAhead):
            runner.frame_ahead(message, payload)  # not queued: it is there to be early
        elif (notice := runner.submit(message, payload, received_at)) is not None:
            await conn.send(notice)

    def _forget(self, sid: str, runner: SessionRunner) -> None:
        if self.runners.get(sid) is runner:  # not a newer session of the same id
            del self.runners[sid]

    def end_owned(self, conn: Connection) -> int:
        """The connection is gone: its sessions end now (their modes close, freeing their KV slots)."""
        owned = [r for r in self.runners.values() if r.conn is conn and not r.task.done()]
        for runner in owned:
            runner.queue.abort()
        return len(owned)

    def end_all(self) -> None:
        for runner in list(self.runners.values()):
            runner.queue.end()
        self.preparer.shutdown(wait=False, cancel_futures=True)
