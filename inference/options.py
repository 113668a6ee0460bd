"""Per-session options of the model modes, validated by the server (request) and the worker (mode).

Pure pydantic (no torch), so `rtc_server` can validate a request before a session is admitted.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class ModeOptions(BaseModel):
    """The `options` object of `POST /api/sessions` (all optional)."""

    model_config = ConfigDict(extra="forbid")

    # turn-based chat: Silero VAD speech probability that counts as speech, and the silence that always ends
    # a turn
    vad_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    min_silence_ms: int = Field(800, ge=100, le=5000)
    # the shorter silence that ends a turn when the VAD is confident (enough confident speech, a clean fall
    # into silence) and this caller's own pauses inside turns have been shorter; 0 = off. At most
    # `min_silence_ms` (a default above a smaller `min_silence_ms` is lowered to it). See `inference/vad.py`.
    fast_silence_ms: int = Field(480, ge=0, le=5000)
    # remember the caller's pauses inside turns (and confident ends that were false) to lengthen the fast
    # silence; off: the fast silence is fixed
    learn_pauses: bool = True
    # chat: a turn the VAD ends is answered at once (off: it waits for a `respond` control; the Realtime
    # API's create_response=false), and speech during a reply interrupts it (off: the reply plays on until
    # the caller's turn ends; interrupt_response=false)
    auto_respond: bool = True
    barge_in: bool = True
    # chat: when the caller is one unit (320 ms) of silence short of a turn's end, start the reply in that unit's
    # tick and hold what it says until the turn ends (dropped if the caller speaks on); see
    # `inference/modes/early_reply.py`
    early_reply: bool = True
    # chat: audio kept before the speech the VAD detected, so a turn starts with its first syllable
    preroll_ms: int = Field(500, ge=0, le=2000)
    max_new_tokens: int = Field(256, ge=1, le=4096)
    temperature: float = Field(0.7, gt=0.0, le=2.0)
    top_p: float = Field(0.8, gt=0.0, le=1.0)
    top_k: int = Field(100, ge=0, le=1000)
    length_penalty: float = Field(1.1, gt=0.0, le=5.0)
    seed: int | None = None
    # omni duplex: each unit's camera frame goes to the worker as soon as the server takes it (~150 ms before the
    # unit ends) and through the vision tower before the unit's tick, while the GPU is between ticks; off: in the
    # tick, after the unit's audio (the same result, later)
    frames_ahead: bool = True
    # omni duplex, with frames_ahead: the unit is also opened as soon as its frame is encoded (the previous unit's
    # tail, `<unit>` and the image blocks into the KV, one step for the frames that came together), and its tick
    # feeds only the audio; off by default until measured on a GPU (docs/PERFORMANCE.md, twenty-fifth session)
    prefill_ahead: bool = False
    # duplex: units waiting behind the current one beyond which the mode catches up (see inference/README.md)
    max_backlog_units: int = Field(2, ge=0, le=60)
    # Context window (KV positions): when a session would pass `max_kv_tokens`, the oldest whole units
    # (duplex) or turns (chat) after the system prompt are dropped down to `keep_kv_tokens`. 0 = the
    # worker's defaults (the engine's KV length, and 3/4 of it).
    max_kv_tokens: int = Field(0, ge=0)
    keep_kv_tokens: int = Field(0, ge=0)
    # Test option: "speak" forces the model to speak (duplex: every unit after the first three decides
    # to speak; chat: replies never stop before max_new_tokens), "listen" forces listening (duplex).
    force: Literal["speak", "listen"] | None = None

    @field_validator("fast_silence_ms")
    @classmethod
    def _check_fast_silence(cls, value: int, info: ValidationInfo) -> int:
        # runs only on a value the caller gave (pydantic does not validate defaults)
        if 0 < value < 100:
            raise ValueError(f"must be 0 (off) or at least 100, got {value}")
        min_silence = info.data.get("min_silence_ms")
        if min_silence is not None and value > min_silence:
            raise ValueError(f"must not be above min_silence_ms ({min_silence}), got {value}")
        return value
