"""Logit adjustments and token choice shared by the chat, half-duplex and duplex decoders."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, Field

from ..host_copy import upload


def ban(logits: torch.Tensor, ids: Iterable[int] | torch.Tensor) -> None:
    """Set the logits of `ids` to -inf in place (`logits` is `[V]`)."""
    idx = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(list(ids), dtype=torch.long)
    idx = idx.to(logits.device)
    if idx.numel():
        logits[idx] = float("-inf")


def penalize_repeats(logits: torch.Tensor, ids: Iterable[int], penalty: float) -> None:
    """The usual repetition penalty, in place: a positive logit is divided, a negative one multiplied."""
    if penalty == 1.0:
        return
    idx = torch.as_tensor(sorted(set(ids)), dtype=torch.long, device=logits.device)
    idx = idx[idx < logits.shape[-1]]
    if idx.numel() == 0:
        return
    vals = logits[idx]
    logits[idx] = torch.where(vals > 0, vals / penalty, vals * penalty)


def penalize_length(logits: torch.Tensor, ids: Iterable[int], penalty: float) -> None:
    """Length penalty on terminator logits, in place: >1 makes ending less likely whatever the sign."""
    if penalty == 1.0:
        return
    for i in ids:
        v = logits[i]
        logits[i] = v / penalty if v > 0 else v * penalty


def top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keep the top-k logits (ties with the k-th kept), then the smallest prefix whose mass reaches top_p
    (the token that crosses p is kept). Returns a new `[V]` tensor."""
    out = logits.clone()
    if top_k > 0:
        kth = torch.topk(out, min(top_k, out.shape[-1])).values[-1]
        out[out < kth] = float("-inf")
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(out, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum > top_p
        drop[1:] = drop[:-1].clone()
        drop[0] = False
        out[order[drop]] = float("-inf")
    return out


def top_k_top_p_sorted(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sampling.top_k_top_p` per row with per-row k (0 = off) and p (>= 1 = off) on `[B, V]`, in the sorted
    order: returns the first `width` sorted values (dropped ones -inf) and their ids, `[B, width]` each.
    `width` must be at least every row's k (all V where a row's k is off)."""
    b, vocab = logits.shape
    if width < vocab:  # the first `width` of the sorted order only: far less work than sorting the vocabulary
        ordered, order = torch.topk(logits, width, dim=-1, sorted=True)
    else:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=width), torch.full_like(top_k, width))
    kth = ordered.gather(1, (k - 1)[:, None])
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    cum = ordered.softmax(-1).cumsum(-1)
    drop = cum > top_p[:, None]
    drop = torch.cat([torch.zeros_like(drop[:, :1]), drop[:, :-1]], dim=1)
    drop &= ((top_p > 0) & (top_p < 1))[:, None]
    return ordered.masked_fill(drop, float("-inf")), order


def draw_rows(
    logits: torch.Tensor, generator: torch.Generator | None = None, uniform: torch.Tensor | None = None
) -> torch.Tensor:
    """One draw per row from softmax(logits `[B, N]`): the column where the row's cumulative distribution first
    passes a uniform number (the distribution of `torch.multinomial(softmax, 1)`, another random stream).
    `uniform [B, 1]`: the rows' numbers in [0, 1) if the caller drew them (else from `generator`)."""
    cum = logits.float().softmax(-1).cumsum(-1)
    total = cum[:, -1:]
    if uniform is None:
        uniform = torch.rand(cum.shape[0], 1, device=cum.device, generator=generator)
    u = uniform * total
    # strictly below the total, so the first column whose cumulative value passes u has a probability > 0
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cum, u, right=True)[:, 0]


def sample(logits: torch.Tensor, generator: torch.Generator | None = None) -> int:
    probs = logits.float().softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


class ChatSampling(BaseModel):
    """Turn-based / half-duplex decoding. Defaults are the reference streaming chat settings."""

    do_sample: bool = True
    temperature: float = Field(0.7, gt=0.0, le=2.0)
    top_k: int = Field(100, ge=0)
    top_p: float = Field(0.8, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.02, gt=0.0)
    repetition_window: int = Field(128, ge=0)
    length_penalty: float = Field(1.1, gt=0.0)
    seed: int | None = None


def choose_chat_token(
    logits: torch.Tensor,
    params: ChatSampling,
    history: list[int],
    terminators: Iterable[int],
    banned: Iterable[int] = (),
    generator: torch.Generator | None = None,
) -> int:
    """One chat decoding step on `[V]` float32 logits (modified in place): bans, repetition penalty over
    `history`, length penalty on the terminators, temperature, top-k/top-p, then a draw or the argmax
    (`choose_chat_tokens` for one row)."""
    row = TokenChoice(params, history, list(banned), generator)
    return choose_chat_tokens(logits[None], [row], list(terminators))[0]


@dataclass
class TokenChoice:
    """One row of a batched chat decoding step: its settings and the ids each adjustment looks at."""

    params: ChatSampling
    history: Sequence[int]  # the repetition penalty's window
    banned: Sequence[int] = ()
    generator: torch.Generator | None = None


def _id_matrix(rows: Sequence[Sequence[int]], fill: int) -> np.ndarray:
    """Each row's ids in a `[B, W]` array padded with `fill` (W: the longest row, at least 1)."""
    out = np.full((len(rows), max([1, *(len(r) for r in rows)])), fill, dtype=np.int64)
    for i, ids in enumerate(rows):
        out[i, : len(ids)] = ids
    return out


def choose_chat_tokens(
    logits: torch.Tensor, rows: Sequence[TokenChoice], terminators: Sequence[int]
) -> list[int]:
    """`choose_chat_token` for a batch: `logits [B, V]` float32 (modified in place), one `TokenChoice` per
    row. Every adjustment and the draw run on the whole batch where the logits are; only each sampled row's
    uniform number comes from its own generator (one small fill per row), so a seeded session repeats itself
    whatever its batch. The host waits for the device once (the chosen ids). Greedy rows give exactly the
    single-row result."""
    b, vocab = logits.shape
    if b != len(rows):
        raise ValueError("one TokenChoice per logits row")
    dev = logits.device

    # bans: -inf (ids outside the vocabulary go to an extra column that is dropped)
    if any(row.banned for row in rows):
        wide = torch.zeros(b, vocab + 1, dtype=torch.bool, device=dev)
        ids = np.clip(_id_matrix([row.banned for row in rows], vocab), 0, vocab)
        banned = wide.scatter_(1, upload(ids, dev), True)[:, :vocab]
        logits.masked_fill_(banned, float("-inf"))
    # repetition penalty on each distinct id of the row's window; length penalty on the terminators
    if any(row.params.repetition_penalty != 1.0 for row in rows):
        wide = torch.zeros(b, vocab + 1, dtype=torch.bool, device=dev)
        ids = np.clip(_id_matrix([row.history for row in rows], vocab), 0, vocab)
        seen = wide.scatter_(1, upload(ids, dev), True)[:, :vocab]
        pen = upload([row.params.repetition_penalty for row in rows], dev, torch.float32)[:, None]
        logits.copy_(torch.where(seen, torch.where(logits > 0, logits / pen, logits * pen), logits))
    if any(row.params.length_penalty != 1.0 for row in rows):
        term = upload(sorted({t for t in terminators if 0 <= t < vocab}), dev)
        pen = upload([row.params.length_penalty for row in rows], dev, torch.float32)[:, None]
        vals = logits.index_select(1, term)
        logits.index_copy_(1, term, torch.where(vals > 0, vals / pen, vals * pen))
    chosen = torch.argmax(logits, dim=-1)
    sampled = [r for r, row in enumerate(rows) if row.params.do_sample]
    if sampled:
        sel = upload(sampled, dev)
        settings = [rows[r].params for r in sampled]
        temps = upload([p.temperature for p in settings], dev, torch.float32)
        ks = [p.top_k for p in settings]
        width = vocab if min(ks) <= 0 else min(vocab, max(ks))
        kept, ids = top_k_top_p_sorted(
            logits.index_select(0, sel) / temps[:, None],
            upload(ks, dev),
            upload([p.top_p for p in settings], dev, torch.float32),
            width,
        )
        # each row's number from its session's generator (the stream `torch.rand` would give it alone)
        uniform = torch.empty(len(sampled), 1, dtype=torch.float32, device=dev)
        for k, r in enumerate(sampled):
            uniform[k].uniform_(generator=rows[r].generator)
        cols = draw_rows(kept, uniform=uniform)
        chosen.index_copy_(0, sel, ids.gather(1, cols[:, None])[:, 0])
    return [int(t) for t in chosen.tolist()]
