"""The worker's tick loop for batching modes (`UnitTicker`): the units of many sessions run as one call.

Used by `inference.sessions.SessionRunner` for modes with `on_units` (the duplex modes and chat); the ticks
run on the worker's single mode thread (`inference.worker.serve` makes it). Settings: `workers.tick_gather_ms`
and `workers.tick_phases` (`inference.settings.TickSettings`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from inference import gc_pauses
from inference import protocol as p
from inference.modes.base import ModeUnit, Output, WorkerMode, batch_preparer, batch_runner
from MiniCPMO45.audio.rates import MODEL_INPUT_RATE

log = logging.getLogger("inference.worker")
# a tick's `prepare_units` work goes to the prepare threads in parts of at least this many units (chat's VAD: a
# batched Silero call of 12 rows costs about 6 single ones, and every call takes the GIL once)
PREPARE_ROWS = 12
PHASE_TICK_WEIGHT = 0.3  # weight of the newest tick in the running mean of one phase's tick time
# units that come less than this share of a unit after their phase's tick, from sessions that tick went without,
# are its stragglers (later ones are the next round's)
ROUND_SHARE = 0.75
QUEUED_WAIT_S = 0.25  # how long a tick waits at most for a unit already in the worker (`UnitTicker._gather`)
# A session whose units come late as a rule (the median of its last `LATE_UNITS`, after its round's first unit)
# is waited for that long and `LATE_MARGIN_S` more, up to `LATE_WAIT_S` after the round's first unit
LATE_UNITS = 3
LATE_MARGIN_S = 0.02
LATE_WAIT_S = 0.15


def compile_count() -> int:
    """Graphs that `torch.compile` has compiled in this process so far: dynamo's counter, read only where dynamo
    is loaded (nothing compiled otherwise, and importing it would cost the tick a second)."""
    utils = sys.modules.get("torch._dynamo.utils")
    return 0 if utils is None else int(utils.counters["stats"]["unique_graphs"])


def alloc_retries() -> int:
    """Times CUDA's caching allocator found no free block, emptied its cache and retried `cudaMalloc` in this
    process (each retry synchronizes the device, so a tick that hits one stalls); 0 where CUDA is not in use."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return 0
    return int(torch.cuda.memory_stats().get("num_alloc_retries", 0))


# What must not happen inside a live tick, as running counts read before and after each tick: a torch.compile (a
# shape the warm-up missed: seconds on a GPU whose kernel cache is cold), a retry of CUDA's allocator (it emptied
# its cache and synchronized: the card is short of memory), a garbage collection over `gc_pauses.PAUSES`' threshold
# (it holds the GIL: the tick's host work stops). The warnings take the tick's units, the count and the tick's ms.
STALL_WARNINGS = {
    "compiles": "a tick of %d units compiled %d graph(s) with torch.compile (%.0f ms): a shape the warm-up missed",
    "alloc_retries": "a tick of %d units waited on %d CUDA allocator retries (%.0f ms): the card is short of memory",
    "gc_pauses": "a tick of %d units was held up by %d garbage collection(s) (%.0f ms)",
}


def tick_stalls() -> dict[str, int]:
    return {
        "compiles": compile_count(),
        "alloc_retries": alloc_retries(),
        "gc_pauses": gc_pauses.PAUSES.count,
    }


def prepare_parts(units: int, threads: int) -> int:
    """Into how many parts a tick's `prepare_units` work goes (one per prepare thread at most)."""
    return max(1, min(threads, units // PREPARE_ROWS))


@dataclass
class _Waiting:
    mode: WorkerMode
    unit: ModeUnit
    frame: Any
    grid: int | None  # its session's phase, or None for a mode whose sessions of every phase tick together
    done: asyncio.Future[list[Output]]
    submitted: float  # time.monotonic() when it came
    session_id: str


class UnitTicker:
    """The worker's tick loop for batching modes: the units waiting when a tick starts run together.

    Each session has at most one unit waiting (its runner awaits the result before it takes its next
    message), so a tick holds one unit per session. The batching sessions are spread evenly over `phases`
    grids, shifted by 1/phases of a unit: the server cuts a session's units on its phase's grid, so the units
    of one phase arrive within a few tens of ms of each other, and the phases take turns on the GPU. A tick
    holds about 1/phases of the sessions, and so finishes sooner than one tick of all of them would (a
    tick's cost grows less than its batch; with two phases each must fit in half a unit). A tick starts once
    every session of each phase that has a unit waiting has one waiting, or `gather_s` after the first one
    arrived, whichever comes first; units arriving later go into the next tick (a phase's stragglers join the
    other phase's tick, but a whole phase that waits ticks on its own while the phases' ticks fit their
    shares of the unit, and with the other phase when they do not: `_take`). A mode may cut the units of
    every phase on one grid (`SessionSetup.one_grid`, chat): its sessions of both phases then tick together,
    each still on its phase's slots. A failure fails the units of that tick (their sessions end with
    `mode_error`)."""

    def __init__(
        self,
        executor: concurrent.futures.Executor,
        members: Callable[[], list[tuple[str, int | None, Any]]],
        gather_s: float,
        phases: int,
        preparer: concurrent.futures.Executor | None = None,
        prepare_threads: int = 1,
        queued: Callable[[], set[str]] = set,
    ) -> None:
        """`executor`: the mode thread; `preparer`: the threads for the modes' `prepare_units` (default: the mode
        thread), `prepare_threads` of them."""
        if phases < 1:
            raise ValueError("phases must be at least 1")
        self.executor = executor
        # (session id, grid, `batch_runner`) of each open session whose mode batches (`submit`) and sends units
        self.members = members
        self.queued = queued  # the sessions with a unit in the worker that their runner has not taken yet
        # per (grid, batch runner), from its last tick of a round: the sessions whose units it went without (late,
        # or not coming), and until when (time.monotonic()) a unit of theirs counts as that round's straggler
        # and when the round's first unit came
        self.missing: dict[tuple[int | None, Any], tuple[set[str], float, float]] = {}
        # per session: how long after its round's first unit each of its last units came (s)
        self.delays: dict[str, deque[float]] = {}
        self.phase_of: dict[str, int] = {}  # every batching session's phase, taken before its mode opens
        self.gather_s = gather_s
        self.phases = phases
        self.preparer = preparer or executor
        self.prepare_threads = prepare_threads
        self.waiting: list[_Waiting] = []
        self.wake = asyncio.Event()
        self.ticks = 0
        # running mean of the ticks that held one phase grid (s), and their unit's length: whether a phase's tick
        # fits its share of a unit (`_take`)
        self.phase_tick_s: float | None = None
        self.unit_s = 0.0
        self.stalls = dict.fromkeys(STALL_WARNINGS, 0)  # what stalled live ticks, by kind (`tick_stalls`)
        self.task = asyncio.create_task(self._run(), name="unit-ticker")

    def join(self, session_id: str) -> int:
        """The session's phase: the one it has, else the phase with the fewest sessions."""
        if session_id not in self.phase_of:
            counts = [0] * self.phases
            for phase in self.phase_of.values():
                counts[phase] += 1
            self.phase_of[session_id] = counts.index(min(counts))
        return self.phase_of[session_id]

    def leave(self, session_id: str) -> None:
        self.phase_of.pop(session_id, None)
        self.delays.pop(session_id, None)

    def usual_delay(self, session_id: str) -> float | None:
        """How long after its round's first unit the session's unit usually comes (the median of its last
        `LATE_UNITS`); None until it has sent that many."""
        delays = self.delays.get(session_id)
        if delays is None or len(delays) < LATE_UNITS:
            return None
        return sorted(delays)[LATE_UNITS // 2]

    def grid_offset_s(self, phase: int, unit_s: float) -> float:
        return phase * unit_s / self.phases

    def _absent(self) -> set[str]:
        """The sessions whose units the tick still waits for: every session of each (grid, mode class) that has
        a unit waiting should have one waiting. When the units of a key that wait all come from sessions its last
        tick went without (that tick's stragglers), only those sessions are waited for: the others' units of that
        round already ran. Modes with units of other lengths (chat's 320 ms beside duplex's 1 s) are not waited
        for."""
        waiting: dict[tuple[int | None, Any], set[str]] = {}
        for w in self.waiting:
            waiting.setdefault((w.grid, batch_runner(w.mode)), set()).add(w.session_id)
        members = self._members_by_key()
        now = time.monotonic()
        absent: set[str] = set()
        for key, sids in waiting.items():
            late = self._late(key, now)
            expected = late if late and sids <= late else members.get(key, set())
            absent |= expected - sids
        return absent

    def _members_by_key(self) -> dict[tuple[int | None, Any], set[str]]:
        members: dict[tuple[int | None, Any], set[str]] = {}
        for sid, grid, run in self.members():
            members.setdefault((grid, run), set()).add(sid)
        return members

    def _late(self, key: tuple[int | None, Any], now: float) -> set[str]:
        """The sessions whose units of this round the key's last tick went without, while the round lasts."""
        late, until, _ = self.missing.get(key, (set(), 0.0, 0.0))
        return late if now < until else set()

    def _note_missing(self, items: list[_Waiting]) -> None:
        """Which sessions of each key this tick goes without (their units are late, or not coming): a tick of a
        round's stragglers takes them off that round's list, any other tick starts a round."""
        now = time.monotonic()
        members = self._members_by_key()
        ticked: dict[tuple[int | None, Any], list[_Waiting]] = {}
        for w in items:
            ticked.setdefault((w.grid, batch_runner(w.mode)), []).append(w)
        for key, units in ticked.items():
            sids = {w.session_id for w in units}
            late = self._late(key, now)
            if late and sids <= late:
                _, until, first = self.missing[key]
                self.missing[key] = (late - sids, until, first)
            else:
                unit_s = units[0].unit.pcm.size / MODEL_INPUT_RATE
                first = min(w.submitted for w in units)
                self.missing[key] = (members.get(key, set()) - sids, now + ROUND_SHARE * unit_s, first)
            for w in units:
                delays = self.delays.setdefault(w.session_id, deque(maxlen=LATE_UNITS))
                delays.append(w.submitted - first)

    def _phases_fit(self) -> bool:
        """A phase's tick (its running mean) fits its share of a unit, so the phases can tick apart and keep up."""
        return self.phase_tick_s is None or self.phase_tick_s * self.phases <= self.unit_s

    def _take(self) -> list[_Waiting]:
        """The units of this tick, taken out of `waiting`: every unit, except that the units of only one phase grid
        tick together while a phase's tick fits its share of the unit. When units of both phases wait (a tick ran
        past its half unit, so the next phase's units came meanwhile), the phase with the oldest unit goes first
        and the other waits for the next tick; a phase's stragglers (half its sessions or fewer: units that missed
        their own tick's gather) still join. Merged, a tick of both phases would keep the next phase's units
        waiting for all of it, and every tick after it could find both phases waiting again. But when the phases'
        ticks take longer than their shares (`_phases_fit`: an overloaded worker), they merge: one tick of both
        costs less than two, and apart the worker would fall further behind with every unit."""
        grids = [w.grid for w in self.waiting if w.grid is not None]
        if len(set(grids)) < 2 or not self._phases_fit():
            batch, self.waiting = self.waiting, []
            return batch
        sessions = Counter(grid for _, grid, _ in self.members() if grid is not None)
        whole = {g for g, n in Counter(grids).items() if 2 * n > sessions[g]}
        if len(whole) < 2:
            batch, self.waiting = self.waiting, []
            return batch
        first = min((w for w in self.waiting if w.grid in whole), key=lambda w: w.submitted).grid
        joins = (set(grids) - whole) | {first}
        batch = [w for w in self.waiting if w.grid is None or w.grid in joins]
        self.waiting = [w for w in self.waiting if not (w.grid is None or w.grid in joins)]
        return batch

    async def _gather(self) -> None:
        """Wait for the absent units, `gather_s` at most; but up to `QUEUED_WAIT_S` for a session whose unit is
        already in the worker, behind its previous one (that session's runner is still sending the previous
        unit's outputs: started without it, the tick would leave it to the other phase's tick, for good), and
        as long as a phased session's units usually come late, up to `LATE_WAIT_S` (a call whose audio reaches
        the server that much after its phase's others, for the whole call: ticked apart, it would take a tick of
        its own every unit, on the GPU time of the other phase's). Not for modes whose sessions of every phase
        tick together (chat: its ticks come every 320 ms)."""
        start = time.monotonic()
        while absent := self._absent():
            limit = max(self.gather_s, QUEUED_WAIT_S) if absent & self.queued() else self.gather_s
            phased = {sid for sid, grid, _ in self.members() if grid is not None and sid in absent}
            usual = [d for d in map(self.usual_delay, phased) if d is not None and d <= LATE_WAIT_S]
            if usual:
                limit = max(limit, min(max(usual) + LATE_MARGIN_S, LATE_WAIT_S))
            left = start + limit - time.monotonic()
            if left <= 0:
                return
            self.wake.clear()
            try:
                async with asyncio.timeout(left):  # not wait_for: it can lose a cancellation (Python 3.11)
                    await self.wake.wait()
            except TimeoutError:
                pass

    async def submit(
        self, mode: WorkerMode, unit: ModeUnit, frame: Any, grid: int | None, *, session_id: str
    ) -> list[Output]:
        """Run the unit in a tick. `grid`: the session's phase, whose units arrive together; None for a mode
        whose units of every phase are cut on one grid (`SessionSetup.one_grid`)."""
        done: asyncio.Future[list[Output]] = asyncio.get_running_loop().create_future()
        self.waiting.append(_Waiting(mode, unit, frame, grid, done, time.monotonic(), session_id))
        self.wake.set()
        return await done

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            await self._gather()
            self.wake.clear()
            batch = self._take()
            if self.waiting:  # another phase's units: their own tick, right after this one
                self.wake.set()
            groups: dict[Any, list[_Waiting]] = {}
            for item in batch:
                if not item.done.done():  # its session went away while it waited
                    groups.setdefault(batch_runner(item.mode), []).append(item)
            # the deadline-bound units first (duplex: a unit a second), then the modes that only need to keep
            # ahead of what their callers hear (chat replies: `tick_priority` 1)
            ordered = sorted(groups.items(), key=lambda g: getattr(type(g[1][0].mode), "tick_priority", 0))
            for run, items in ordered:
                self.ticks += 1
                gathered = time.monotonic()
                self._note_missing(items)
                try:
                    await self._prepare(items)
                    prepare_ms = (time.monotonic() - gathered) * 1000
                    stalls = tick_stalls()
                    started = time.monotonic()
                    outs = await loop.run_in_executor(
                        self.executor, run, [(w.mode, w.unit, w.frame) for w in items]
                    )
                    ran_ms = (time.monotonic() - started) * 1000
                    self._check_stalls(stalls, ran_ms, len(items))
                    self._time_phase_tick(items, ran_ms / 1000)
                except Exception as exc:
                    log.exception("tick of %d units failed", len(items))
                    for w in items:
                        if not w.done.done():
                            w.done.set_exception(exc)
                    continue
                prepared = {"prepare_ms": prepare_ms} if batch_preparer(items[0].mode) is not None else {}
                for w, out in zip(items, outs, strict=True):
                    if not w.done.done():
                        # where the unit's time in the tick loop went (merged into the mode's own metrics)
                        wait_ms = (gathered - w.submitted) * 1000
                        tick = p.UnitMetrics(tick_wait_ms=wait_ms, tick_ms=ran_ms, **prepared)
                        w.done.set_result([*out, tick])

    def _time_phase_tick(self, items: list[_Waiting], seconds: float) -> None:
        """Keep the running mean of a phase's tick time (and the unit's length): a tick of one phase grid counts
        as it ran, a merged tick of every phase as its share per phase (a lower bound: merged ticks are cheaper),
        so that an overloaded worker that merged tries its phases apart again once its ticks shrink."""
        grids = {w.grid for w in items}
        if self.phases < 2 or None in grids or len(grids) not in (1, self.phases):
            return
        self.unit_s = items[0].unit.pcm.size / MODEL_INPUT_RATE
        sample = seconds / len(grids)
        old = self.phase_tick_s
        self.phase_tick_s = sample if old is None else old + PHASE_TICK_WEIGHT * (sample - old)

    async def _prepare(self, items: list[_Waiting]) -> None:
        """The mode's `prepare_units` over the tick's units, split evenly over the prepare threads (each part
        at least `PREPARE_ROWS` units: the work is batched inside a part too)."""
        prepare = batch_preparer(items[0].mode)
        if prepare is None:
            return
        loop = asyncio.get_running_loop()
        parts = prepare_parts(len(items), self.prepare_threads)
        pairs = [(w.mode, w.unit) for w in items]
        await asyncio.gather(
            *(loop.run_in_executor(self.preparer, prepare, pairs[k::parts]) for k in range(parts))
        )

    def _check_stalls(self, before: dict[str, int], ran_ms: float, units: int) -> None:
        """Warn about what stalled a tick (`tick_stalls`): each such tick and how much of it."""
        for kind, count in tick_stalls().items():
            new = count - before[kind]
            if new > 0:
                self.stalls[kind] += new
                log.warning(STALL_WARNINGS[kind], units, new, ran_ms)
