"""Heard-only context for `chat`: after a barge-in or a Realtime `conversation.item.truncate`, the assistant turn
kept in the model's context is cut to the part the caller heard.

The server knows how much of a reply's speech was played out (`rtc_server.session`: speech pushed for the turn
minus what a flush dropped; a Realtime WebSocket client says it with `audio_end_ms`) and sends the control
`{"type": "truncate", "turn": t, "heard": f}` with the heard fraction f of the speech produced for turn t.

A chat reply's text tokens are the last positions of the session's KV slot until the next user turn is prefilled
(terminators are never fed; the user audio is prefilled only when its turn ends), and `session.history` holds
exactly those tokens. So the reply starts at `kv_length - len(history)`, and keeping the heard part means
truncating the slot to `start + round(f * n)` positions (n: the reply's tokens when it was first cut; of a reply
interrupted while it spoke, only those its voice had taken: the text decoded ahead of its speech is dropped).
The next turn closes the reply with `<|tts_eos|><|im_end|>` as after any reply, so the context reads as a reply that
stopped where the caller stopped hearing it. The fraction maps speech time to tokens proportionally (a chat reply
runs at most `LEAD_S` of speech ahead of the caller, so most of the cut is text that was never spoken at all).

Duplex modes are not cut: their KV interleaves the model's units with the caller's later audio, and a duplex
reply is generated unit by unit at the pace of playback, so at most the last unit (about 1 s) was unheard.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Protocol

from inference import protocol as p
from inference.modes.base import Output

if TYPE_CHECKING:
    from MiniCPMO45.engine.core import Engine
    from MiniCPMO45.engine.session import Session


class RepliesInChat(Protocol):
    """What `truncate_reply` reads and changes of a `chat` mode (`inference.modes.chat.ChatMode`, which
    imports this module)."""

    turn: int
    reply: Any  # the reply being produced (its `turn`), or None
    host: Any  # the engine host (`host.engine`), or None before the mode opened
    session: Session | None
    heard_cut: tuple[int, int] | None  # (turn, its tokens when first cut)
    # (turn, its tokens that had gone to its voice when it was interrupted)
    cut_voiced: tuple[int, int] | None

    def on_control(self, message: dict[str, Any]) -> list[Output]: ...


def keep_heard(engine: Engine, session: Session, keep: int) -> int:
    """Truncate the session's last reply (its `history` tokens at the end of the KV slot) to its first `keep`
    tokens; returns the positions dropped."""
    n = len(session.history)
    length = engine.kv_length(session)
    start = length - n
    if start < 0:
        raise ValueError(f"the reply's {n} tokens do not fit a slot of length {length}")
    keep = max(0, min(keep, n))
    if keep == n:
        return 0
    engine.cache.truncate(session.slot, start + keep)
    session.history = session.history[:keep]
    return n - keep


def truncate_reply(mode: RepliesInChat, message: dict[str, Any]) -> list[Output]:
    """The `truncate` control of `chat`: cut reply `turn` to its `heard` fraction (an active reply is
    interrupted first). A turn that is not the session's last reply any more is left alone."""
    turn, heard = message.get("turn"), message.get("heard")
    if (
        not isinstance(turn, int)
        or isinstance(turn, bool)
        or not isinstance(heard, int | float)
        or not 0.0 <= heard <= 1.0
        or math.isnan(heard)
    ):
        return [
            p.ErrorOut(
                code="bad_message", message="truncate needs an int `turn` and a `heard` fraction in 0..1"
            )
        ]
    outputs: list[Output] = []
    if mode.reply is not None and mode.reply.turn == turn:
        outputs += mode.on_control({"type": "interrupt"})
    if mode.reply is not None or turn != mode.turn - 1:
        return outputs  # a later turn has begun: its prefill sits after the reply in the KV
    if mode.host is None or mode.session is None:
        return outputs
    first, voiced = mode.heard_cut, mode.cut_voiced
    if first is not None and first[0] == turn:
        total = first[1]
    elif voiced is not None and voiced[0] == turn:  # the speech produced is that of the tokens its voice took
        total = min(voiced[1], len(mode.session.history))
    else:
        total = len(mode.session.history)
    mode.heard_cut = (turn, total)  # a second truncate of the same reply counts from its whole length
    keep = round(heard * total)
    if keep < len(mode.session.history):
        keep_heard(mode.host.engine, mode.session, keep)
    return outputs
