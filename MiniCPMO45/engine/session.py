"""Per-session state. The model and the KV cache are shared; everything a session owns lives here."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from ..audio.mel_stream import HalfDuplexStreamingMel
from ..modules.whisper import WhisperStreamCache


class Mode(enum.StrEnum):
    CHAT = "chat"
    HALF_DUPLEX = "half_duplex"
    DUPLEX = "duplex"


@dataclass
class HalfDuplexState:
    """Bookkeeping of the half-duplex prompt: which prefix the next user segment needs."""

    prefilled_any: bool = False
    new_user_msg: bool = True
    llm_generated: bool = False
    llm_generate_completed: bool = False
    mel: HalfDuplexStreamingMel = field(default_factory=HalfDuplexStreamingMel)


@dataclass
class Session:
    """One conversation: a KV slot, the streaming audio-encoder cache, and the current mode's state."""

    session_id: str
    slot: int
    mode: Mode
    audio_cache: WhisperStreamCache = field(default_factory=WhisperStreamCache)
    half_duplex: HalfDuplexState = field(default_factory=HalfDuplexState)
    duplex: Any = None  # DuplexState while in duplex mode (see engine.duplex)
    generator: torch.Generator = field(default_factory=torch.Generator)
    history: list[int] = field(default_factory=list)  # ids generated in the current reply
    closed: bool = False
    top: bool = False  # on the highest KV slots: the second tick phase's

    @property
    def phase(self) -> int:
        return 1 if self.top else 0

    def seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)
