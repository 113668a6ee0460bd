"""Half-duplex voice: the conversation grows segment by segment in one KV slot.

The system message is prefilled once; each user audio segment is appended as it arrives (encoded either by the
streaming Whisper with its own cache, or in one piece with full attention); a reply is then generated after
the reference assistant prefix. The prompt text follows the reference exactly, including the quirk that a
new user turn after a reply starts with `<|tts_eos|><|im_end|>\\n` (the reply is never marked complete).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..audio.mel import DYNAMIC_FLOOR, batch_features
from ..modules.whisper import pooled_tokens
from ..processor.chat_template import IMAGE_MARK
from .chat import assistant_prefix, prompt_embeddings, prompt_from_processor, spoken_bans
from .core import Engine
from .session import HalfDuplexState, Mode, Session

__all__ = [
    "DYNAMIC_FLOOR",
    "AudioSegment",
    "Content",
    "assistant_prefix",
    "batch_features",
    "prefill_system",
    "reply_bans",
    "start_reply_state",
    "user_turn_embeddings",
]


@dataclass
class AudioSegment:
    """Log-mel features `[1, n_mels, F]` of one audio item; `mel_length` real frames (default F)."""

    mel: torch.Tensor
    mel_length: int | None = None

    @property
    def frames(self) -> int:
        return self.mel_length if self.mel_length is not None else self.mel.shape[-1]


Content = str | AudioSegment | np.ndarray  # text, log-mel features, or 16 kHz mono samples


def _segment_from_samples(samples: np.ndarray) -> AudioSegment:
    feats, lens = batch_features([np.asarray(samples, dtype=np.float32).reshape(-1)], DYNAMIC_FLOOR)
    return AudioSegment(torch.from_numpy(feats), int(lens[0]))


def _audio_placeholder(n: int) -> str:
    return "<|audio_start|>" + "<unk>" * n + "<|audio_end|>"


def _ensure_mode(engine: Engine, session: Session) -> None:
    if session.mode is not Mode.HALF_DUPLEX:
        engine.switch_mode(session, Mode.HALF_DUPLEX)


@torch.no_grad()
def _embeddings(
    engine: Engine, session: Session, text_parts: list[str], audio: list[AudioSegment], stream_audio: bool
) -> torch.Tensor:
    """Encode `text_parts` (with audio placeholders inside) and the audio, and merge them: `[T, D]`."""
    model = engine.model
    ids = engine.tokenizer.encode("".join(text_parts))
    emb = model.embed_ids(ids).clone()
    positions = [i for i, t in enumerate(ids) if t == engine.special.unk]
    rows = []
    for seg in audio:
        if stream_audio:
            rows.append(model.audio_embeds_stream(seg.mel, session.audio_cache, mel_length=seg.frames))
        else:
            rows.append(model.audio_embeds(seg.mel, [seg.frames], chunk_seconds=None)[0])
    if rows:
        merged = torch.cat(rows)
        if merged.shape[0] != len(positions):
            raise ValueError(f"{merged.shape[0]} audio embeddings for {len(positions)} placeholders")
        emb[torch.tensor(positions, device=emb.device)] = merged.to(emb.dtype)
    return emb


def _prefill_text_and_audio(
    engine: Engine, session: Session, text_parts: list[str], audio: list[AudioSegment], stream_audio: bool
) -> torch.Tensor:
    """`_embeddings`, fed to the session's slot. Returns the hidden states."""
    return engine.feed([session], [_embeddings(engine, session, text_parts, audio, stream_audio)])[0]


def prefill_system(engine: Engine, session: Session, content: Sequence[Content]) -> None:
    """Start the session with a system message (text and audio items joined without separators)."""
    _ensure_mode(engine, session)
    engine.reset_session(session)
    parts, audio = [], []
    for item in content:
        if isinstance(item, np.ndarray):
            item = _segment_from_samples(item)
        if isinstance(item, AudioSegment):
            parts.append(_audio_placeholder(pooled_tokens(item.frames, engine.model.config.audio_pool_step)))
            audio.append(item)
        else:
            parts.append(item)
    text = ["<|im_start|>system\n", *parts, "<|im_end|>\n"]
    # System audio is encoded in one piece with full attention; the streaming audio cache starts empty.
    _prefill_text_and_audio(engine, session, text, audio, stream_audio=False)
    st = session.half_duplex
    st.prefilled_any = True
    st.new_user_msg = True
    session.audio_cache.clear()


def _user_turn_prefix(st: HalfDuplexState) -> str:
    """Text that opens (or continues) the user's turn: the first message opens it; a new message after a
    reply first closes that reply (`<|tts_eos|>` too when it was cut off)."""
    if not st.prefilled_any:
        return "<|im_start|>user\n"
    if not st.new_user_msg:
        return ""
    prefix = ""
    if st.llm_generated:
        prefix = "<|im_end|>\n" if st.llm_generate_completed else "<|tts_eos|><|im_end|>\n"
    return prefix + "<|im_start|>user\n"


def start_reply_state(session: Session) -> None:
    """Turn bookkeeping at the start of a reply: the next user message first closes it, and the next user
    audio starts a fresh streaming mel and encoder cache."""
    st = session.half_duplex
    st.new_user_msg = True
    st.llm_generated = True
    st.llm_generate_completed = False
    st.mel.reset()
    session.audio_cache.clear()


def reply_bans(engine: Engine, spoken: bool = True, extra_banned: Sequence[int] = ()) -> list[int]:
    return [*(spoken_bans(engine) if spoken else ()), *extra_banned]


def user_turn_embeddings(
    engine: Engine,
    session: Session,
    samples: np.ndarray | None = None,
    text: str | None = None,
    image: Image.Image | None = None,
) -> torch.Tensor:
    """The embeddings `[T, D]` of one whole user turn (16 kHz audio as one segment with full attention, or typed
    text, which may follow a still image), not yet fed: the caller feeds them, with other sessions' turns in one
    batched step. The turn bookkeeping is done as if they were fed."""
    _ensure_mode(engine, session)
    st = session.half_duplex
    prefix = _user_turn_prefix(st)
    if image is not None:  # the image (its slices) through the processor and the vision tower, then the text
        out = engine.processor(prefix + IMAGE_MARK + "\n" + (text or ""), images=[image])
        emb = prompt_embeddings(engine.model, prompt_from_processor(out))
    elif samples is not None:
        segment = _segment_from_samples(samples)
        n = pooled_tokens(segment.frames, engine.model.config.audio_pool_step)
        emb = _embeddings(engine, session, [prefix, _audio_placeholder(n)], [segment], stream_audio=False)
    else:
        emb = engine.model.embed_ids(engine.tokenizer.encode(prefix + (text or "")))
    first = not st.prefilled_any
    st.prefilled_any = True
    st.new_user_msg = False
    if first:
        session.audio_cache.clear()
    return emb
