"""The ChatML chat template of MiniCPM-o 4.5 (Qwen3 style, spec §2.2), rendered in Python.

Covers what inference uses: system/user/assistant turns, the Qwen3 handling of `<think>` blocks in assistant
turns after the last user query, and the generation prompt with the empty think block (enable_thinking=False)
and `<|tts_bos|>` (use_tts_template). Tool calls are not supported.

Also the content flattening `MiniCPMO.chat` applies before templating: images become `<image>./</image>`,
audio arrays `<audio>./</audio>`, items joined with "\\n" (or "" in omni / stream-input mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

IMAGE_MARK = "<image>./</image>"
AUDIO_MARK = "<audio>./</audio>"
ROLES = ("system", "user", "assistant")
EMPTY_THINK = "<think>\n\n</think>\n\n"

# The generation prefix the streaming/non-streaming generate paths feed after a prompt (spec §2.2).
GENERATION_BOS = "<|im_end|>\n<|im_start|>assistant\n" + EMPTY_THINK
GENERATION_BOS_TTS = GENERATION_BOS + "<|tts_bos|>"


class ChatFormatError(ValueError):
    """A message list the template cannot render."""


def _split_think(content: str) -> tuple[str, str]:
    """(reasoning, answer) of an assistant text that carries a `</think>` block, as the Qwen3 template does."""
    if "</think>" not in content:
        return "", content
    answer = content.split("</think>")[-1].lstrip("\n")
    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, answer


def render_chat(
    messages: Sequence[dict[str, Any]],
    add_generation_prompt: bool = True,
    enable_thinking: bool = False,
    use_tts_template: bool = False,
) -> str:
    """Render messages whose `content` is already a string."""
    if not messages:
        raise ChatFormatError("no messages to render")
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise ChatFormatError(f"message {i} has role {m.get('role')!r}; expected one of {ROLES}")
        if not isinstance(m.get("content"), str):
            raise ChatFormatError(f"message {i} content must be a string after flattening")
    parts: list[str] = []
    if messages[0]["role"] == "system":
        parts.append(f"<|im_start|>system\n{messages[0]['content']}<|im_end|>\n")
    last_query = len(messages) - 1
    for index in range(len(messages) - 1, -1, -1):
        m = messages[index]
        tool_reply = m["content"].startswith("<tool_response>") and m["content"].endswith("</tool_response>")
        if m["role"] == "user" and not tool_reply:
            last_query = index
            break
    for index, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role == "user" or (role == "system" and index > 0):
            parts.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
        elif role == "assistant":
            reasoning = m.get("reasoning_content")
            if reasoning is None:
                reasoning, content = _split_think(content)
            is_last = index == len(messages) - 1
            if index > last_query and (is_last or reasoning):
                think = reasoning.strip("\n")
                parts.append(
                    f"<|im_start|>assistant\n<think>\n{think}\n</think>\n\n{content.lstrip(chr(10))}"
                )
            else:
                parts.append(f"<|im_start|>assistant\n{content}")
            parts.append("<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
        if not enable_thinking:
            parts.append(EMPTY_THINK)
        if use_tts_template:
            parts.append("<|tts_bos|>")
    return "".join(parts)


@dataclass
class FlatConversation:
    """Messages with string content plus the media pulled out of them, in prompt order."""

    messages: list[dict[str, Any]]
    images: list[Image.Image] = field(default_factory=list)
    audios: list[np.ndarray] = field(default_factory=list)
    audio_parts: list[int] = field(default_factory=list)  # message index of each audio item

    @property
    def has_audio(self) -> bool:
        return bool(self.audios)


def flatten_messages(messages: Sequence[dict[str, Any]], omni_mode: bool = False) -> FlatConversation:
    """Replace media in message content with markers; `omni_mode` (or stream input) joins items with ""."""
    if not messages:
        raise ChatFormatError("msgs is empty")
    if messages[0].get("role") not in ("user", "system"):
        raise ChatFormatError("the first message must be from the user or the system")
    flat = FlatConversation(messages=[])
    joiner = "" if omni_mode else "\n"
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise ChatFormatError(f"message {i} has role {role!r}; expected one of {ROLES}")
        content = message.get("content")
        items = [content] if isinstance(content, str) else list(content or [])
        pieces: list[str] = []
        for item in items:
            if isinstance(item, Image.Image):
                flat.images.append(item)
                pieces.append(IMAGE_MARK)
            elif isinstance(item, np.ndarray):
                if item.ndim != 1:
                    raise ChatFormatError(
                        f"message {i}: audio must be a 1-D 16 kHz array, got shape {item.shape}"
                    )
                flat.audios.append(item.astype(np.float32, copy=False))
                flat.audio_parts.append(i)
                pieces.append(AUDIO_MARK)
            elif isinstance(item, str):
                pieces.append(item)
            else:
                raise ChatFormatError(f"message {i}: unsupported content item of type {type(item).__name__}")
        flat_message = {k: v for k, v in message.items() if k != "content"}
        flat_message["content"] = joiner.join(pieces)
        flat.messages.append(flat_message)
    return flat
