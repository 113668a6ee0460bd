"""The interface every worker mode implements (see inference/README.md): `WorkerMode`, what it gets (`ModeUnit`,
`SessionOptions`) and what it returns (`SessionSetup`, and `Output`: the protocol's own session messages)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from inference import protocol as p
from MiniCPMO45.audio.rates import DUPLEX_UNIT_SAMPLES, SPEECH_RATE


@dataclass
class ModeUnit:
    """One unit of caller audio as the worker received it."""

    index: int
    pcm: np.ndarray  # float32 mono 16 kHz, exactly the unit length the mode asked for (per part: `parts`)
    completed_at: float  # server monotonic time when the unit's last sample arrived
    queued_units: int = 0  # units of this session already waiting in the worker behind this one (backlog)
    # a mode that catches up (`catches_up`): the server units merged into this one, oldest first, as (samples,
    # completed_at) each; empty for a single unit (its pcm and completed_at say it all)
    parts: list[tuple[int, float]] = field(default_factory=list)
    # the speech probabilities of each part (one list for a single unit), when the mode's `prepare_units`
    # computed them off the mode thread
    vad_probs: list[list[float]] | None = None
    # sends outputs of this unit at once, from inside its tick, ahead of those the tick returns (set by the
    # worker's runner; None where the unit's outputs can only come back with the tick: then a mode returns them)
    emit: Callable[[list[Output]], None] | None = None

    def pieces(self) -> list[tuple[np.ndarray, float]]:
        """The unit's audio as the server cut it: (pcm, completed_at) of each part, oldest first."""
        if not self.parts:
            return [(self.pcm, self.completed_at)]
        out, start = [], 0
        for samples, completed_at in self.parts:
            out.append((self.pcm[start : start + samples], completed_at))
            start += samples
        return out


@dataclass
class SessionSetup:
    """What the mode tells the server when it opens: how to cut the caller's audio."""

    unit_samples: int = DUPLEX_UNIT_SAMPLES
    first_unit_samples: int | None = None
    output_rate: int = SPEECH_RATE
    video_max_side: int | None = None  # None: no frames; else each unit carries the newest frame, this big
    # ... or (resolution, multiple): the frame at the model's input size, which then takes it as it is (`Opened`)
    video_fit: tuple[int, int] | None = None
    # Units end on the server's grid of the session's tick phase (a short silent lead-in pads the first unit),
    # so the units of all sessions of that phase arrive together and share one tick.
    align_units: bool = False
    # ... on one grid for every tick phase: the mode's sessions of both phases tick together (chat, whose tick is
    # mostly sequential steps whose GPU cost grows little with their rows)
    one_grid: bool = False
    # each unit's frame comes ahead of the unit (`protocol.FrameAhead`), for the mode's `encode_frames_ahead`
    frames_ahead: bool = False


# What a mode returns: the protocol's session outputs (the worker fills in the session id and the audio's rate,
# and merges the mode's `UnitMetrics` into the unit's `unit_done`).
Output = p.AudioOut | p.TextOut | p.UserTurnOut | p.StateOut | p.FlushOut | p.ErrorOut | p.UnitMetrics


@dataclass
class SessionOptions:
    """Options of one session, from the signalling request and the server config."""

    session_id: str
    system_prompt: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # the whole options dict of the `open` message
    voice: str | None = None  # reference voice id (POST /api/voices), None: the default voice
    # a batching session's tick phase (0 or 1, see `inference.worker.UnitTicker`): phase 1 sessions take the
    # highest free KV slots, so each phase's tick runs a dense block of slots (`graphs.row_window`)
    tick_phase: int = 0


class WorkerMode(Protocol):
    """A conversation mode. One instance per session; all methods run in a worker thread, one at a time.

    `open` is called once, then `on_unit` for each unit in order and `on_control` for each client control
    message, interleaved in arrival order, then `close` exactly once (also after errors).
    """

    name: str

    def open(self, options: SessionOptions) -> tuple[SessionSetup, list[Output]]: ...

    def on_unit(self, unit: ModeUnit, frame: np.ndarray | None) -> list[Output]: ...

    def on_control(self, message: dict[str, Any]) -> list[Output]: ...

    def close(self) -> None: ...


class PreparingMode(WorkerMode, Protocol):
    """A batching mode with per-unit CPU work that needs none of the model (chat's VAD): the ticker calls the static
    `prepare_units` with the units of each tick on the worker's `prepare` threads (the tick's units split among
    them) before the tick runs, so that this work never holds the mode thread, which launches every session's GPU
    work. Never called at the same time as another call for the same session."""

    @staticmethod
    def prepare_units(batch: Sequence[tuple[Any, ModeUnit]]) -> None: ...


def catches_up(mode: WorkerMode) -> bool:
    """Whether the mode takes a session's waiting units as one (`ModeUnit.parts`): a mode whose tick's cost hardly
    depends on the audio it is given (chat: VAD and turn logic) clears a backlog in one tick that way, instead of
    staying one unit behind for as long as its ticks run near a unit's length."""
    return bool(getattr(type(mode), "catches_up", False))


def batch_preparer(mode: WorkerMode) -> Any:
    """The mode's `prepare_units` if it has one, else None."""
    return getattr(type(mode), "prepare_units", None)


class BatchedMode(WorkerMode, Protocol):
    """A mode whose units the worker runs together: each tick it calls `on_units` once with one waiting unit of
    every session of this mode class (in the mode thread), instead of `on_unit` per session. Controls and
    `open`/`close` still arrive per session, never during a tick."""

    @staticmethod
    def on_units(batch: Sequence[tuple[Any, ModeUnit, np.ndarray | None]]) -> list[list[Output]]: ...


def batch_runner(mode: WorkerMode) -> Any:
    """The mode's `on_units` if it batches, else None."""
    return getattr(type(mode), "on_units", None)


class FramesAheadMode(WorkerMode, Protocol):
    """A mode that takes a unit's camera frame before the unit (`SessionSetup.frames_ahead`): the worker calls
    the static `encode_frames_ahead` in the mode thread, between ticks, with the frames that came ahead of their
    units, each with its unit's index (at most one call per session at a time, never during a tick); the frame
    object is then the one `on_units` gets with its unit."""

    @staticmethod
    def encode_frames_ahead(batch: Sequence[tuple[Any, np.ndarray, int]]) -> None: ...


def frames_ahead_encoder(mode: WorkerMode) -> Any:
    """The mode's `encode_frames_ahead` if it has one, else None."""
    return getattr(type(mode), "encode_frames_ahead", None)
