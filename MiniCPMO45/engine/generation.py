"""Token-by-token generation for a batch of sessions (turn-based chat and half-duplex replies).

Every step samples one token per active session, then feeds all of them in one batched forward. A token is
reported together with the LLM's last-layer hidden state at the position where it was fed (what the TTS
conditions on). A terminator ends a session's reply and is never fed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ..tokenizer import IncrementalDetokenizer
from .core import Engine
from .sampling import ChatSampling, TokenChoice, choose_chat_tokens
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


@dataclass(eq=False)
class ReplyRow:
    """One session's reply while it decodes: the next-token logits, the sampling settings and the budget. Rows
    of different sessions, started at different times, decode together in `decode_step`."""

    session: Session
    logits: torch.Tensor  # [V] float32 next-token logits
    params: ChatSampling
    budget: int  # tokens this reply may sample
    banned: Sequence[int] = ()
    detok: IncrementalDetokenizer | None = None
    feed_last: bool = False
    report_unfed_last: bool = True
    steps: int = 0
    done: bool = False
    stop_reason: str | None = None


def start_row(
    engine: Engine,
    session: Session,
    logits: torch.Tensor,
    params: ChatSampling,
    budget: int,
    banned: Sequence[int] = (),
    *,
    feed_last: bool = False,
    report_unfed_last: bool = True,
    skip_special_tokens: bool = False,
    display_text: bool = False,
) -> ReplyRow:
    """A reply of `session` from its first next-token `logits [V]` (the history starts empty; a seed in
    `params` re-seeds the session's generator)."""
    if budget < 1:
        raise ValueError("max_new_tokens must be at least 1")
    tokenizer = engine.tokenizer
    session.history = []
    if params.seed is not None:
        session.seed(params.seed)
    detok = tokenizer.display_detokenizer() if display_text else tokenizer.detokenizer(skip_special_tokens)
    return ReplyRow(
        session, logits.float(), params, budget, list(banned), detok, feed_last, report_unfed_last
    )


@torch.no_grad()
def decode_step(
    engine: Engine,
    rows: Sequence[ReplyRow],
    observe_logits: Callable[[Session, torch.Tensor], None] | None = None,
) -> list[TokenEvent]:
    """One token for every unfinished row, all sampled in one batched choice and fed in one batched forward.

    A terminator ends a row and is not fed; the last token of a row's budget is reported with `hidden=None` and
    not fed (unless `feed_last`), or dropped when `report_unfed_last` is false (the reference streaming
    generator). `observe_logits(session, logits)` sees each row's raw next-token logits."""
    active = [r for r in rows if not r.done]
    if not active:
        return []
    terminators = (engine.special.tts_eos, engine.special.im_end, engine.eos_s)
    logits = torch.stack([r.logits for r in active])
    if observe_logits is not None:
        for r, row_logits in zip(active, logits, strict=True):
            observe_logits(r.session, row_logits.clone())  # raw next-token logits, before any adjustment
    choices = [
        TokenChoice(
            r.params,
            reference_window(r.session.history, r.params.repetition_window),
            r.banned,
            r.session.generator,
        )
        for r in active
    ]
    tokens = choose_chat_tokens(logits, choices, terminators)
    events: list[TokenEvent] = []
    fed: list[tuple[ReplyRow, int, bool]] = []
    for r, tok in zip(active, tokens, strict=True):
        assert r.detok is not None
        s = r.session
        last = r.steps == r.budget - 1
        r.steps += 1
        if tok in terminators:
            r.done, r.stop_reason = True, "terminator"
            events.append(TokenEvent(s, None, None, r.detok.flush(), True, "terminator"))
            continue
        s.history.append(tok)
        if last and not r.feed_last:
            r.done, r.stop_reason = True, "length"
            if r.report_unfed_last:
                events.append(TokenEvent(s, tok, None, r.detok.push(tok) + r.detok.flush(), True, "length"))
            else:
                s.history.pop()
                events.append(TokenEvent(s, None, None, r.detok.flush(), True, "length"))
            continue
        fed.append((r, tok, last))
    if fed:
        pieces = engine.model.embed_ids([tok for _, tok, _ in fed])
        hidden, next_logits = engine.feed_for_logits([r.session for r, _, _ in fed], list(pieces[:, None]))
        for (r, tok, last), h, lg in zip(fed, hidden, next_logits, strict=True):
            assert r.detok is not None
            r.logits = lg
            delta = r.detok.push(tok)
            if last:
                delta += r.detok.flush()
                r.done, r.stop_reason = True, "length"
            events.append(TokenEvent(r.session, tok, h[-1], delta, last, "length" if last else None))
    return events


def decode_steps(
    engine: Engine, rows: Callable[[], Sequence[ReplyRow]], steps: int
) -> Iterator[list[TokenEvent]]:
    """Up to `steps` of `decode_step`, yielding each step's events; `rows()`, called before each step, names
    the rows of that step (a caller drops rows between steps, given the events). Ends early once none is left.
    A step's fed tokens are detokenized after its forward is queued, so the host's work on them (and the
    caller's, between steps) runs while the device runs the forward."""
    for _ in range(steps):
        active = [r for r in rows() if not r.done]
        if not active:
            return
        yield decode_step(engine, active)


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
    """Yield, per step, the events of the sessions still generating (`decode_step` over rows that start
    together). With `display_text` the text deltas are what a caller reads: no control token at all
    (`display_text` of the tokenizer), whatever `skip_special_tokens` says."""
    if first_logits.shape[0] != len(sessions):
        raise ValueError("one logits row per session")
    rows = [
        start_row(
            engine,
            s,
            first_logits[i],
            params,
            max_new_tokens,
            banned,
            feed_last=feed_last,
            report_unfed_last=report_unfed_last,
            skip_special_tokens=skip_special_tokens,
            display_text=display_text,
        )
        for i, s in enumerate(sessions)
    ]
    while not all(r.done for r in rows):
        yield decode_step(engine, rows, observe_logits)
