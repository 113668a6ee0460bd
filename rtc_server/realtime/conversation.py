"""One Realtime session's protocol state: client events in, server events out, over a transport (`CallPort`).

Client events are parsed and checked here (size, JSON, event type, fields); anything wrong is answered with an
`error` event in OpenAI's shape (`{"type": "error", "error": {"type", "code", "message", "param", "event_id"}}`)
and the session goes on. Valid events become our mode controls (`text`, `end_turn`, `interrupt`, `truncate`)
or a re-open of the mode (`session.update`); our outputs become server events in `responses.Translator`.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ValidationError

from inference.images import decode_image
from MiniCPMO45.audio.rates import SPEECH_RATE
from rtc_server.realtime import g711
from rtc_server.realtime import models as rm
from rtc_server.realtime.responses import Translator
from rtc_server.realtime.session_map import Settings, apply_update

log = logging.getLogger("rtc_server.realtime")
MAX_APPEND_S = 15.0  # seconds of 24 kHz PCM16 one input_audio_buffer.append may carry
PYDANTIC_CODES = {
    "extra_forbidden": "unknown_parameter",
    "missing": "missing_required_parameter",
    "literal_error": "invalid_value",
    "union_tag_invalid": "invalid_value",
}


class CallPort(Protocol):
    """What a Realtime session needs from its call (WebRTC: `webrtc.RtcPort`; WebSocket: `websocket.SocketCall`)."""

    transport: str  # "webrtc" or "websocket"

    @property
    def has_video(self) -> bool: ...

    def send_json(self, data: str) -> None: ...

    def control(self, message: dict[str, Any]) -> None: ...

    def reconfigure(
        self, mode: str, system_prompt: str, voice: str | None, options: dict[str, Any]
    ) -> None: ...

    def flush_output(self) -> None: ...

    def append_audio(self, pcm16: np.ndarray, rate: int) -> None: ...

    def commit_audio(self) -> float: ...

    def clear_audio(self) -> None: ...


class RealtimeConversation:
    def __init__(
        self,
        port: CallPort,
        session_id: str,
        settings: Settings,
        voice_exists: Callable[[str], bool],
        max_message_bytes: int,
    ) -> None:
        self.port = port
        self.session_id = session_id
        self.settings = settings
        self.voice_exists = voice_exists
        self.max_message_bytes = max_message_bytes
        self.translator = Translator(self.emit, port.transport, self._modality)
        self.translator.turn_based = not settings.duplex
        self.translator.hold_turns = settings.holds_turns
        self.pending_texts: list[str] = []  # user text items waiting for response.create
        self.pending_image: str | None = None  # an input_image (base64) waiting for response.create
        self.committed_audio = False  # manual turns: audio committed, waiting for response.create
        self.response_modality: str | None = (
            None  # response.create's output_modalities, for the next response
        )
        self.started = False

    # ---- output ----

    def emit(self, event: BaseModel) -> None:
        self.port.send_json(event.model_dump_json())

    def error(self, code: str, message: str, param: str | None = None, event_id: str | None = None) -> None:
        self.emit(
            rm.RealtimeError(error=rm.ErrorDetail(code=code, message=message, param=param, event_id=event_id))
        )

    def start(self) -> None:
        """The transport is open: session.created goes first."""
        if not self.started:
            self.started = True
            self.emit(rm.SessionCreated(session=self.describe()))

    def describe(self) -> rm.SessionOut:
        return self.settings.describe(self.session_id, self.port.has_video)

    def _modality(self) -> str:
        modality, self.response_modality = self.response_modality, None
        return modality or self.settings.output_modalities[0]

    def worker_setup(self) -> tuple[str, str, str | None, dict[str, Any]]:
        """(mode, system prompt, voice id, options) the session opens with."""
        s = self.settings
        return s.mode(self.port.has_video), s.instructions, s.voice_id(), s.options()

    # ---- input ----

    def on_client_data(self, data: str | bytes) -> None:
        """A message from the client; never raises (a transport's handler must not fail)."""
        try:
            event = self._parse(data)
            if event is not None:
                self._dispatch(event)
        except Exception:
            log.exception("realtime session %s: a client event failed", self.session_id)
            self.emit(
                rm.RealtimeError(
                    error=rm.ErrorDetail(
                        type="server_error", code="internal_error", message="the server failed on this event"
                    )
                )
            )

    def _parse(self, data: str | bytes) -> rm.ClientEvent | None:
        size = len(data) if isinstance(data, bytes) else len(data.encode())
        if size > self.max_message_bytes:
            self.error(
                "message_too_large",
                f"an event may have at most {self.max_message_bytes} bytes; this one had {size}",
            )
            return None
        try:
            raw = json.loads(data)
        except (ValueError, RecursionError) as exc:
            self.error("invalid_json", f"the event is not JSON: {str(exc)[:200]}")
            return None
        if not isinstance(raw, dict):
            self.error("invalid_event", "an event is a JSON object with a `type`")
            return None
        event_id = raw.get("event_id") if isinstance(raw.get("event_id"), str) else None
        kind = raw.get("type")
        if not isinstance(kind, str):
            self.error("missing_required_parameter", "the event has no string `type`", "type", event_id)
            return None
        if kind not in rm.CLIENT_EVENT_TYPES:
            shown = kind if len(kind) <= 64 else kind[:64] + "..."
            self.error("unknown_event", f"unsupported event type {shown!r}", "type", event_id)
            return None
        try:
            return rm.client_event_adapter.validate_python(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = [str(part) for part in first["loc"][1:]]  # [0] is the event type (the union's tag)
            code = PYDANTIC_CODES.get(
                first["type"], "invalid_type" if "type" in first["type"] else "invalid_value"
            )
            param = ".".join(loc) or None
            self.error(code, f"{param or 'event'}: {first['msg']}"[:300], param, event_id)
            return None

    def _dispatch(self, event: rm.ClientEvent) -> None:
        handler = getattr(self, "_on_" + event.type.replace(".", "_"))
        handler(event)

    # ---- session ----

    def _on_session_update(self, event: rm.SessionUpdate) -> None:
        before = self.settings.worker_key(self.port.has_video)
        self.settings, problems = apply_update(self.settings, event.session, self.voice_exists)
        self.translator.turn_based = not self.settings.duplex
        self.translator.hold_turns = self.settings.holds_turns
        if self.settings.output_format != self.translator.encode.format:
            self.translator.encode = g711.OutputEncoder(self.settings.output_format)
        for problem in problems:
            self.error(problem.code, problem.message, problem.param, event.event_id)
        if self.settings.worker_key(self.port.has_video) != before:
            self.pending_texts.clear()
            self.pending_image = None
            self.committed_audio = False
            self.translator.finish("cancelled", "session_updated")
            self.translator.finished_turns.clear()  # the re-opened mode counts its turns from 0 again
            self.port.reconfigure(*self.worker_setup())
        self.emit(rm.SessionUpdated(session=self.describe()))

    # ---- input audio ----

    def _on_input_audio_buffer_append(self, event: rm.AudioAppend) -> None:
        if self.port.transport == "webrtc":
            self.error(
                "invalid_request", "a WebRTC call's audio comes on its audio track", "type", event.event_id
            )
            return
        fmt = self.settings.input_format
        limit = int(MAX_APPEND_S * g711.RATES[fmt] * g711.BYTES_PER_SAMPLE[fmt])
        if len(event.audio) * 3 // 4 > limit:
            self.error(
                "audio_too_large",
                f"one append may carry at most {MAX_APPEND_S:g} s of {fmt} ({limit} bytes)",
                "audio",
                event.event_id,
            )
            return
        try:
            pcm = base64.b64decode(event.audio, validate=True)
        except (binascii.Error, ValueError):
            self.error("invalid_value", "audio is not valid base64", "audio", event.event_id)
            return
        if len(pcm) % g711.BYTES_PER_SAMPLE[fmt]:
            self.error(
                "invalid_value",
                "audio must be whole PCM16 samples (an even number of bytes)",
                "audio",
                event.event_id,
            )
            return
        if pcm:
            self.port.append_audio(g711.decode(pcm, fmt), g711.RATES[fmt])

    def _on_input_audio_buffer_commit(self, event: rm.AudioCommit) -> None:
        if self.settings.duplex:
            self.error(
                "invalid_request",
                "in duplex the model hears the audio as it comes: nothing to commit",
                "type",
                event.event_id,
            )
            return
        seconds = self.port.commit_audio()
        if not self.settings.manual:
            self.port.control({"type": "end_turn"})  # the VAD's turn ends now; the reply follows
            return
        if seconds <= 0 and not self.committed_audio:
            self.error(
                "input_audio_buffer_commit_empty", "the input audio buffer is empty", None, event.event_id
            )
            return
        self.committed_audio = True
        item_id = rm.new_id("item")
        self.emit(rm.AudioCommitted(previous_item_id=self.translator.last_item_id, item_id=item_id))
        self.translator.add_user_item([rm.ContentOut(type="input_audio", transcript=None)], item_id)

    def _on_input_audio_buffer_clear(self, event: rm.AudioClear) -> None:
        self.port.clear_audio()
        self.emit(rm.AudioCleared())

    # ---- conversation items ----

    def _on_conversation_item_create(self, event: rm.ItemCreate) -> None:
        item = event.item
        if item.type != "message" or item.role != "user":
            what = item.type if item.type != "message" else f"a {item.role} message"
            self.error(
                "unsupported_item", f"only user messages can be added ({what} cannot)", "item", event.event_id
            )
            return
        texts: list[str] = []
        images: list[str] = []
        for part in item.content or []:
            if part.type in ("input_text", "text") and part.text:
                texts.append(part.text)
            elif part.type == "input_image" and part.image_url:
                try:
                    decode_image(part.image_url)  # refused here, not in the worker
                except ValueError as exc:
                    self.error("invalid_image", str(exc), "item.content.image_url", event.event_id)
                    return
                images.append(part.image_url.split(",", 1)[-1])
            else:
                self.error(
                    "unsupported_content",
                    f"user content of type {part.type} is not supported (input_text and input_image are)",
                    "item.content",
                    event.event_id,
                )
                return
        if not texts and not images:
            self.error("invalid_value", "the message has no text or image", "item.content", event.event_id)
            return
        if len(images) + (self.pending_image is not None) > 1:
            self.error(
                "unsupported_value",
                "one image per turn (respond to the last one first)",
                "item",
                event.event_id,
            )
            return
        if self.settings.duplex:
            self.error(
                "invalid_request", "typed text is for turn-based sessions, not duplex", "item", event.event_id
            )
            return
        self.pending_texts += texts
        if images:
            self.pending_image = images[0]
        content = [rm.ContentOut(type="input_image") for _ in images]
        content += [rm.ContentOut(type="input_text", text=text) for text in texts]
        self.translator.add_user_item(content, item.id)

    def _find_item(self, item_id: str, event_id: str | None) -> rm.ItemOut | None:
        item = self.translator.items.get(item_id)
        if item is None:
            self.error("item_not_found", f"no item {item_id!r} in this conversation", "item_id", event_id)
        return item

    def _on_conversation_item_retrieve(self, event: rm.ItemRetrieve) -> None:
        item = self._find_item(event.item_id, event.event_id)
        if item is not None:
            self.emit(rm.ItemRetrieved(item=item))

    def _on_conversation_item_delete(self, event: rm.ItemDelete) -> None:
        self.error(
            "unsupported_event", "items cannot be deleted from the model's context", "type", event.event_id
        )

    def _on_conversation_item_truncate(self, event: rm.ItemTruncate) -> None:
        item = self._find_item(event.item_id, event.event_id)
        if item is None:
            return
        response = self.translator.item_turns.get(item.id)
        if response is None or item.role != "assistant" or event.content_index != 0:
            self.error(
                "invalid_value",
                "only an assistant item's audio (content_index 0) can be truncated",
                "item_id",
                event.event_id,
            )
            return
        total_ms = response.audio_samples * 1000 // SPEECH_RATE
        if event.audio_end_ms > total_ms:
            message = f"audio_end_ms {event.audio_end_ms} is past the item's audio ({total_ms} ms)"
            self.error("invalid_value", message, "audio_end_ms", event.event_id)
            return
        text = "".join(response.text)
        heard = event.audio_end_ms / total_ms if total_ms else 0.0
        kept = text[: round(len(text) * heard)]
        if item.content:
            item.content[0].transcript = kept
        self.port.control({"type": "truncate", "turn": response.turn, "heard": round(heard, 4)})
        self.emit(rm.ItemTruncated(item_id=item.id, content_index=0, audio_end_ms=event.audio_end_ms))

    # ---- responses ----

    def _on_response_create(self, event: rm.ResponseCreate) -> None:
        params = event.response
        if self.settings.duplex:
            self.error("invalid_request", "in duplex the model decides when to speak", "type", event.event_id)
            return
        if self.translator.active is not None:
            self.error(
                "conversation_already_has_active_response",
                "a response is in progress; cancel it first",
                None,
                event.event_id,
            )
            return
        if params is not None:
            for name in ("instructions", "input", "tools", "prompt"):
                if getattr(params, name):
                    self.error(
                        "unsupported_value",
                        f"response.{name} is not supported",
                        f"response.{name}",
                        event.event_id,
                    )
                    return
            if params.conversation not in (None, "auto"):
                self.error(
                    "unsupported_value",
                    "out-of-band responses are not supported",
                    "response.conversation",
                    event.event_id,
                )
                return
            if params.output_modalities:
                self.response_modality = params.output_modalities[0]
            self.translator.pending_metadata = params.metadata
        if self.pending_texts or self.pending_image is not None:
            text, self.pending_texts = "\n".join(self.pending_texts), []
            message: dict[str, Any] = {"type": "text", "text": text}
            if self.pending_image is not None:
                message["image"], self.pending_image = self.pending_image, None
            self.port.control(message)
        elif self.committed_audio:
            self.committed_audio = False
            self.translator.skip_user_turn_events = True
            self.port.control({"type": "end_turn"})
        elif self.translator.held_turn:  # create_response=false: the turn the VAD ended waits for this
            self.translator.held_turn = False
            self.port.control({"type": "respond"})
        else:
            self.response_modality = None
            self.error(
                "no_input",
                "no new user input to respond to (add an item or commit audio first)",
                None,
                event.event_id,
            )

    def _cancel_active(self, reason: str) -> bool:
        if self.translator.active is None:
            return False
        self.translator.cancel_reason = reason
        self.port.control({"type": "interrupt"})
        self.port.flush_output()
        return True

    def _on_response_cancel(self, event: rm.ResponseCancel) -> None:
        active = self.translator.active
        if active is None or (event.response_id is not None and event.response_id != active.id):
            self.error(
                "response_cancel_not_active",
                "there is no such response in progress",
                "response_id",
                event.event_id,
            )
            return
        self._cancel_active("client_cancelled")

    def _on_output_audio_buffer_clear(self, event: rm.OutputAudioClear) -> None:
        if self.port.transport != "webrtc":
            self.error(
                "invalid_request", "output_audio_buffer.clear is for WebRTC calls", "type", event.event_id
            )
            return
        if not self._cancel_active("client_cancelled"):
            self.port.flush_output()
            self.emit(rm.OutputBufferCleared())
