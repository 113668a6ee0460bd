"""The estimator KV of every open turn, kept in one device store between windows (the padded flow path).

The official streaming flow keeps, per turn, the DiT's keys and values of every ODE step and block in a stored
order (newest chunk first) and after each window cuts that to its first `prompt` and last `history` frames.
The DiT's attention has no positions and no mask, so only *which* keys a turn holds matters, not where they sit.
So here a turn owns one row pair (conditioned, unconditioned) of `EstimatorStore.kv`, its keys sit at any
positions of the row, and `KVSlot.order` lists those positions in the official stored order (host-side ints):
a window's keys go to free positions, and the cut frees the positions it drops. The padded flow batch writes
and reads the rows in place, so no turn's cache (~130 MB at the real size) is copied in or out per window.
The last position of every row is scratch: padding frames write there, it is zeroed before each attention (a
masked key still enters the arithmetic, so it must stay finite) and no mask marks it as a key of a turn (an idle
row attends to it alone).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..host_copy import upload

SLOT_GRANULE = 16  # beyond 16 slots the store grows by this many rows (each costs ~150 MB at the real size)
FRAME_GRANULE = 16


def _slot_bucket(n: int) -> int:
    """Rows the store holds for n slots: 1, 2, 4, 8, 16, then multiples of 16."""
    if n <= SLOT_GRANULE:
        bucket = 1
        while bucket < n:
            bucket *= 2
        return bucket
    return -(-n // SLOT_GRANULE) * SLOT_GRANULE


@dataclass(eq=False)
class KVSlot:
    """One turn's rows in the store: where its keys are, in the official stored order, and what is free."""

    store: EstimatorStore
    index: int  # estimator rows 2*index (conditioned) and 2*index + 1 (unconditioned)
    prompt_frames: int
    history_frames: int
    order: list[int]  # store positions of the turn's keys, newest chunk first (the official order)
    free: list[int] = field(default_factory=list)  # positions free for new keys (scratch excluded)
    closed: bool = False

    @property
    def length(self) -> int:
        """Keys held: the estimator cache length of the official path (also the turn's noise offset)."""
        return len(self.order)

    def claim(self, frames: int) -> list[int]:
        """Positions for a window's `frames` new keys (they join `order` at `commit`)."""
        if self.closed:
            raise ValueError("this turn's KV slot is closed")
        if frames > len(self.free):
            raise ValueError(f"KV slot has {len(self.free)} free positions, a window needs {frames}")
        taken, self.free = self.free[:frames], self.free[frames:]
        return taken

    def commit(self, positions: list[int]) -> None:
        """After the window ran: its keys go to the front of the order, then the official cut (first
        `prompt_frames` and last `history_frames` of the order) frees what it drops."""
        order = positions + self.order
        limit = self.prompt_frames + self.history_frames
        if len(order) > limit:
            self.free += order[self.prompt_frames : len(order) - self.history_frames]
            order = order[: self.prompt_frames] + order[len(order) - self.history_frames :]
        self.order = order

    def keys(self) -> torch.Tensor:
        """The turn's keys in the official stored order: (steps, depth, 2, heads, length, 2*head_dim)."""
        rows = self.store.kv[:, :, 2 * self.index : 2 * self.index + 2]
        index = upload(self.order, rows.device, torch.long)
        return rows.index_select(4, index)

    def copy(self) -> KVSlot:
        """A new slot holding the same keys at the same positions (for a turn snapshot)."""
        twin = self.store.open_empty(self.prompt_frames, self.history_frames)
        kv = self.store.kv  # `open_empty` may have grown the store (and this slot's free list with it)
        assert kv is not None
        kv[:, :, 2 * twin.index : 2 * twin.index + 2].copy_(kv[:, :, 2 * self.index : 2 * self.index + 2])
        twin.order, twin.free = list(self.order), list(self.free)
        return twin

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.store.release(self.index)


class EstimatorStore:
    """`kv` (steps, depth, 2 * slots, heads, frames, 2*head_dim) and the slots handed out. Grows (by copying)
    when a turn needs more rows or positions; `version` counts reallocations (graphs read the old tensor)."""

    def __init__(self, window_frames: int) -> None:
        self.window_frames = window_frames  # the most new keys one window may add
        self.kv: torch.Tensor | None = None
        self.owners: list[bool] = []  # per slot index: in use
        self.slots: dict[int, KVSlot] = {}
        self.version = 0
        # rows per tick phase (0: one pool): phase 0's turns take rows 0.., phase 1's rows phase_rows.., each
        # packed from its start, so a phase's flow batch covers its own rows only (`FlowGraphs`)
        self.phase_rows = 0

    @property
    def frames(self) -> int:
        return 0 if self.kv is None else self.kv.shape[4]

    @property
    def scratch(self) -> int:
        return self.frames - 1

    @property
    def rows(self) -> int:
        return 0 if self.kv is None else self.kv.shape[2] // 2

    @property
    def nbytes(self) -> int:
        return 0 if self.kv is None else self.kv.nbytes

    def frames_needed(self, prompt_frames: int, history_frames: int) -> int:
        return prompt_frames + history_frames + self.window_frames + 1

    def _adopt(self, base: torch.Tensor) -> None:
        """Take the store's geometry from a voice's keys (first use), or check them against it."""
        if base.ndim != 6 or base.shape[2] != 2:
            raise ValueError(
                f"base keys must be (steps, depth, 2, heads, n, 2*head_dim), got {tuple(base.shape)}"
            )
        if self.kv is None:
            steps, depth, _, heads, _, width = base.shape
            self.kv = base.new_zeros(steps, depth, 0, heads, 0, width)
        elif (
            base.shape[:2] + base.shape[3:4] + base.shape[5:]
            != self.kv.shape[:2] + self.kv.shape[3:4] + self.kv.shape[5:]
        ):
            raise ValueError("base keys do not match the store's steps, depth or heads")

    def reserve(
        self, base: torch.Tensor, prompt_frames: int, history_frames: int, slots: int, phases: int = 1
    ) -> None:
        """Allocate room for `slots` turns of this voice now (a worker does it at start-up, so the store never
        grows by copying mid-call and its memory is taken before anything else competes for it). With two tick
        `phases` the rows are split in two halves, one per phase (`open_empty`)."""
        self._adopt(base)
        if phases == 2 and slots > 1:
            self.phase_rows = -(-slots // 2)
            slots = 2 * self.phase_rows
        self.ensure(slots, max(base.shape[4], prompt_frames) + history_frames + self.window_frames + 1)

    def phase_range(self, phase: int | None) -> range:
        """The rows of a tick phase's turns (every row without phases)."""
        if phase is None or not self.phase_rows:
            return range(self.rows)
        start = self.phase_rows * phase
        return range(min(start, self.rows), min(start + self.phase_rows, self.rows))

    def open(
        self, base: torch.Tensor, prompt_frames: int, history_frames: int, phase: int | None = None
    ) -> KVSlot:
        """A slot for a new turn holding `base` (1 stream's keys, (steps, depth, 2, heads, n, 2*head_dim), in
        stored order): the voice prompt's cache. `phase`: the tick phase of the turn's session (`open_empty`)."""
        self._adopt(base)
        n = base.shape[4]
        slot = self.open_empty(
            prompt_frames, history_frames, at_least=n + history_frames + self.window_frames + 1, phase=phase
        )
        assert self.kv is not None
        self.kv[:, :, 2 * slot.index : 2 * slot.index + 2, :, :n].copy_(base)
        slot.order = list(range(n))
        slot.free = [p for p in slot.free if p >= n]
        return slot

    def open_empty(
        self, prompt_frames: int, history_frames: int, at_least: int = 0, phase: int | None = None
    ) -> KVSlot:
        """The lowest free row of the tick `phase`'s half of the store (`reserve`), else the lowest free row.
        A phase's turns stay packed at the start of its half: its flow batch is one small bucket of rows based
        there, the same shape tick after tick (captured at warm-up), and never covers the other phase's rows."""
        if self.kv is None:
            raise ValueError("open the first slot with base keys")
        used = self.owners
        index = next((i for i in self.phase_range(phase) if i >= len(used) or not used[i]), None)
        if index is None:
            index = next((i for i, taken in enumerate(used) if not taken), len(used))
        while len(used) <= index:
            used.append(False)
        self.ensure(index + 1, max(at_least, self.frames_needed(prompt_frames, history_frames)))
        used[index] = True
        slot = KVSlot(self, index, prompt_frames, history_frames, order=[], free=list(range(self.scratch)))
        self.slots[index] = slot
        return slot

    def ensure(self, slots: int, frames: int) -> None:
        """Grow to hold `slots` slots of `frames` positions (scratch included)."""
        assert self.kv is not None
        rows, have = self.rows, self.frames
        want_rows = max(rows, _slot_bucket(slots))
        want_frames = max(have, -(-frames // FRAME_GRANULE) * FRAME_GRANULE)
        if want_rows == rows and want_frames == have:
            return
        steps, depth, _, heads, _, width = self.kv.shape
        grown = self.kv.new_zeros(steps, depth, 2 * want_rows, heads, want_frames, width)
        grown[:, :, : 2 * rows, :, :have].copy_(self.kv)
        self.kv = grown
        self.version += 1
        if want_frames > have:
            for slot in self.slots.values():  # the old scratch and the new positions become free
                held = set(slot.order)
                slot.free += [p for p in range(max(have - 1, 0), want_frames - 1) if p not in held]

    def release(self, index: int) -> None:
        self.owners[index] = False
        self.slots.pop(index, None)
