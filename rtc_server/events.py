"""Messages of the `events` data channel and of the JSON signalling API, as pydantic models.

Every data-channel message is a JSON object with a `type` field. Server -> client: `session`, `state`,
`text`, `metrics`, `queue`, `error`. Client -> server: `set_mode`, `interrupt`, `pause`, `resume`,
`system_prompt`, `text`. Unknown or malformed client messages are answered with an `error` event and the
call goes on. These models are the single source for the API reference and the OpenAPI document.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

SessionPhase = Literal["queued", "active", "closed"]
TalkState = Literal["listening", "thinking", "speaking"]


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- server -> client ------------------------------------------------------------------------------


class SessionEvent(_Event):
    """Sent when the data channel opens and whenever the mode opens on a worker (admission, mode switch)."""

    type: Literal["session"] = "session"
    session_id: str
    mode: str
    phase: SessionPhase


class StateEvent(_Event):
    type: Literal["state"] = "state"
    state: TalkState


class TextEvent(_Event):
    """A delta of the assistant's text for turn `turn`."""

    type: Literal["text"] = "text"
    text: str
    turn: int


class MetricsEvent(_Event):
    """Timings of one unit: hand-off to the worker, mode compute time, and the round trip back."""

    type: Literal["metrics"] = "metrics"
    unit: int
    handoff_ms: float
    compute_ms: float
    roundtrip_ms: float


class QueueEvent(_Event):
    """The caller waits for a worker slot; position 1 is next."""

    type: Literal["queue"] = "queue"
    position: int
    eta_s: float


class ErrorEvent(_Event):
    type: Literal["error"] = "error"
    code: str
    message: str


ServerEvent = SessionEvent | StateEvent | TextEvent | MetricsEvent | QueueEvent | ErrorEvent


# ---- client -> server ------------------------------------------------------------------------------


class SetModeMessage(_Event):
    type: Literal["set_mode"]
    mode: str


class InterruptMessage(_Event):
    """Stop the assistant's current speech at once."""

    type: Literal["interrupt"]


class PauseMessage(_Event):
    type: Literal["pause"]


class ResumeMessage(_Event):
    type: Literal["resume"]


class SystemPromptMessage(_Event):
    type: Literal["system_prompt"]
    text: str = Field(max_length=20000)


class TextMessage(_Event):
    """Typed user input."""

    type: Literal["text"]
    text: str = Field(max_length=20000)


ClientMessage = Annotated[
    SetModeMessage | InterruptMessage | PauseMessage | ResumeMessage | SystemPromptMessage | TextMessage,
    Field(discriminator="type"),
]
client_message_adapter: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)


# ---- JSON signalling API ---------------------------------------------------------------------------


class SessionRequest(_Event):
    """Body of `POST /api/sessions`."""

    sdp: str = Field(max_length=200_000)
    type: Literal["offer"]
    mode: str
    system_prompt: str | None = Field(None, max_length=20000)


class SessionAnswer(_Event):
    """Response of `POST /api/sessions` (201)."""

    session_id: str
    sdp: str
    type: Literal["answer"] = "answer"


class SessionInfo(_Event):
    """One entry of `GET /api/sessions`."""

    session_id: str
    mode: str
    phase: SessionPhase
    state: TalkState
    worker_id: int | None
    queue_position: int | None
    age_s: float


class SessionList(_Event):
    sessions: list[SessionInfo]


class ErrorBody(_Event):
    code: str
    message: str


class ErrorResponse(_Event):
    """Body of every 4xx/5xx answer."""

    error: ErrorBody
