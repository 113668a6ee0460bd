"""Token-by-token generation for a batch of sessions (turn-based chat and half-duplex replies).

Every step samples one token per active session, then feeds all of them in one batched forward. A token is
reported together with the LLM's last-layer hidden state at the position where it was fed (what the TTS
conditions on). A terminator ends a session's reply and is never fed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ..host_copy import Download, upload
from ..tokenizer import IncrementalDetokenizer
from .core import Engine
from .sampling import ChatSampling, TokenChoice, chat_token_ids
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
    of different sessions, started at different times, decode together in `decode_steps`."""

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
    return next(decode_steps(engine, rows, 1, observe_logits), [])


@torch.no_grad()
def decode_steps(
    engine: Engine,
    rows: Sequence[ReplyRow] | Callable[[], Sequence[ReplyRow]],
    steps: int,
    observe_logits: Callable[[Session, torch.Tensor], None] | None = None,
) -> Iterator[list[TokenEvent]]:
    """Up to `steps` steps of `decode_step`, yielding each step's events; `rows` may be a function, called
    before each step, that names the rows of that step (a caller drops rows between steps). Ends early once
    no row is left.

    On static steps a step's tokens are fed on the device (a terminator masked there), so the host reads the
    chosen ids while the device runs the step's forward: the step's events (detokenizing, the caller's work
    on them) are made while that forward runs, and the next step queues right behind it instead of after a
    round trip. An event's `hidden` is then a device tensor the forward is still filling (stream order). The
    rows' KV lengths are read once and counted here: nothing else may feed their sessions between its steps."""
    pick = rows if callable(rows) else lambda: rows
    terminators = (engine.special.tts_eos, engine.special.im_end, engine.eos_s)
    lengths: dict[int, int] = {}  # KV length by slot: read once, then counted here
    for _ in range(steps):
        active = [r for r in pick() if not r.done]
        if not active:
            return
        yield _step(engine, active, terminators, lengths, observe_logits)


def _step(
    engine: Engine,
    active: list[ReplyRow],
    terminators: tuple[int, ...],
    lengths: dict[int, int],
    observe_logits: Callable[[Session, torch.Tensor], None] | None,
) -> list[TokenEvent]:
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
    ids = chat_token_ids(logits, choices, terminators)
    sessions = [r.session for r in active]
    # the last token of a row's budget is fed only with `feed_last`
    feedable = [r.feed_last or r.steps < r.budget - 1 for r in active]
    chosen = Download(ids)  # queued before the forward, so waiting for it does not wait for the forward
    launched = None
    if engine.static is not None:
        unknown = [s for s in sessions if s.slot not in lengths]
        if unknown:
            lengths.update(zip((s.slot for s in unknown), engine.kv_lengths(unknown), strict=True))
        fed_mask = upload(feedable, ids.device, torch.bool) & ~torch.isin(
            ids, upload(terminators, ids.device)
        )
        launched = engine.feed_chosen(sessions, ids, fed_mask, [lengths[s.slot] for s in sessions])
    tokens = [int(t) for t in chosen.wait().tolist()]

    fed = [k for k, (t, ok) in enumerate(zip(tokens, feedable, strict=True)) if ok and t not in terminators]
    after: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # fed row -> (hidden [D], next logits [V])
    if launched is not None:
        hidden, next_logits = launched
        after = {k: (hidden[k], next_logits[k]) for k in fed}
    elif fed:  # no static step: feed on the host's ids
        pieces = engine.model.embed_ids([tokens[k] for k in fed])
        fed_hidden, fed_logits = engine.feed_for_logits([sessions[k] for k in fed], list(pieces[:, None]))
        after = {k: (h[-1], lg) for k, h, lg in zip(fed, fed_hidden, fed_logits, strict=True)}
    for k in fed:
        if sessions[k].slot in lengths:
            lengths[sessions[k].slot] += 1

    events: list[TokenEvent] = []
    for k, (r, tok) in enumerate(zip(active, tokens, strict=True)):
        assert r.detok is not None
        s = r.session
        last = r.steps == r.budget - 1
        r.steps += 1
        if tok in terminators:
            r.done, r.stop_reason = True, "terminator"
            events.append(TokenEvent(s, None, None, r.detok.flush(), True, "terminator"))
            continue
        s.history.append(tok)
        if k not in after:  # the budget's last token, not fed
            r.done, r.stop_reason = True, "length"
            if r.report_unfed_last:
                events.append(TokenEvent(s, tok, None, r.detok.push(tok) + r.detok.flush(), True, "length"))
            else:
                s.history.pop()
                events.append(TokenEvent(s, None, None, r.detok.flush(), True, "length"))
            continue
        h, r.logits = after[k]
        delta = r.detok.push(tok)
        if last:
            delta += r.detok.flush()
            r.done, r.stop_reason = True, "length"
        events.append(TokenEvent(s, tok, h, delta, last, "length" if last else None))
    return events


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
    yield from decode_steps(engine, rows, max((r.budget for r in rows), default=0), observe_logits)
