"""Messages of the `events` data channel and of the JSON signalling API, as pydantic models.

Every data-channel message is a JSON object with a `type` field. Server -> client: `session`, `state`,
`text`, `user_turn`, `metrics`, `queue`, `error`, `paused`, `resumed`. Client -> server: `set_mode`, `interrupt`, `pause`,
`resume`, `system_prompt`, `text`, `end_turn`, `respond`. Unknown or malformed client messages are answered with an `error` event and the
call goes on. These models are the single source for the API reference and the OpenAPI document. The events a
mode sends the caller (`text`, `state`, `user_turn`, `error`) and the unit metrics are defined once, in
`inference/protocol.py`: the worker's messages extend them with the session id, and the server forwards them
as they are (`inference.protocol.caller_event`).
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from inference.options import ModeOptions
from inference.protocol import ErrorEvent, StateEvent, TalkState, TextEvent, UnitMetrics, UserTurnEvent

SessionPhase = Literal["connecting", "queued", "active", "closed"]  # connecting: answered, ICE/DTLS not up


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- server -> client ------------------------------------------------------------------------------


class SessionEvent(_Event):
    """Sent when the data channel opens and whenever the mode opens on a worker (admission, mode switch)."""

    type: Literal["session"] = "session"
    session_id: str
    mode: str
    phase: SessionPhase
    switch_ms: float | None = None  # worker time to close the previous mode and open this one (mode switch)
    recording: bool = (
        False  # the call is recorded (`recording.enabled`); its recording is at /api/recordings/{id}
    )


class MetricsEvent(UnitMetrics):
    """Timings of one unit (`UnitMetrics`, which says what each number is), as the worker and the server
    measured them."""

    type: Literal["metrics"] = "metrics"
    unit: int


class QueueEvent(_Event):
    """The caller waits for a worker slot; position 1 is next."""

    type: Literal["queue"] = "queue"
    position: int
    eta_s: float


class PausedEvent(_Event):
    """The call is paused; without a `resume` within `timeout_s` it ends (error `pause_timeout`)."""

    type: Literal["paused"] = "paused"
    timeout_s: float


class ResumedEvent(_Event):
    type: Literal["resumed"] = "resumed"


ServerEvent = (
    SessionEvent
    | StateEvent
    | TextEvent
    | UserTurnEvent
    | MetricsEvent
    | QueueEvent
    | ErrorEvent
    | PausedEvent
    | ResumedEvent
)


# ---- client -> server ------------------------------------------------------------------------------


class SetModeMessage(_Event):
    """Switch the call's mode. With `system_prompt` the new mode opens with that prompt (empty: the mode's own
    default); without it the call's prompt carries over."""

    type: Literal["set_mode"]
    mode: str = Field(max_length=64)
    system_prompt: str | None = Field(None, max_length=20000)


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
    """Typed user input (in `chat` it starts a turn)."""

    type: Literal["text"]
    text: str = Field(max_length=20000)


class EndTurnMessage(_Event):
    """Push-to-talk in `chat`: the user's turn ends now (without waiting for the VAD's silence)."""

    type: Literal["end_turn"]


class RespondMessage(_Event):
    """`chat` with the option `auto_respond: false`: answer the turn the VAD ended (it waits for this)."""

    type: Literal["respond"]


ClientMessage = Annotated[
    SetModeMessage
    | InterruptMessage
    | PauseMessage
    | ResumeMessage
    | SystemPromptMessage
    | TextMessage
    | EndTurnMessage
    | RespondMessage,
    Field(discriminator="type"),
]
client_message_adapter: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)

QUOTE_CHARS = 64  # at most this much of a caller's text is quoted back in an error


def quote(text: str, limit: int = QUOTE_CHARS) -> str:
    """`repr(text)`, cut to `limit` characters: an error never echoes unbounded input back."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def parse_client_message(data: str | bytes, limit: int) -> ClientMessage | ErrorEvent:
    """A data-channel message from the caller, or the `error` event that says what is wrong with it (over
    `limit` bytes: `message_too_large`; not JSON or not a known message: `bad_message`)."""
    size = len(data) if isinstance(data, bytes) else len(data.encode())
    if size > limit:
        text = f"a client message may have at most {limit} bytes; this one had {size}"
        return ErrorEvent(code="message_too_large", message=text)
    try:
        return client_message_adapter.validate_python(json.loads(data))
    except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deeply
        return ErrorEvent(
            code="bad_message", message=f"invalid client message: {invalid_message_detail(exc)}"
        )


def invalid_message_detail(exc: Exception) -> str:
    """Why a client message was rejected, without more than `QUOTE_CHARS` of what the client sent."""
    if not isinstance(exc, ValidationError):
        return str(exc)[:240]
    error = exc.errors()[0]
    detail = error["msg"]
    tag = (error.get("ctx") or {}).get("tag")  # an unknown `type` is quoted in the message
    if isinstance(tag, str) and len(tag) > QUOTE_CHARS:
        detail = detail.replace(repr(tag), quote(tag))
    return detail[:240]


# ---- JSON signalling API ---------------------------------------------------------------------------


class SessionRequest(_Event):
    """Body of `POST /api/sessions`."""

    sdp: str = Field(max_length=200_000)
    type: Literal["offer"]
    mode: str = Field(max_length=64)
    system_prompt: str | None = Field(None, max_length=20000)
    voice: str | None = Field(None, pattern=r"^[0-9a-f]{24}$", description="a voice id from POST /api/voices")
    options: ModeOptions | None = None


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
