"""Session-oriented inference on top of `MiniCPMO45.model`: turn-based chat, half-duplex streaming and the
full-duplex unit loop, all over one loaded model and one slot-based KV cache.

    engine = Engine.from_pretrained(model_dir, dtype=torch.bfloat16, device="cuda", max_sessions=8)
    s = engine.open_session(Mode.DUPLEX)

Turn-based (`engine.chat`): `prefill_messages` / `prefill`, optionally `continue_with(assistant_prefix(...))`,
then `reply(...)` yields per-step `TokenEvent`s (token, hidden state for the TTS, text delta).
Half-duplex (`engine.half_duplex`): `prefill_system`, `prefill_user_samples` / `prefill_user_audio`,
`generate_reply`.
Full duplex (`engine.duplex`): `prepare`, then per unit `step_units` (= `prefill_units` + `generate_units`); a
unit's tail (terminator, `</unit>`) is fed by the next prefill, or now by `finalize_units` (a flush);
`context_length` counts a pending tail; `make_room` slides a context window around it; `tts_condition(engine,
result)` builds the TTS input of a speaking unit.
Every step function takes a list of sessions and batches their LLM work.
"""

from .core import Engine
from .session import Mode, Session

__all__ = ["Engine", "Mode", "Session"]
