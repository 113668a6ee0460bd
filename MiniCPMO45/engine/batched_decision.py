"""The duplex listen/speak/text decision for a batch of sessions in a few device ops and one host sync.

The rule, row by row (the one-row reference is `decide_token` in `tests/reference_engine.py`; the golden
fixtures check the tick's greedy decisions, `tests/test_batched_decision.py` the filter): a first untempered
draw (or argmax) that may end the unit with `<|chunk_eos|>`; bans; repetition penalty over the session's
recent decoded ids; length penalty on `<|turn_eos|>`; listen scale; listen top-k; then argmax, or temperature
+ top-k/top-p + draw. Sampled rows draw from one generator for the batch (not the sessions' own generators),
so sampled tokens are the same distribution but not the same stream as the per-session path.

A draw inverts each row's cumulative distribution at one uniform number (`draw_rows`) instead of calling
`torch.multinomial`, and the filtered draw stays in the sorted order, on the first `max(top_k)` columns: on
the real vocabulary (151k ids) `multinomial` takes ~170 us for one row and the sorted row's scatter back
~90 us (H100), which made the decision cost ~1.5 ms per decode step at batch 1. The one difference from the
per-session filter: where the k-th largest value has ties past column `max(top_k)`, those are not kept.

The settings (`DecisionParams`) and the recent ids (`RecentIds`) are uploaded once per unit; a step then only
reads them on the device, so its one host sync is the final read of the chosen tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..host_copy import upload
from .core import Engine
from .duplex import DuplexConfig, DuplexState
from .sampling import draw_rows, top_k_top_p_sorted


@dataclass
class DecisionParams:
    """Per-row decision settings as device tensors, built once per unit for a fixed list of sessions."""

    greedy: torch.Tensor  # [B] bool
    any_sampling: bool
    temperature: torch.Tensor  # [B, 1]
    top_k: torch.Tensor  # [B] long, 0 = off
    top_p: torch.Tensor  # [B] float
    rep_penalty: torch.Tensor  # [B, 1]
    rep_reference: torch.Tensor  # [B, 1] bool: the reference's divide-everything style
    length_penalty: torch.Tensor  # [B]
    listen_scale: torch.Tensor  # [B]
    listen_top_k: torch.Tensor  # [B] long, -1 = off
    windows: list[int]
    top_ks: list[int]  # the rows' top-k on the host (the width of the sorted columns a filtered draw needs)

    @classmethod
    def from_configs(cls, configs: Sequence[DuplexConfig], device: torch.device) -> DecisionParams:
        def t(values: list, dtype: torch.dtype) -> torch.Tensor:
            return upload(values, device, dtype)

        greedy = [c.decode_mode == "greedy" for c in configs]
        return cls(
            greedy=t(greedy, torch.bool),
            any_sampling=not all(greedy),
            temperature=t([c.temperature for c in configs], torch.float32)[:, None],
            top_k=t([c.top_k for c in configs], torch.long),
            top_p=t([c.top_p for c in configs], torch.float32),
            rep_penalty=t([c.text_repetition_penalty for c in configs], torch.float32)[:, None],
            rep_reference=t([c.repetition_penalty_style == "reference" for c in configs], torch.bool)[
                :, None
            ],
            length_penalty=t([c.length_penalty for c in configs], torch.float32),
            listen_scale=t([c.listen_prob_scale for c in configs], torch.float32),
            listen_top_k=t([-1 if c.listen_top_k is None else c.listen_top_k for c in configs], torch.long),
            windows=[c.text_repetition_window for c in configs],
            top_ks=[c.top_k for c in configs],
        )

    def select(self, rows: torch.Tensor, keep: list[int]) -> DecisionParams:
        return DecisionParams(
            self.greedy[rows],
            self.any_sampling,
            self.temperature[rows],
            self.top_k[rows],
            self.top_p[rows],
            self.rep_penalty[rows],
            self.rep_reference[rows],
            self.length_penalty[rows],
            self.listen_scale[rows],
            self.listen_top_k[rows],
            [self.windows[i] for i in keep],
            [self.top_ks[i] for i in keep],
        )

    def sorted_width(self, vocab: int) -> int:
        """Sorted columns a filtered draw of these rows needs: the largest top-k (all of them if one is off)."""
        if not self.top_ks or min(self.top_ks) <= 0:
            return vocab
        return min(max(self.top_ks), vocab)


class RecentIds:
    """Each row's last `windows[i]` decided ids as a device tensor `[B, W]` (W = the largest window, newest
    last, unused places hold the vocabulary size): built once per unit from the sessions' `decoded` lists,
    then advanced on the device with each step's choices, so a step uploads nothing for the penalty."""

    def __init__(
        self, states: Sequence[DuplexState], windows: Sequence[int], vocab: int, device: torch.device
    ) -> None:
        self.vocab = vocab
        self.width = max(windows, default=0)
        self.ids: torch.Tensor | None = None
        if self.width:
            recent = [st.decoded[-w:] if w else [] for st, w in zip(states, windows, strict=True)]
            self.ids = upload([[vocab] * (self.width - len(r)) + r for r in recent], device)
            # columns left of a row's own window never hold an id (a shorter window than the widest)
            self.first = upload([self.width - w for w in windows], device)[:, None]
            self.columns = torch.arange(self.width, device=device)[None, :]

    def seen(self, rows: torch.Tensor) -> torch.Tensor | None:
        """`[b, V]` bool: which ids are in the windows of `rows` (None when no row has a window)."""
        if self.ids is None:
            return None
        ids = self.ids.index_select(0, rows)
        mask = torch.zeros(ids.shape[0], self.vocab + 1, dtype=torch.bool, device=ids.device)
        return mask.scatter_(1, ids, True)[:, : self.vocab]

    def push(self, rows: torch.Tensor, tokens: torch.Tensor, record: torch.Tensor) -> None:
        """Append `tokens[k]` to row `rows[k]`'s window where `record[k]`."""
        if self.ids is None:
            return
        ids = self.ids.index_select(0, rows)
        moved = torch.cat([ids[:, 1:], tokens[:, None]], dim=1)
        moved = moved.masked_fill(self.columns < self.first.index_select(0, rows), self.vocab)
        self.ids.index_copy_(0, rows, torch.where(record[:, None], moved, ids))


def decide_batch(
    engine: Engine,
    states: Sequence[DuplexState],
    raw_logits: torch.Tensor,
    params: DecisionParams,
    recent: RecentIds,
    rows: torch.Tensor,
    generator: torch.Generator | None = None,
    override: Sequence[int | None] | None = None,
) -> list[int]:
    """One decision per row of `raw_logits [B, V]` (float32), whose sessions are the rows `rows` (device) of
    `recent`; appends to `states[i].decoded` (and to `recent`) like the reference's `decide_token`. `override[i]`, when not
    None, replaces row i's choice after it was computed (benchmarks: a fixed workload that still pays for the
    decision)."""
    sp = engine.special
    device = raw_logits.device
    first = raw_logits.argmax(-1)
    if params.any_sampling:
        first = torch.where(params.greedy, first, draw_rows(raw_logits, generator))
    logits = raw_logits.float().clone()
    # index_fill_, not `logits[:, bans] = -inf`: that setitem copies the value to the GPU from pageable memory,
    # which made the host wait for the queued decode step (~1 ms per decision at batch 1, H100)
    logits.index_fill_(1, engine.duplex_bans, float("-inf"))
    # repetition penalty over each row's recent decoded ids
    seen = recent.seen(rows)
    if seen is not None:
        pen = params.rep_penalty
        penalized = torch.where(params.rep_reference | (logits > 0), logits / pen, logits * pen)
        logits = torch.where(seen, penalized, logits)
    te = logits[:, sp.turn_eos]
    logits[:, sp.turn_eos] = torch.where(te > 0, te / params.length_penalty, te * params.length_penalty)
    logits[:, sp.listen] = logits[:, sp.listen] * params.listen_scale
    above = (logits > logits[:, sp.listen : sp.listen + 1]).sum(-1)
    early_listen = above < params.listen_top_k
    tok = logits.argmax(-1)
    if params.any_sampling:
        width = params.sorted_width(logits.shape[-1])
        kept, ids = top_k_top_p_sorted(logits / params.temperature, params.top_k, params.top_p, width)
        drawn = ids.gather(1, draw_rows(kept, generator)[:, None])[:, 0]
        tok = torch.where(params.greedy, tok, drawn)
    tok = torch.where(early_listen, torch.full_like(tok, sp.listen), tok)
    is_eos = first == sp.chunk_eos
    tok = torch.where(is_eos, torch.full_like(tok, sp.chunk_eos), tok)
    record = ~(is_eos | early_listen)
    if override is not None and any(o is not None for o in override):
        given = upload([o is not None for o in override], device, torch.bool)
        tok = torch.where(given, upload([o or 0 for o in override], device), tok)
        record |= given
    recent.push(rows, tok, record)
    out = torch.stack([tok, record.long()]).tolist()  # the one host sync of the decision
    for st, t, r in zip(states, out[0], out[1], strict=True):
        if r:
            st.decoded.append(t)
    return out[0]
