"""`session.update` -> our mode, system prompt, voice and mode options.

| Realtime                                   | ours                                                        |
| ------------------------------------------ | ----------------------------------------------------------- |
| `instructions`                             | the system prompt ("" = the mode's own)                     |
| `audio.output.voice`                       | a voice id from `POST /api/voices`; `default` and OpenAI's built-in names = our default voice |
| `audio.input.turn_detection` server_vad    | `chat` with `vad_threshold` = threshold, `min_silence_ms` = silence_duration_ms, `preroll_ms` = prefix_padding_ms (at most 2 s), `auto_respond` = create_response, `barge_in` = interrupt_response |
| `audio.input.turn_detection` semantic_vad  | the same, with our VAD's defaults                           |
| `audio.input.turn_detection` null          | `chat`, turns only on `input_audio_buffer.commit`           |
| `audio.input.turn_detection` duplex        | `audio_duplex` (`omni_duplex` when a WebRTC call sends video) |
| `max_output_tokens`                        | `max_new_tokens` ("inf": our default, 256)                  |
| `temperature`                              | `temperature`                                               |

A change of mode, prompt, voice or options re-opens the session's mode on its worker (no weights move): the
model's context restarts with the new system prompt, as our own `set_mode`/`system_prompt` controls do.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from rtc_server.realtime import models as rm
from rtc_server.realtime.g711 import RATES

OPENAI_VOICES = frozenset(
    {"alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar", "fable", "onyx"}
)
VOICE_ID = re.compile(r"^[0-9a-f]{24}$")
DEFAULT_THRESHOLD = 0.5
DEFAULT_SILENCE_MS = 800
DEFAULT_PREFIX_MS = 500  # chat keeps 0.5 s of audio before the detected speech
DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 0.7
MANUAL_THRESHOLD = 0.99  # manual turns: the VAD practically never starts a turn by itself
MANUAL_SILENCE_MS = 5000
MODEL_NAME = "minicpm-o-4.5"


@dataclass(frozen=True)
class Problem:
    """One part of an update that was not applied: sent to the client as an `error` event."""

    code: str
    message: str
    param: str


@dataclass(frozen=True)
class Settings:
    """A Realtime session's effective configuration."""

    instructions: str = ""
    output_modalities: tuple[str, ...] = ("audio",)
    voice: str = "default"
    turn_detection: rm.TurnDetectionOut | None = field(
        default_factory=lambda: rm.TurnDetectionOut(
            type="server_vad",
            threshold=DEFAULT_THRESHOLD,
            prefix_padding_ms=DEFAULT_PREFIX_MS,
            silence_duration_ms=DEFAULT_SILENCE_MS,
        )
    )
    max_output_tokens: int | Literal["inf"] = "inf"
    temperature: float = DEFAULT_TEMPERATURE
    tracing: str | dict[str, Any] | None = None
    input_format: str = "audio/pcm"  # WebSocket audio (audio/pcm 24 kHz, audio/pcmu, audio/pcma 8 kHz)
    output_format: str = "audio/pcm"
    explicit_silence: bool = False  # server_vad's silence_duration_ms was given: no adaptive early end

    @property
    def manual(self) -> bool:
        return self.turn_detection is None

    @property
    def holds_turns(self) -> bool:
        """A turn the VAD ends waits for response.create (turn_detection.create_response = false)."""
        td = self.turn_detection
        return td is not None and td.type != "duplex" and not td.create_response

    @property
    def duplex(self) -> bool:
        return self.turn_detection is not None and self.turn_detection.type == "duplex"

    def mode(self, has_video: bool = False) -> str:
        if self.duplex:
            return "omni_duplex" if has_video else "audio_duplex"
        return "chat"

    def voice_id(self) -> str | None:
        return None if self.voice == "default" or self.voice in OPENAI_VOICES else self.voice

    def options(self) -> dict[str, Any]:
        """The mode options (`inference.options.ModeOptions`) this configuration means."""
        tokens = DEFAULT_MAX_TOKENS if self.max_output_tokens == "inf" else self.max_output_tokens
        options: dict[str, Any] = {"max_new_tokens": tokens, "temperature": self.temperature}
        td = self.turn_detection
        if td is None:
            options.update(
                vad_threshold=MANUAL_THRESHOLD, min_silence_ms=MANUAL_SILENCE_MS, fast_silence_ms=0
            )
        elif td.type != "duplex":
            options["vad_threshold"] = td.threshold or DEFAULT_THRESHOLD
            options["min_silence_ms"] = min(max(td.silence_duration_ms or DEFAULT_SILENCE_MS, 100), 5000)
            if td.type == "server_vad" and self.explicit_silence:
                options["fast_silence_ms"] = 0  # the client's silence, exactly (no confident early end)
            # create_response=false: the turn waits for response.create; interrupt_response=false: the
            # caller's speech does not cut the reply
            options["preroll_ms"] = td.prefix_padding_ms or 0
            options["auto_respond"] = td.create_response
            options["barge_in"] = td.interrupt_response
        return options

    def worker_key(self, has_video: bool = False) -> tuple[Any, ...]:
        """What the worker's session depends on: a change of it re-opens the mode."""
        return (self.mode(has_video), self.instructions, self.voice_id(), sorted(self.options().items()))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form, for a call whose media lives on a media shard (`media_shard.messages.Offer`)."""
        td = None if self.turn_detection is None else self.turn_detection.model_dump()
        return {**self.__dict__, "output_modalities": list(self.output_modalities), "turn_detection": td}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Settings:
        td = data.get("turn_detection")
        return cls(
            **{
                **data,
                "output_modalities": tuple(data["output_modalities"]),
                "turn_detection": None if td is None else rm.TurnDetectionOut.model_validate(td),
            }
        )

    def describe(self, session_id: str, has_video: bool = False) -> rm.SessionOut:
        fmt_in = {"type": self.input_format, "rate": RATES[self.input_format]}
        fmt_out = {"type": self.output_format, "rate": RATES[self.output_format]}
        td = self.turn_detection.model_dump(exclude_none=True) if self.turn_detection is not None else None
        return rm.SessionOut(
            id=session_id,
            model=MODEL_NAME,
            output_modalities=list(self.output_modalities),
            instructions=self.instructions,
            audio={
                "input": {
                    "format": fmt_in,
                    "transcription": None,
                    "noise_reduction": None,
                    "turn_detection": td,
                },
                "output": {"format": fmt_out, "voice": self.voice, "speed": 1.0},
            },
            max_output_tokens=self.max_output_tokens,
            temperature=self.temperature,
            tracing=self.tracing,
            mode=self.mode(has_video),
        )


def _turn_detection(td: rm.TurnDetection, problems: list[Problem]) -> rm.TurnDetectionOut:
    param = "session.audio.input.turn_detection"
    if td.type == "duplex":
        return rm.TurnDetectionOut(type="duplex")
    threshold = td.threshold if td.type == "server_vad" and td.threshold is not None else DEFAULT_THRESHOLD
    silence = td.silence_duration_ms if td.type == "server_vad" else None
    if silence is not None and not 100 <= silence <= 5000:
        problems.append(
            Problem(
                "invalid_value", "silence_duration_ms must lie in 100..5000", f"{param}.silence_duration_ms"
            )
        )
        silence = None
    return rm.TurnDetectionOut(
        type=td.type,
        threshold=threshold,
        prefix_padding_ms=min(td.prefix_padding_ms, 2000)
        if td.type == "server_vad" and td.prefix_padding_ms is not None
        else DEFAULT_PREFIX_MS,
        silence_duration_ms=silence or DEFAULT_SILENCE_MS,
        create_response=td.create_response is not False,
        interrupt_response=td.interrupt_response is not False,
    )


def _format(fmt: rm.AudioFormat, name: str, changes: dict[str, Any], problems: list[Problem]) -> None:
    rate = RATES[fmt.type]
    if fmt.rate is not None and fmt.rate != rate:
        param = f"session.audio.{name.split('_')[0]}.format.rate"
        problems.append(Problem("invalid_value", f"{fmt.type} is at {rate} Hz", param))
    else:
        changes[name] = fmt.type


def apply_update(
    current: Settings, update: rm.SessionConfig, voice_exists: Callable[[str], bool]
) -> tuple[Settings, list[Problem]]:
    """The settings after `update`, and the parts of it that were refused (the rest is applied)."""
    problems: list[Problem] = []
    changes: dict[str, Any] = {}
    if update.instructions is not None:
        changes["instructions"] = update.instructions
    if update.output_modalities is not None:
        modalities = tuple(dict.fromkeys(update.output_modalities))
        if len(modalities) > 1:
            problems.append(
                Problem(
                    "invalid_value",
                    "output_modalities takes one of ['audio'] or ['text']",
                    "session.output_modalities",
                )
            )
        else:
            changes["output_modalities"] = modalities
    if update.max_output_tokens is not None:
        tokens = update.max_output_tokens
        if tokens != "inf" and not 1 <= tokens <= 4096:
            problems.append(
                Problem(
                    "invalid_value",
                    "max_output_tokens must lie in 1..4096 or be 'inf'",
                    "session.max_output_tokens",
                )
            )
        else:
            changes["max_output_tokens"] = tokens
    if update.temperature is not None:
        changes["temperature"] = update.temperature
    if update.tracing is not None:
        changes["tracing"] = update.tracing
    if update.tools:
        problems.append(
            Problem("unsupported_value", "tools (function calling) are not supported", "session.tools")
        )
    audio = update.audio
    if audio is not None and audio.output is not None:
        out = audio.output
        if out.voice is not None:
            voice = out.voice
            if (
                voice == "default"
                or voice in OPENAI_VOICES
                or (VOICE_ID.match(voice) and voice_exists(voice))
            ):
                changes["voice"] = voice
            else:
                problems.append(
                    Problem(
                        "invalid_value",
                        f"unknown voice {voice[:64]!r}: use 'default' or a voice id from GET /api/voices",
                        "session.audio.output.voice",
                    )
                )
        if out.format is not None:
            _format(out.format, "output_format", changes, problems)
    if audio is not None and audio.input is not None:
        inp = audio.input
        if inp.format is not None:
            _format(inp.format, "input_format", changes, problems)
        if "turn_detection" in inp.model_fields_set:
            td = inp.turn_detection
            changes["turn_detection"] = None if td is None else _turn_detection(td, problems)
            changes["explicit_silence"] = td is not None and td.silence_duration_ms is not None
    return replace(current, **changes), problems
