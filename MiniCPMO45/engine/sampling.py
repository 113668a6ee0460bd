"""Logit adjustments and token choice shared by the chat, half-duplex and duplex decoders."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from pydantic import BaseModel, Field


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
    `history`, length penalty on the terminators, temperature, top-k/top-p, then a draw or the argmax."""
    ban(logits, banned)
    penalize_repeats(logits, history, params.repetition_penalty)
    penalize_length(logits, terminators, params.length_penalty)
    if not params.do_sample:
        return int(torch.argmax(logits).item())
    filtered = top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    return sample(filtered, generator)
