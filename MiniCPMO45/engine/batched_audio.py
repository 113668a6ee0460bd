"""The streaming audio encoder of every duplex session of a tick in one batch, whatever their cache lengths.

`BatchedAudioEncoder` keeps each session's encoder stream in its KV slot of a `WhisperSlotCache` (allocated on
the first chunk, so CPU tests and chat-only workers never pay for it) and runs all of a tick's chunks as one
`slot_stream_forward` over the slot range they cover: each row continues from its own length, first chunks
(1030 ms, no left redundancy) and later ones (1 s with 2 redundancy mel frames each side) share the batch,
and a row whose stream would pass the position table starts over, by the rule of `forward_stream`.

Two shapes of the same function: eager (the tick's slot range, its longest mel, keys up to the longest
stream) and static (rows from slot 0 up to a bucket, mel frames rounded up, keys over the whole table), which
is captured as a CUDA graph per (rows, mel frames, new frames) on a GPU and run eagerly elsewhere.

Which conversation a slot holds is tracked by an owner object (the session's `DuplexState`): a slot that gets
a new owner (a new session in a reused slot, or a re-prepared one) starts an empty stream, or continues the
owner's per-session `WhisperStreamCache` when it has one (a session moving from the per-session reference,
`tests/reference_engine.prefill_units`).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..audio.mel_stream import MelUnit
from ..host_copy import copy_from_host, upload
from ..model import MiniCPMO
from ..modules.whisper import WhisperEncoder, WhisperStreamCache, cnn_frames
from ..modules.whisper_slots import WhisperSlotCache, slot_stream_forward, trimmed_frames
from .graphs import StaticStep, covering_window, graphs_available, new_pool, pick_bucket, row_window
from .session import Session
from .static_decode import ROW_BUCKETS

MEL_FRAME_STEP = 8  # static steps round the mel length up to this (first chunk 102, later 104 -> one step)
WINDOW_STEP = 64  # eager steps round the key window up to this


@dataclass
class _Row:
    slot: int
    mel: torch.Tensor  # [n_mels, F]
    first: int  # first kept CNN frame
    count: int  # kept CNN frames
    past: int  # cached frames this chunk continues (0 after a reset)
    reset: bool  # the stream starts over at this chunk (it would pass the position table)


class BatchedAudioEncoder:
    def __init__(
        self,
        model: MiniCPMO,
        num_slots: int,
        use_graphs: bool | None = None,
        static: bool | None = None,
        row_buckets: Sequence[int] = ROW_BUCKETS,
    ) -> None:
        self.model = model
        self.num_slots = num_slots
        self.device = model.device
        self.use_graphs = graphs_available(self.device) if use_graphs is None else use_graphs
        self.static = self.use_graphs if static is None else static
        if self.use_graphs and not self.static:
            raise ValueError("CUDA graphs need the static step shapes")
        self.row_buckets = sorted({min(b, num_slots) for b in row_buckets} | {num_slots})
        self.pool = new_pool(self.device) if self.use_graphs else None
        self.steps: dict[tuple[int, int, int, int], StaticStep] = {}
        self.owners: dict[int, weakref.ref[object]] = {}
        self.passes = 0  # encoder passes run so far (one per `encode`)
        self._cache: WhisperSlotCache | None = None

    # ---- state ----------------------------------------------------------------------------------------------
    @property
    def encoder(self) -> WhisperEncoder:
        if self.model.apm is None:
            raise RuntimeError("this model was built without the audio encoder")
        return self.model.apm

    @property
    def cache(self) -> WhisperSlotCache:
        """The slot cache (its buffers are allocated when a chunk first needs them)."""
        if self._cache is None:
            self._cache = WhisperSlotCache.for_encoder(self.encoder, self.num_slots)
        return self._cache

    def bind(self, slot: int, owner: object, carry: WhisperStreamCache | None = None) -> None:
        """Make `owner` (any weak-referenceable object naming one conversation) the stream of `slot`. A new
        owner starts an empty stream, or continues `carry` when that per-session cache holds frames."""
        ref = self.owners.get(slot)
        if ref is not None and ref() is owner:
            return
        self.owners[slot] = weakref.ref(owner)
        if carry is not None and carry.layers:
            self.cache.load(slot, carry)
        else:
            self.cache.reset(slot)

    def release(self, slot: int) -> None:
        """Forget the slot's stream (its next owner starts empty)."""
        self.owners.pop(slot, None)
        self.cache.reset(slot)

    # ---- encoding -------------------------------------------------------------------------------------------
    def encode_sessions(self, sessions: Sequence[Session], units: Sequence[MelUnit]) -> list[torch.Tensor]:
        """The batcher's call: each duplex session's streaming mel unit → its `[P, D]` audio embeddings."""
        for s in sessions:
            self.bind(s.slot, s.duplex if s.duplex is not None else s, s.audio_cache)
        return self.encode(
            [s.slot for s in sessions],
            [torch.as_tensor(u.features) for u in units],  # on the device already when the mel ran there
            [u.prefix_frames for u in units],
            [u.suffix_frames for u in units],
        )

    @torch.no_grad()
    def encode(
        self,
        slots: Sequence[int],
        mels: Sequence[torch.Tensor],
        prefix_frames: Sequence[int],
        suffix_frames: Sequence[int],
    ) -> list[torch.Tensor]:
        """`model.audio_embeds_stream` for the streams of many slots in one encoder pass: mels[i]
        `[n_mels, F_i]` (with its redundancy frames) → `[P_i, D]`; each slot's stream advances in place."""
        if not len(slots) == len(mels) == len(prefix_frames) == len(suffix_frames):
            raise ValueError("one mel, prefix and suffix per slot")
        if not slots:
            return []
        if len(set(slots)) != len(slots):
            raise ValueError("a slot appears twice in one audio step")
        enc, cache = self.encoder, self.cache
        table, step = enc.max_positions, self.model.config.audio_pool_step
        rows: list[_Row] = []
        for slot, mel, p, s in zip(slots, mels, prefix_frames, suffix_frames, strict=True):
            if not 0 <= slot < self.num_slots:
                raise ValueError(f"audio slot {slot} outside 0..{self.num_slots - 1}")
            if mel.dim() != 2 or mel.shape[0] != enc.conv1.in_channels:
                raise ValueError(f"mel of shape {tuple(mel.shape)}; expected [{enc.conv1.in_channels}, F]")
            frames = int(mel.shape[-1])
            first, count = trimmed_frames(frames, int(p), int(s))
            if count < step:
                raise ValueError(f"a chunk of {frames} mel frames keeps {count} encoder frames, under {step}")
            past = cache.lengths[slot]
            reset = past > 0 and past + cnn_frames(frames) >= table  # the rule of `forward_stream`
            if reset:
                past = 0
            if past + count > table:
                raise ValueError(f"a chunk of {count} encoder frames does not fit the {table}-position table")
            rows.append(_Row(slot, mel, first, count, past, reset))
        embeds = self._run(rows)
        for r in rows:  # the streams advance only once every row was accepted and the pass ran
            cache.lengths[r.slot] = r.past + r.count
            cache.resets[r.slot] += int(r.reset)
        self.passes += 1
        return [embeds[k, : r.count // step] for k, r in enumerate(rows)]

    def _run(self, rows: Sequence[_Row]) -> torch.Tensor:
        """Run the pass; returns the projected states `[len(rows), N', D]` in the order of `rows`."""
        new_frames = max(r.count for r in rows)
        frames = max(int(r.mel.shape[-1]) for r in rows)
        table = self.encoder.max_positions
        top = max(r.slot for r in rows)
        if self.static:
            frames = -(-frames // MEL_FRAME_STEP) * MEL_FRAME_STEP
            slots = [r.slot for r in rows]
            captured = ((lo, n) for lo, n, f, new in self.steps if f == frames and new == new_frames)
            lo, n_rows = covering_window(captured, slots) or row_window(
                self.row_buckets, self.num_slots, slots
            )
            window = table
        else:
            lo = min(r.slot for r in rows)
            n_rows = top - lo + 1
            longest = max(r.past + r.count for r in rows)
            window = min(table, -(-longest // WINDOW_STEP) * WINDOW_STEP)
        host = self._host_inputs(rows, lo, n_rows, frames)
        if self.static:
            st = self._step(n_rows, frames, new_frames, lo)
            for name, value in host.items():
                copy_from_host(st.inputs[name], value)
            out = st.run()["embeds"]
        else:
            inputs = {k: v.to(self.device) for k, v in host.items()}
            out = self._forward(inputs, lo, new_frames, window)["embeds"]
        idx = upload([r.slot - lo for r in rows], self.device)
        return out.index_select(0, idx)  # a copy: a graph's outputs are reused by its next replay

    def _host_inputs(
        self, rows: Sequence[_Row], lo: int, n_rows: int, frames: int
    ) -> dict[str, torch.Tensor]:
        n_mels = self.encoder.conv1.in_channels
        # mels computed on the device (the batcher's streaming mel on a GPU) are joined there, not copied back
        where = self.device if any(r.mel.device.type != "cpu" for r in rows) else torch.device("cpu")
        mel = torch.zeros(n_rows, n_mels, frames, dtype=self.model.dtype, device=where)
        ints = torch.zeros(4, n_rows, dtype=torch.long)  # mel_frames, first_frame, num_new, past
        for r in rows:
            k, f = r.slot - lo, int(r.mel.shape[-1])
            mel[k, :, :f] = r.mel.to(where)
            ints[:, k] = torch.tensor([f, r.first, r.count, r.past])
        return {
            "mel": mel,
            "mel_frames": ints[0],
            "first_frame": ints[1],
            "num_new": ints[2],
            "past": ints[3],
        }

    def _forward(
        self, x: dict[str, torch.Tensor], lo: int, new_frames: int, window: int
    ) -> dict[str, torch.Tensor]:
        states = slot_stream_forward(
            self.encoder,
            self.cache,
            lo,
            x["mel"],
            x["mel_frames"],
            x["first_frame"],
            x["num_new"],
            x["past"],
            new_frames,
            window,
        )
        return {"embeds": self.model._project_audio(states)}

    def _step(self, n_rows: int, frames: int, new_frames: int, lo: int = 0) -> StaticStep:
        key = (lo, n_rows, frames, new_frames)
        if key not in self.steps:
            n_mels = self.encoder.conv1.in_channels
            inputs = {
                "mel": torch.zeros(n_rows, n_mels, frames, dtype=self.model.dtype, device=self.device),
                **{
                    name: torch.zeros(n_rows, dtype=torch.long, device=self.device)
                    for name in ("mel_frames", "first_frame", "num_new", "past")
                },
            }
            table = self.encoder.max_positions

            def fn(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
                return self._forward(x, lo, new_frames, table)

            def idle(x: dict[str, torch.Tensor]) -> None:
                x["num_new"].zero_()
                x["past"].zero_()

            self.cache.allocate()  # before a graph captures them
            self.steps[key] = StaticStep(fn, inputs, idle, self.use_graphs, self.pool)
        return self.steps[key]

    def warm_up(
        self, max_sessions: int, mel_frames: int = 104, new_frames: int = 50, top: bool = False
    ) -> None:
        """Build (capture, on a GPU) the static step a tick of up to `max_sessions` slots uses: the lowest
        slots', or with `top` the highest slots'."""
        if not self.static:
            return
        rows = pick_bucket(self.row_buckets, max_sessions)
        frames = -(-mel_frames // MEL_FRAME_STEP) * MEL_FRAME_STEP
        self._step(rows, frames, new_frames, self.num_slots - rows if top else 0)
