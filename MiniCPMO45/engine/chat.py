"""Turn-based chat: prefill a processed prompt into a session's KV slot, then generate the reply."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..model import MiniCPMO
from ..processor.processor import ProcessorOutput
from .core import Engine
from .generation import TokenEvent, generate
from .sampling import ChatSampling
from .session import Mode, Session


@dataclass
class PromptInputs:
    """One tokenized prompt with its media, as the processor produces it."""

    input_ids: Sequence[int] | torch.Tensor
    pixel_slices: list[torch.Tensor] = field(default_factory=list)  # [C, patch, L*patch] per slice
    tgt_sizes: torch.Tensor | None = None  # [N, 2]
    image_bounds: torch.Tensor | Sequence[Sequence[int]] = ()
    audio_features: torch.Tensor | None = None  # [S, n_mels, F] log-mel segments
    audio_feature_lens: torch.Tensor | Sequence[int] = ()
    audio_bounds: torch.Tensor | Sequence[Sequence[int]] = ()


def prompt_from_processor(out: ProcessorOutput) -> PromptInputs:
    return PromptInputs(
        input_ids=out.input_ids[0],
        pixel_slices=list(out.pixel_values),
        tgt_sizes=out.tgt_sizes,
        image_bounds=out.image_bound,
        audio_features=out.audio_features,
        audio_feature_lens=out.audio_feature_lens,
        audio_bounds=out.audio_bounds,
    )


@torch.no_grad()
def prompt_embeddings(
    model: MiniCPMO, prompt: PromptInputs, audio_chunk_seconds: float | None = 1.0
) -> torch.Tensor:
    """Token embeddings of the prompt with vision and audio embeddings merged in (`[T, D]`)."""
    vision = None
    if prompt.pixel_slices:
        if prompt.tgt_sizes is None:
            raise ValueError("pixel slices need tgt_sizes")
        vision = model.vision_embeds(prompt.pixel_slices, torch.as_tensor(prompt.tgt_sizes))
    audio = None
    if prompt.audio_features is not None and len(prompt.audio_features):
        audio = model.audio_embeds(prompt.audio_features, prompt.audio_feature_lens, audio_chunk_seconds)
    return model.merge_embeddings(prompt.input_ids, vision, prompt.image_bounds, audio, prompt.audio_bounds)


@torch.no_grad()
def prefill(engine: Engine, sessions: Sequence[Session], prompts: Sequence[PromptInputs]) -> torch.Tensor:
    """Start a new conversation in each session from its full prompt; returns next-token logits `[B, V]`."""
    for s in sessions:
        if s.mode is not Mode.CHAT:
            engine.switch_mode(s, Mode.CHAT)
        engine.reset_session(s)
    pieces = [prompt_embeddings(engine.model, p) for p in prompts]
    return engine.last_logits(engine.feed(sessions, pieces))


def prefill_messages(
    engine: Engine,
    sessions: Sequence[Session],
    conversations: Sequence[Sequence[dict]],
    add_generation_prompt: bool = True,
    **chat_options: object,
) -> torch.Tensor:
    """Render each message list with the chat template (through the processor) and prefill it.

    `chat_options` go to `MiniCPMOProcessor.chat_inputs` (omni_mode, use_tts_template, max_slice_nums, ...).
    With `add_generation_prompt=False` follow with `continue_with(assistant_prefix(...))`, as the reference
    web chat does.
    """
    prompts = [
        prompt_from_processor(
            engine.processor.chat_inputs(msgs, add_generation_prompt=add_generation_prompt, **chat_options)  # type: ignore[arg-type]
        )
        for msgs in conversations
    ]
    return prefill(engine, sessions, prompts)


@torch.no_grad()
def continue_with(engine: Engine, sessions: Sequence[Session], ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Feed extra token ids (e.g. the assistant prefix) and return next-token logits `[B, V]`."""
    return engine.last_logits(engine.feed_ids(sessions, ids))


def assistant_prefix(engine: Engine, use_tts_template: bool, enable_thinking: bool = False) -> list[int]:
    """The reference "bos string" fed before a streamed reply. It starts with `<|im_end|>\\n`, so after a full
    chat template (which already ends the user turn) the prompt holds that terminator twice, as in the
    reference web chat."""
    text = "<|im_end|>\n<|im_start|>assistant\n"
    if not enable_thinking:
        text += "<think>\n\n</think>\n\n"
    if use_tts_template:
        text += "<|tts_bos|>"
    return engine.tokenizer.encode(text)


def spoken_bans(engine: Engine) -> list[int]:
    """Ids banned while the reply is meant to be spoken: some punctuation plus the tokenizer's bad ids."""
    chars = ":：；#“”‘’@*【】「」()（）[]&/$"
    return [engine.tokenizer.char_token_id(c) for c in chars] + list(engine.tokenizer.bad_token_ids)


def reply(
    engine: Engine,
    sessions: Sequence[Session],
    first_logits: torch.Tensor,
    params: ChatSampling,
    max_new_tokens: int,
    spoken: bool = False,
) -> Iterator[list[TokenEvent]]:
    """Generate the replies (bans applied when they will be spoken)."""
    return generate(
        engine, sessions, first_logits, params, max_new_tokens, spoken_bans(engine) if spoken else ()
    )
