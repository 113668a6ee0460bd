"""Our mode outputs -> Realtime server events: user turns become committed user items, and each stretch of the
model's reply becomes one response.

chat: `user_turn` (the VAD or a commit ended the caller's turn) -> speech_started/stopped, committed and the user
item; `thinking`/`speaking` opens the response (response.created, output item, content part); text deltas are
the transcript; `listening` closes it (response.done, status completed). A flush (barge-in, response.cancel)
closes it as cancelled.

duplex: no request/response rhythm; each stretch of speech the model chooses (state `speaking` until it
listens again) is one response with one assistant item.
"""

from __future__ import annotations

import base64
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel

from rtc_server import events as ev
from rtc_server.realtime import models as rm
from rtc_server.realtime.g711 import OutputEncoder

ITEMS_KEPT = 256  # items a session remembers (retrieve, truncate)


@dataclass
class Response:
    id: str
    item: rm.ItemOut
    turn: int
    modality: str  # "audio" or "text"
    metadata: dict | None = None
    text: list[str] = field(default_factory=list)
    deltas: int = 0
    audio_samples: int = 0  # 24 kHz samples produced for it
    playing: bool = False  # WebRTC: output_audio_buffer.started was sent
    kv_start: int | None = None
    done: bool = False


class Translator:
    """The server-event side of one Realtime session."""

    def __init__(
        self, emit: Callable[[BaseModel], None], transport: str, modality: Callable[[], str]
    ) -> None:
        self.emit = emit
        self.transport = transport
        self.modality = modality
        self.conversation_id = rm.new_id("conv")
        self.items: OrderedDict[str, rm.ItemOut] = OrderedDict()
        self.item_turns: dict[str, Response] = {}
        self.last_item_id: str | None = None
        self.active: Response | None = None
        self.finished_turns: set[int] = set()
        self.cancel_reason: str | None = None  # set by response.cancel before the flush arrives
        self.pending_metadata: dict | None = None
        self.speech_item: str | None = None  # item id announced by speech_started (barge-in)
        self.skip_user_turn_events = False  # a manual commit already announced the turn's user item
        self.turn_based = True  # chat: a barge-in is the caller's speech starting (duplex: the model stops)
        self.hold_turns = False  # create_response=false: a spoken turn waits for response.create
        self.held_turn = False  # such a turn is waiting
        self.kv_tokens: int | None = None
        self.started_at = time.monotonic()
        self.last_played: Response | None = None
        self.encode = OutputEncoder(
            "audio/pcm"
        )  # WebSocket: the session's output audio format  # WebRTC: the response whose audio is (or was) on the track

    # ---- items ----

    def remember(self, item: rm.ItemOut, response: Response | None = None) -> str | None:
        previous = self.last_item_id
        self.items[item.id] = item
        if response is not None:
            self.item_turns[item.id] = response
        while len(self.items) > ITEMS_KEPT:
            old, _ = self.items.popitem(last=False)
            self.item_turns.pop(old, None)
        self.last_item_id = item.id
        return previous

    def add_user_item(self, content: list[rm.ContentOut], item_id: str | None = None) -> rm.ItemOut:
        item = rm.ItemOut(id=item_id or rm.new_id("item"), role="user", content=content)
        previous = self.remember(item)
        self.emit(rm.ItemAdded(previous_item_id=previous, item=item))
        self.emit(rm.ItemDone(previous_item_id=previous, item=item))
        return item

    def now_ms(self) -> int:
        return int((time.monotonic() - self.started_at) * 1000)

    # ---- our events ----

    def on_event(self, event: BaseModel) -> None:
        if isinstance(event, ev.UserTurnEvent):
            self.on_user_turn(event)
        elif isinstance(event, ev.StateEvent):
            if event.state in ("thinking", "speaking"):
                response = self.ensure(None)
                if response is not None and event.state == "speaking" and self.transport == "webrtc":
                    if not response.playing and response.modality == "audio":
                        response.playing = True
                        self.last_played = response
                        self.emit(rm.OutputBufferStarted(response_id=response.id))
            else:
                self.finish("completed")
        elif isinstance(event, ev.TextEvent):
            self.on_text(event.text, event.turn)
        elif isinstance(event, ev.MetricsEvent):
            if event.kv_tokens is not None:
                self.kv_tokens = event.kv_tokens
        elif isinstance(event, ev.ErrorEvent):
            fatal = event.code in ("worker_failed", "mode_error", "internal_error", "pause_timeout")
            detail = rm.ErrorDetail(
                type="server_error" if fatal else "invalid_request_error",
                code=event.code,
                message=event.message,
            )
            self.emit(rm.RealtimeError(error=detail))

    def on_user_turn(self, event: ev.UserTurnEvent) -> None:
        if event.started:  # the caller began to speak: speech_started now (a barge-in's flush may follow)
            if self.speech_item is None:
                self.speech_item = rm.new_id("item")
                self.emit(rm.SpeechStarted(audio_start_ms=self.now_ms(), item_id=self.speech_item))
            return
        self.finish("cancelled", "turn_detected")
        if event.text is not None or self.skip_user_turn_events:
            self.skip_user_turn_events = False
            return  # typed text or a manual commit: its item was added already
        self.held_turn = self.hold_turns
        item_id = self.speech_item or rm.new_id("item")
        end_ms = self.now_ms()
        if self.speech_item is None:
            start_ms = max(0, end_ms - int((event.seconds or 0.0) * 1000))
            self.emit(rm.SpeechStarted(audio_start_ms=start_ms, item_id=item_id))
        self.speech_item = None
        self.emit(rm.SpeechStopped(audio_end_ms=end_ms, item_id=item_id))
        self.emit(rm.AudioCommitted(previous_item_id=self.last_item_id, item_id=item_id))
        self.add_user_item([rm.ContentOut(type="input_audio", transcript=None)], item_id)

    def on_flush(self, turn: int) -> None:
        """The mode dropped its reply (barge-in, interrupt) or the client cleared the output buffer."""
        reason = self.cancel_reason or "turn_detected"
        self.cancel_reason = None
        response = self.active
        barge_in = reason == "turn_detected" and response is not None and self.turn_based
        if barge_in and self.speech_item is None:
            self.speech_item = rm.new_id("item")
            self.emit(rm.SpeechStarted(audio_start_ms=self.now_ms(), item_id=self.speech_item))
        if self.transport == "webrtc" and self.last_played is not None:
            self.emit(rm.OutputBufferCleared(response_id=self.last_played.id))
            self.last_played = None
        self.finish("cancelled", reason)

    def ensure(self, turn: int | None) -> Response | None:
        """The response in progress, opened now if there is none (None for a turn that already ended)."""
        active = self.active
        if active is not None and (turn is None or turn == active.turn or active.turn < 0):
            if turn is not None and active.turn < 0:
                active.turn = turn  # opened by a state change, before its first text
            return active
        if active is not None and turn is not None and turn < active.turn:
            return None
        if turn is not None and turn in self.finished_turns:
            return None
        if active is not None:
            self.finish("completed")
        modality = self.modality()
        part_type = "output_audio" if modality == "audio" else "output_text"
        item = rm.ItemOut(id=rm.new_id("item"), role="assistant", status="in_progress", content=[])
        response = Response(
            id=rm.new_id("resp"),
            item=item,
            turn=-1 if turn is None else turn,
            modality=modality,
            metadata=self.pending_metadata,
            kv_start=self.kv_tokens,
        )
        self.pending_metadata = None
        self.active = response
        self.emit(rm.ResponseCreated(response=self._response_out(response, "in_progress")))
        self.emit(rm.OutputItemAdded(response_id=response.id, item=item))
        previous = self.remember(item, response)
        self.emit(rm.ItemAdded(previous_item_id=previous, item=item))
        part = rm.ContentOut(type=part_type, transcript="" if modality == "audio" else None)
        if modality == "text":
            part.text = ""
        self.emit(rm.ContentPartAdded(response_id=response.id, item_id=item.id, part=part))
        return response

    def on_text(self, text: str, turn: int) -> None:
        response = self.ensure(turn)
        if response is None:
            return
        response.text.append(text)
        response.deltas += 1
        ref = {"response_id": response.id, "item_id": response.item.id}
        if response.modality == "audio":
            self.emit(rm.TranscriptDelta(delta=text, **ref))
        else:
            self.emit(rm.TextDelta(delta=text, **ref))

    def on_speech(self, pcm: np.ndarray, turn: int) -> None:
        """WebSocket: the model's speech (float32 mono 24 kHz) as output_audio.delta events."""
        response = self.active
        if response is None or response.modality != "audio" or (response.turn >= 0 and turn != response.turn):
            return
        response.audio_samples += pcm.size
        if self.transport != "websocket":
            return  # WebRTC: the speech is on the call's audio track
        data = self.encode(pcm)
        step = 48000 if self.encode.format == "audio/pcm" else 8000  # at most 1 s per event
        for start in range(0, len(data), step):
            delta = base64.b64encode(data[start : start + step]).decode()
            self.emit(rm.AudioDelta(response_id=response.id, item_id=response.item.id, delta=delta))

    def finish(self, status: str, reason: str | None = None) -> None:
        response = self.active
        if response is None:
            return
        self.active = None
        response.done = True
        if response.turn >= 0:
            self.finished_turns.add(response.turn)
        text = "".join(response.text)
        ref = {"response_id": response.id, "item_id": response.item.id}
        if response.modality == "audio":
            if self.transport == "websocket":
                self.emit(rm.AudioDone(**ref))
            self.emit(rm.TranscriptDone(transcript=text, **ref))
            part = rm.ContentOut(type="output_audio", transcript=text)
        else:
            self.emit(rm.TextDone(text=text, **ref))
            part = rm.ContentOut(type="output_text", text=text)
        self.emit(rm.ContentPartDone(part=part, **ref))
        response.item.content = [part]
        response.item.status = "completed" if status == "completed" else "incomplete"
        self.emit(rm.OutputItemDone(response_id=response.id, item=response.item))
        self.emit(rm.ItemDone(item=response.item))
        out = self._response_out(response, status, reason)
        out.output = [response.item]
        grown = (self.kv_tokens or 0) - (response.kv_start or 0) if response.kv_start is not None else 0
        out.usage = rm.Usage(
            total_tokens=max(grown, response.deltas),
            input_tokens=max(grown - response.deltas, 0),
            output_tokens=response.deltas,
        )
        self.emit(rm.ResponseDone(response=out))

    def audio_drained(self) -> None:
        """WebRTC: the track played everything queued; a finished response's audio has stopped."""
        response = self.last_played
        if response is not None and response.done:
            self.last_played = None
            self.emit(rm.OutputBufferStopped(response_id=response.id))

    def _response_out(self, response: Response, status: str, reason: str | None = None) -> rm.ResponseOut:
        details = None
        if status != "in_progress":
            details = rm.StatusDetails(type=status, reason=reason)  # type: ignore[arg-type]
        return rm.ResponseOut(
            id=response.id,
            status=status,  # type: ignore[arg-type]
            status_details=details,
            output_modalities=[response.modality],
            conversation_id=self.conversation_id,
            metadata=response.metadata,
        )
