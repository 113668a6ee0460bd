"""`POST /v1/realtime/calls`: a Realtime API call over WebRTC, on the same call machinery as `/api/sessions`.

The body is a bare `application/sdp` offer, or a multipart form with `sdp` and an optional `session` (the
JSON of `session.update`'s `session`). The answer is `201` with the SDP answer and
`Location: /v1/realtime/calls/{call_id}`. Events flow over the caller's `oai-events` data channel; the model's
speech is the answer's audio track; a camera track makes a duplex session omni. `DELETE` on the call's URL (or
`POST .../hangup`) hangs up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import BodyPartReader, web
from pydantic import BaseModel, ValidationError

from rtc_server import events as ev
from rtc_server.config import AppConfig
from rtc_server.manager import Call
from rtc_server.realtime import models as rm
from rtc_server.realtime.client_secrets import SECRETS_KEY
from rtc_server.realtime.conversation import RealtimeConversation
from rtc_server.realtime.session_map import Settings, apply_update
from rtc_server.session import CallSession
from rtc_server.signalling import MANAGER_KEY, SDP_TYPE, ApiError, _create, validation_problems
from rtc_server.voice_ids import VOICE_ID, voice_exists

CALLS_KEY = web.AppKey("realtime_calls", set)  # ids of the live calls started by POST /v1/realtime/calls
MAX_SDP_BYTES = 200_000
MAX_SESSION_BYTES = 64_000
OUTBOX_LIMIT = 500
WAITING_LIMIT = 32
REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DRAIN_POLL_S = 0.1


class RtcPort:
    """The Realtime side of one WebRTC call (`CallSession.realtime`)."""

    transport = "webrtc"

    def __init__(self, session: CallSession, settings: Settings, voice_check: Callable[[str], bool]) -> None:
        self.session = session
        limit = session.manager.config.session.max_message_bytes
        self.conversation = RealtimeConversation(self, session.id, settings, voice_check, limit)
        self.outbox: list[str] = []
        self.waiting: list[dict[str, Any]] = []  # controls sent before the call had a worker slot
        self._drain_task: asyncio.Task[None] | None = None

    @property
    def has_video(self) -> bool:
        return self.session.video is not None

    # ---- hooks called by CallSession ----

    def on_channel_open(self) -> None:
        self.conversation.start()
        outbox, self.outbox = self.outbox, []
        for data in outbox:
            self.send_json(data)
        self._drain_task = asyncio.create_task(self._watch_drain(), name=f"rt-drain-{self.session.id[:8]}")

    def on_client_data(self, data: str | bytes) -> None:
        self.conversation.on_client_data(data)

    def on_call_event(self, event: BaseModel) -> None:
        if isinstance(event, ev.SessionEvent) and self.session.mode_open:  # the mode opened on a worker
            waiting, self.waiting = self.waiting, []
            for message in waiting:
                self.control(message)
        self.conversation.translator.on_event(event)

    def on_flush(self, turn: int) -> None:
        self.conversation.translator.on_flush(turn)

    def on_speech(self, pcm: np.ndarray, turn: int) -> None:
        self.conversation.translator.on_speech(pcm, turn)

    async def _watch_drain(self) -> None:
        """output_audio_buffer.stopped once a finished response's speech has left the track."""
        while self.session.phase != "closed":
            await asyncio.sleep(DRAIN_POLL_S)
            if self.session.speech.buffered_s == 0:
                self.conversation.translator.audio_drained()

    # ---- CallPort ----

    def send_json(self, data: str) -> None:
        channel = self.session.channel
        if channel is not None and channel.readyState == "open" and self.conversation.started:
            with contextlib.suppress(Exception):  # the channel closed under us: the call is ending
                channel.send(data)
        elif len(self.outbox) < OUTBOX_LIMIT:
            self.outbox.append(data)

    def control(self, message: dict[str, Any]) -> None:
        """To the worker's mode; held until the mode opens while the call waits for its slot."""
        if self.waiting or not self.session.send_control(message):
            if len(self.waiting) >= WAITING_LIMIT:
                self.conversation.error("session_not_ready", "the call has no model slot yet (it is queued)")
                return
            self.waiting.append(message)

    def reconfigure(self, mode: str, system_prompt: str, voice: str | None, options: dict[str, Any]) -> None:
        self.session.reconfigure(mode, system_prompt, voice, options)

    def flush_output(self) -> None:
        self.session.flush_speech()

    def append_audio(self, pcm16: np.ndarray, rate: int) -> None:
        """Never called: a WebRTC call's audio comes on its track."""

    def commit_audio(self) -> float:
        return 1.0  # the audio since the last turn is on the worker already (chat keeps up to 30 s)

    def clear_audio(self) -> None:
        """The track's audio reached the model as it came; there is no buffer to clear."""


def shard_port(session: CallSession, settings: dict[str, Any], config: AppConfig) -> RtcPort:
    """The Realtime side of a call whose media lives on a media shard (`media_shard.shard`)."""
    folder = REPO_ROOT / config.voices.dir

    def voice_check(voice: str) -> bool:
        return bool(VOICE_ID.match(voice)) and (folder / f"{voice}.wav").is_file()

    return RtcPort(session, Settings.from_dict(settings), voice_check)


async def _read_offer(request: web.Request) -> tuple[str, rm.SessionConfig | None]:
    ctype = request.content_type
    if ctype == SDP_TYPE:
        body = await request.read()
        if len(body) > MAX_SDP_BYTES:
            raise ApiError(413, "too_large", f"the SDP offer is larger than {MAX_SDP_BYTES} bytes")
        return body.decode("utf-8", errors="replace"), None
    if ctype != "multipart/form-data":
        raise ApiError(
            415, "unsupported_media_type", f"expected application/sdp or multipart/form-data, got {ctype}"
        )
    sdp: str | None = None
    session_json: str | None = None
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or part.name not in ("sdp", "session"):
                continue
            data = await part.read(decode=True)
            limit = MAX_SDP_BYTES if part.name == "sdp" else MAX_SESSION_BYTES
            if len(data) > limit:
                raise ApiError(413, "too_large", f"the {part.name} part is larger than {limit} bytes")
            if part.name == "sdp":
                sdp = data.decode("utf-8", errors="replace")
            else:
                session_json = data.decode("utf-8", errors="replace")
    except (ValueError, AssertionError) as exc:
        raise ApiError(400, "bad_request", f"the multipart form is malformed: {exc}") from None
    if sdp is None:
        raise ApiError(400, "bad_request", "the form has no sdp part")
    if session_json is None:
        return sdp, None
    try:
        return sdp, rm.SessionConfig.model_validate(json.loads(session_json))
    except json.JSONDecodeError as exc:
        raise ApiError(400, "bad_json", f"the session part is not JSON: {exc}") from None
    except ValidationError as exc:
        raise ApiError(400, "bad_request", f"session: {validation_problems(exc)}") from None


async def create_call(request: web.Request) -> web.Response:
    manager = request.app[MANAGER_KEY]
    sdp, config = await _read_offer(request)
    # a client secret (POST /v1/realtime/client_secrets) carries the session the call starts with
    settings = request.app[SECRETS_KEY].settings_for(request.headers.get("Authorization", "")) or Settings()
    if config is not None:
        settings, problems = apply_update(settings, config, lambda voice: voice_exists(request.app, voice))
        if problems:
            first = problems[0]
            raise ApiError(400, first.code, f"{first.param}: {first.message}")
    has_video = "\nm=video" in sdp.replace("\r\n", "\n")
    mode = settings.mode(has_video)
    remote = settings.to_dict() if manager.shards is not None else None  # a media shard attaches the port
    session = await _create(
        request, sdp, mode, settings.instructions or None, settings.voice_id(), settings.options(), remote
    )
    if isinstance(session, CallSession):
        session.realtime = RtcPort(session, settings, lambda voice: voice_exists(request.app, voice))
    calls = request.app[CALLS_KEY]
    calls.intersection_update(manager.sessions)  # forget ended calls
    calls.add(session.id)
    return web.Response(
        status=201,
        text=session.answer_sdp,
        content_type=SDP_TYPE,
        headers={"Location": f"/v1/realtime/calls/{session.id}"},
    )


def _call(request: web.Request) -> Call:
    manager = request.app[MANAGER_KEY]
    call_id = request.match_info["call_id"]
    session = manager.get(call_id)
    if session is None or call_id not in request.app[CALLS_KEY]:
        raise ApiError(404, "unknown_call", "no Realtime call at this URL")
    return session


async def hangup(request: web.Request) -> web.Response:
    session = _call(request)
    await session.close("hangup (Realtime)")
    return web.Response(status=204) if request.method == "DELETE" else web.json_response({"id": session.id})


def add_call_routes(app: web.Application) -> None:
    app[CALLS_KEY] = set()
    app.router.add_post("/v1/realtime/calls", create_call)
    app.router.add_delete("/v1/realtime/calls/{call_id}", hangup)
    app.router.add_post("/v1/realtime/calls/{call_id}/hangup", hangup)
