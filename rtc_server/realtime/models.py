"""The Realtime API events this server takes and sends, as pydantic models (GA shape of the API).

Client events are validated strictly: an unknown event type or field is answered with an `error` event in
OpenAI's shape and the session goes on. Fields that the API defines but this server does not use are
accepted and listed as `ignored` in docs/REALTIME.md.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- session configuration (session.update's `session`, and what session.created/updated show) -------------


class AudioFormat(_In):
    type: Literal["audio/pcm", "audio/pcmu", "audio/pcma"] = "audio/pcm"
    rate: Literal[24000, 8000] | None = None  # 24000 for audio/pcm, 8000 for G.711 (pcmu, pcma)


class TurnDetection(_In):
    """`server_vad` / `semantic_vad` (our chat mode with its VAD), or the extension `duplex` (the model decides
    when to speak: audio_duplex, or omni_duplex when the WebRTC call sends a camera track)."""

    type: Literal["server_vad", "semantic_vad", "duplex"]
    threshold: float | None = Field(None, gt=0.0, lt=1.0)
    prefix_padding_ms: int | None = Field(None, ge=0, le=5000)
    silence_duration_ms: int | None = Field(None, ge=0, le=10000)
    create_response: bool | None = None
    interrupt_response: bool | None = None
    eagerness: Literal["low", "medium", "high", "auto"] | None = None
    idle_timeout_ms: int | None = None


class InputAudio(_In):
    format: AudioFormat | None = None
    transcription: dict[str, Any] | None = None
    noise_reduction: dict[str, Any] | None = None
    turn_detection: TurnDetection | None = None


class OutputAudio(_In):
    format: AudioFormat | None = None
    voice: str | None = Field(None, max_length=64)
    speed: float | None = Field(None, ge=0.25, le=4.0)


class RealtimeAudioConfig(_In):
    input: InputAudio | None = None
    output: OutputAudio | None = None


class SessionConfig(_In):
    """`session` of `session.update` (and of the `session` part of `POST /v1/realtime/calls`)."""

    type: Literal["realtime"] | None = None
    model: str | None = Field(None, max_length=128)
    instructions: str | None = Field(None, max_length=20000)
    output_modalities: list[Literal["audio", "text"]] | None = Field(None, min_length=1, max_length=2)
    audio: RealtimeAudioConfig | None = None
    max_output_tokens: int | Literal["inf"] | None = None
    temperature: float | None = Field(None, gt=0.0, le=2.0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    tracing: str | dict[str, Any] | None = None
    truncation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    include: list[str] | None = None
    reasoning: dict[str, Any] | None = None


# ---- conversation items -------------------------------------------------------------------------------------


class ContentIn(_In):
    type: Literal["input_text", "input_audio", "input_image", "text", "output_text", "output_audio"]
    text: str | None = Field(None, max_length=20000)
    transcript: str | None = Field(None, max_length=20000)
    audio: str | None = None
    image_url: str | None = None
    detail: str | None = None


class ItemIn(_In):
    id: str | None = Field(None, max_length=64)
    type: Literal["message", "function_call", "function_call_output"] = "message"
    object: Literal["realtime.item"] | None = None
    status: str | None = None
    role: Literal["user", "assistant", "system"] | None = None
    content: list[ContentIn] | None = Field(None, max_length=16)
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None


class ContentOut(_Out):
    type: Literal["input_text", "input_audio", "input_image", "output_text", "output_audio"]
    text: str | None = None
    transcript: str | None = None


class ItemOut(_Out):
    id: str
    type: Literal["message"] = "message"
    object: Literal["realtime.item"] = "realtime.item"
    status: Literal["completed", "incomplete", "in_progress"] = "completed"
    role: Literal["user", "assistant", "system"]
    content: list[ContentOut] = Field(default_factory=list)


# ---- client events ------------------------------------------------------------------------------------------


class _ClientEvent(_In):
    event_id: str | None = Field(None, max_length=64)


class SessionUpdate(_ClientEvent):
    type: Literal["session.update"]
    session: SessionConfig


class AudioAppend(_ClientEvent):
    type: Literal["input_audio_buffer.append"]
    audio: str  # base64 PCM16 mono 24 kHz (size bounded in conversation.py)


class AudioCommit(_ClientEvent):
    type: Literal["input_audio_buffer.commit"]


class AudioClear(_ClientEvent):
    type: Literal["input_audio_buffer.clear"]


class ItemCreate(_ClientEvent):
    type: Literal["conversation.item.create"]
    previous_item_id: str | None = None
    item: ItemIn


class ItemTruncate(_ClientEvent):
    type: Literal["conversation.item.truncate"]
    item_id: str = Field(max_length=64)
    content_index: int = Field(0, ge=0)
    audio_end_ms: int = Field(ge=0)


class ItemRetrieve(_ClientEvent):
    type: Literal["conversation.item.retrieve"]
    item_id: str = Field(max_length=64)


class ItemDelete(_ClientEvent):
    type: Literal["conversation.item.delete"]
    item_id: str = Field(max_length=64)


class ResponseParams(_In):
    instructions: str | None = Field(None, max_length=20000)
    output_modalities: list[Literal["audio", "text"]] | None = None
    max_output_tokens: int | Literal["inf"] | None = None
    conversation: str | None = None
    metadata: dict[str, Any] | None = None
    input: list[dict[str, Any]] | None = None
    audio: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None


class ResponseCreate(_ClientEvent):
    type: Literal["response.create"]
    response: ResponseParams | None = None


class ResponseCancel(_ClientEvent):
    type: Literal["response.cancel"]
    response_id: str | None = None


class OutputAudioClear(_ClientEvent):
    type: Literal["output_audio_buffer.clear"]


ClientEvent = Annotated[
    SessionUpdate
    | AudioAppend
    | AudioCommit
    | AudioClear
    | ItemCreate
    | ItemTruncate
    | ItemRetrieve
    | ItemDelete
    | ResponseCreate
    | ResponseCancel
    | OutputAudioClear,
    Field(discriminator="type"),
]
client_event_adapter: TypeAdapter[ClientEvent] = TypeAdapter(ClientEvent)
CLIENT_EVENT_TYPES = sorted(
    m.model_fields["type"].annotation.__args__[0]  # type: ignore[union-attr]
    for m in (
        SessionUpdate,
        AudioAppend,
        AudioCommit,
        AudioClear,
        ItemCreate,
        ItemTruncate,
        ItemRetrieve,
        ItemDelete,
        ResponseCreate,
        ResponseCancel,
        OutputAudioClear,
    )
)


# ---- server events ------------------------------------------------------------------------------------------


class _ServerEvent(_Out):
    event_id: str = Field(default_factory=lambda: new_id("event"))


class ErrorDetail(_Out):
    type: Literal["invalid_request_error", "server_error"] = "invalid_request_error"
    code: str
    message: str
    param: str | None = None
    event_id: str | None = None  # the client event this is about


class RealtimeError(_ServerEvent):
    type: Literal["error"] = "error"
    error: ErrorDetail


class TurnDetectionOut(_Out):
    type: Literal["server_vad", "semantic_vad", "duplex"]
    threshold: float | None = None
    prefix_padding_ms: int | None = None
    silence_duration_ms: int | None = None
    create_response: bool = True
    interrupt_response: bool = True


class SessionOut(_Out):
    type: Literal["realtime"] = "realtime"
    object: Literal["realtime.session"] = "realtime.session"
    id: str
    model: str
    output_modalities: list[str]
    instructions: str
    audio: dict[str, Any]
    max_output_tokens: int | Literal["inf"]
    temperature: float
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: str = "auto"
    tracing: str | dict[str, Any] | None = None
    mode: str  # extension: our mode that serves the session (chat, audio_duplex, omni_duplex)


class SessionCreated(_ServerEvent):
    type: Literal["session.created"] = "session.created"
    session: SessionOut


class SessionUpdated(_ServerEvent):
    type: Literal["session.updated"] = "session.updated"
    session: SessionOut


class SpeechStarted(_ServerEvent):
    type: Literal["input_audio_buffer.speech_started"] = "input_audio_buffer.speech_started"
    audio_start_ms: int
    item_id: str


class SpeechStopped(_ServerEvent):
    type: Literal["input_audio_buffer.speech_stopped"] = "input_audio_buffer.speech_stopped"
    audio_end_ms: int
    item_id: str


class AudioCommitted(_ServerEvent):
    type: Literal["input_audio_buffer.committed"] = "input_audio_buffer.committed"
    previous_item_id: str | None = None
    item_id: str


class AudioCleared(_ServerEvent):
    type: Literal["input_audio_buffer.cleared"] = "input_audio_buffer.cleared"


class ItemAdded(_ServerEvent):
    type: Literal["conversation.item.added"] = "conversation.item.added"
    previous_item_id: str | None = None
    item: ItemOut


class ItemDone(_ServerEvent):
    type: Literal["conversation.item.done"] = "conversation.item.done"
    previous_item_id: str | None = None
    item: ItemOut


class ItemTruncated(_ServerEvent):
    type: Literal["conversation.item.truncated"] = "conversation.item.truncated"
    item_id: str
    content_index: int
    audio_end_ms: int


class ItemRetrieved(_ServerEvent):
    type: Literal["conversation.item.retrieved"] = "conversation.item.retrieved"
    item: ItemOut


class Usage(_Out):
    total_tokens: int
    input_tokens: int
    output_tokens: int


class StatusDetails(_Out):
    type: Literal["completed", "cancelled", "incomplete", "failed"]
    reason: str | None = None


class ResponseOut(_Out):
    id: str
    object: Literal["realtime.response"] = "realtime.response"
    status: Literal["in_progress", "completed", "cancelled", "incomplete", "failed"]
    status_details: StatusDetails | None = None
    output: list[ItemOut] = Field(default_factory=list)
    output_modalities: list[str]
    conversation_id: str
    usage: Usage | None = None
    metadata: dict[str, Any] | None = None


class ResponseCreated(_ServerEvent):
    type: Literal["response.created"] = "response.created"
    response: ResponseOut


class ResponseDone(_ServerEvent):
    type: Literal["response.done"] = "response.done"
    response: ResponseOut


class OutputItemAdded(_ServerEvent):
    type: Literal["response.output_item.added"] = "response.output_item.added"
    response_id: str
    output_index: int = 0
    item: ItemOut


class OutputItemDone(_ServerEvent):
    type: Literal["response.output_item.done"] = "response.output_item.done"
    response_id: str
    output_index: int = 0
    item: ItemOut


class _PartRef(_ServerEvent):
    response_id: str
    item_id: str
    output_index: int = 0
    content_index: int = 0


class ContentPartAdded(_PartRef):
    type: Literal["response.content_part.added"] = "response.content_part.added"
    part: ContentOut


class ContentPartDone(_PartRef):
    type: Literal["response.content_part.done"] = "response.content_part.done"
    part: ContentOut


class TranscriptDelta(_PartRef):
    type: Literal["response.output_audio_transcript.delta"] = "response.output_audio_transcript.delta"
    delta: str


class TranscriptDone(_PartRef):
    type: Literal["response.output_audio_transcript.done"] = "response.output_audio_transcript.done"
    transcript: str


class TextDelta(_PartRef):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    delta: str


class TextDone(_PartRef):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    text: str


class AudioDelta(_PartRef):
    type: Literal["response.output_audio.delta"] = "response.output_audio.delta"
    delta: str  # base64 PCM16 mono 24 kHz


class AudioDone(_PartRef):
    type: Literal["response.output_audio.done"] = "response.output_audio.done"


class OutputBufferStarted(_ServerEvent):
    type: Literal["output_audio_buffer.started"] = "output_audio_buffer.started"
    response_id: str


class OutputBufferStopped(_ServerEvent):
    type: Literal["output_audio_buffer.stopped"] = "output_audio_buffer.stopped"
    response_id: str


class OutputBufferCleared(_ServerEvent):
    type: Literal["output_audio_buffer.cleared"] = "output_audio_buffer.cleared"
    response_id: str | None = None


class ClientSecretAnswer(_Out):
    value: str
    expires_at: int
    session: dict[str, Any]
