"""Token-by-token generation for a batch of sessions (turn-based chat and half-duplex replies).

Every step samples one token per active session, then feeds all of them in one batched forward. A token is
reported together with the LLM's last-layer hidden state at the position where it was fed (what the TTS
conditions on). A terminator ends a session's reply and is never fed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .core import Engine
from .sampling import ChatSampling, choose_chat_token
from .session import Session


@dataclass
class TokenEvent:
    session: Session
    token: int | None  # None when the reply ended on a terminator (which is not reported as text)
    hidden: torch.Tensor | None  # [D] at the position where `token` was fed; None if it was not fed
    text_delta: str
    done: bool
    stop_reason: str | None = None  # "terminator" | "length"


def reference_window(history: Sequence[int], window: int) -> list[int]:
    """Ids the repetition penalty looks at: the reference decodes in chunks (11 tokens, then 10) and penalizes
    the last `window` ids generated before the current chunk plus every id of the current chunk."""
    n = len(history)
    chunk_start = 0 if n < 11 else 11 + 10 * ((n - 11) // 10)
    return list(history[max(0, chunk_start - window) : chunk_start]) + list(history[chunk_start:])


def reference_chunk_budget(max_new_tokens: int) -> int:
    """Tokens the reference streaming generator samples for `max_new_tokens`: whole chunks of 10, the first
    one sampling 11. Its last sampled token is never fed nor returned."""
    chunks = max(1, -(-max_new_tokens // 10))
    return 11 + 10 * (chunks - 1)


@torch.no_grad()
def generate(
    engine: Engine,
    sessions: Sequence[Session],
    first_logits: torch.Tensor,
    params: ChatSampling,
    max_new_tokens: int,
    banned: Sequence[int] = (),
    feed_last: bool = False,
    report_unfed_last: bool = True,
    skip_special_tokens: bool = False,
    observe_logits: Callable[[Session, torch.Tensor], None] | None = None,
    display_text: bool = False,
) -> Iterator[list[TokenEvent]]:
    """Yield, per step, the events of the sessions still generating.

    The last token allowed by `max_new_tokens` is reported with `hidden=None` and not fed, unless `feed_last`
    (or dropped entirely when `report_unfed_last` is false, like the reference streaming generator).
    `observe_logits(session, logits)` sees the raw logits of every decoding step (diagnostics, tests).
    With `display_text` the text deltas are what a caller reads: no control token at all (`display_text` of
    the tokenizer), whatever `skip_special_tokens` says.
    """
    if first_logits.shape[0] != len(sessions):
        raise ValueError("one logits row per session")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    terminators = (engine.special.tts_eos, engine.special.im_end, engine.eos_s)
    tokenizer = engine.tokenizer
    detok = [
        tokenizer.display_detokenizer() if display_text else tokenizer.detokenizer(skip_special_tokens)
        for _ in sessions
    ]
    for s in sessions:
        s.history = []
        if params.seed is not None:
            s.seed(params.seed)
    logits = first_logits.float().clone()
    active = list(range(len(sessions)))
    for step in range(max_new_tokens):
        events: list[TokenEvent] = []
        fed: list[tuple[int, int]] = []
        for row, i in enumerate(active):
            s = sessions[i]
            window = reference_window(s.history, params.repetition_window)
            if observe_logits is not None:
                observe_logits(s, logits[row].clone())  # raw next-token logits, before any adjustment
            tok = choose_chat_token(logits[row], params, window, terminators, banned, s.generator)
            if tok in terminators:
                events.append(TokenEvent(s, None, None, detok[i].flush(), True, "terminator"))
                continue
            s.history.append(tok)
            fed.append((i, tok))
        last = step == max_new_tokens - 1
        if last and not feed_last:
            if report_unfed_last:
                for i, tok in fed:
                    events.append(
                        TokenEvent(
                            sessions[i], tok, None, detok[i].push(tok) + detok[i].flush(), True, "length"
                        )
                    )
            else:
                for i, _tok in fed:
                    sessions[i].history.pop()
                    events.append(TokenEvent(sessions[i], None, None, detok[i].flush(), True, "length"))
            yield events
            return
        if fed:
            hidden = engine.feed_ids([sessions[i] for i, _ in fed], [[tok] for _, tok in fed])
            logits = engine.last_logits(hidden)
            for (i, tok), h in zip(fed, hidden, strict=True):
                delta = detok[i].push(tok)
                if last:
                    delta += detok[i].flush()
                events.append(TokenEvent(sessions[i], tok, h[-1], delta, last, "length" if last else None))
        yield events
        active = [i for i, _ in fed]
        if not active or last:
            return
