"""A sliding context window over a session's KV slot: keep the system prompt, drop the oldest spans after it.

The official demo ends a duplex call when the KV cache reaches 8192 positions. Here a session keeps going:
`drop_span(engine, session, start, end)` cuts positions `[start, end)` out of the session's slot and moves
everything after them down by `end - start` positions.

Keys are stored after RoPE. RoPE rotates each (i, i + d/2) pair of a key by the angle `position * inv_freq`,
and rotations compose, so a key stored at position p becomes exactly the key at position p - n by one more
rotation by `-n * inv_freq` — no forward pass, no re-prefill. Values carry no position and are only moved.
The rotation is done in float32 and rounded once to the cache dtype, so a moved key differs from a freshly
computed one only by that rounding.

Callers choose the spans: whole duplex units (`<unit>` … `</unit>`) or whole chat turns, never a part of
one, so the remaining context is a well-formed (shorter) conversation.
"""

from __future__ import annotations

import torch

from .core import Engine
from .session import Session


def _rotate(keys: torch.Tensor, inv_freq: torch.Tensor, shift: int) -> torch.Tensor:
    """Move keys `[H, T, hd]` (already rotated) `shift` positions back: one rotation by `-shift * inv_freq`."""
    angles = (-float(shift)) * inv_freq.float()  # [hd/2]
    angles = torch.cat((angles, angles))
    cos, sin = angles.cos(), angles.sin()
    x = keys.float()
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated_half * sin).to(keys.dtype)


@torch.no_grad()
def drop_span(engine: Engine, session: Session, start: int, end: int) -> int:
    """Remove KV positions `[start, end)` of `session` and shift the rest down. Returns the new length."""
    cache = engine.cache
    slot = session.slot
    length = cache.length(slot)
    if not 0 <= start <= end <= length:
        raise ValueError(f"cannot drop [{start}, {end}) from a slot of length {length}")
    n = end - start
    if n == 0:
        return length
    tail = length - end
    inv_freq = engine.model.llm.model.rotary.inv_freq
    for layer in range(len(cache.keys)):
        keys, values = cache.keys[layer], cache.values[layer]
        if tail:
            moved_k = _rotate(keys[slot, :, end:length], inv_freq, n)
            moved_v = values[slot, :, end:length].clone()
            keys[slot, :, start : start + tail] = moved_k
            values[slot, :, start : start + tail] = moved_v
    cache.truncate(slot, length - n)
    return length - n


class SlidingWindow:
    """Span bookkeeping of one session: where each droppable span (duplex unit, chat turn) starts.

    Call `mark(kv_length)` when a span begins, and `make_room(engine, session, needed)` before feeding up
    to `needed` more positions: when the slot would grow past `max_tokens`, the oldest complete spans are
    dropped until `length + needed <= keep_tokens` (a low watermark, so drops are rare and batched).
    """

    def __init__(self, protected: int, max_tokens: int, keep_tokens: int) -> None:
        if not 0 <= protected < keep_tokens <= max_tokens:
            raise ValueError("need protected < keep_tokens <= max_tokens")
        self.protected = protected
        self.max_tokens = max_tokens
        self.keep_tokens = keep_tokens
        self.starts: list[int] = []
        self.dropped_spans = 0
        self.dropped_tokens = 0

    def mark(self, position: int) -> None:
        if position < self.protected or (self.starts and position < self.starts[-1]):
            raise ValueError(f"span start {position} is not after the previous one")
        if not self.starts or position > self.starts[-1]:
            self.starts.append(position)

    def make_room(self, engine: Engine, session: Session, needed: int) -> int:
        """Drop the oldest spans if the next `needed` positions would pass `max_tokens`; returns positions
        dropped. Raises ValueError when even an empty window cannot take `needed` more."""
        length = engine.kv_length(session)
        if length + needed <= self.max_tokens:
            return 0
        if self.protected + needed > self.max_tokens:
            raise ValueError(f"{needed} new positions do not fit after a {self.protected}-position prompt")
        count = 0
        while count < len(self.starts):
            end = self.starts[count + 1] if count + 1 < len(self.starts) else length
            count += 1
            if length - (end - self.starts[0]) + needed <= self.keep_tokens:
                break
        if count == 0:
            return 0
        first = self.starts[0]
        end = self.starts[count] if count < len(self.starts) else length
        drop_span(engine, session, first, end)
        n = end - first
        self.starts = [s - n for s in self.starts[count:]]
        self.dropped_spans += count
        self.dropped_tokens += n
        return n
