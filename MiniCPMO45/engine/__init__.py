"""Session-oriented inference on top of `MiniCPMO45.model`: turn-based chat, half-duplex streaming and the
full-duplex unit loop, all over one loaded model and one slot-based KV cache.

    engine = Engine.from_pretrained(model_dir, dtype=torch.bfloat16, device="cuda", max_sessions=8)
    s = engine.open_session(Mode.DUPLEX)

Turn-based (`engine.chat`): `prefill_messages` / `prefill`, optionally `continue_with(assistant_prefix(...))`,
then `reply(...)` yields per-step `TokenEvent`s (token, hidden state for the TTS, text delta).
Half-duplex chat (`engine.half_duplex`): `prefill_system`, then per user turn `user_turn_embeddings` (fed with
the assistant prefix, batched across sessions) and `start_reply_state`.
Full duplex: one `DuplexSession` (`engine.duplex_session`) per call owns its state (KV slot, `DuplexState`,
speech turn, context window); `DuplexSession.tick(calls, inputs)` runs one unit of every call as one tick of
`engine.batcher.DuplexBatcher` (prefill led by the previous unit's tail, decode, TTS, vocoder; static steps,
eager on the CPU and CUDA graphs on a GPU). `engine.duplex` holds the per-unit state and rules the tick applies.
Chat replies decode batched through `engine.generation` (`start_row`, `decode_steps`) on the same static feed.
Every step function takes a list of sessions and batches their LLM work. (The per-session duplex loop the
tests compare the tick with is `tests/reference_engine.py`.)
"""

from .core import Engine
from .session import Mode, Session

__all__ = ["Engine", "Mode", "Session"]
