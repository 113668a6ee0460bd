"""The Realtime routes and events in the OpenAPI document (`rtc_server.openapi` adds them to its own)."""

from __future__ import annotations

from pydantic import BaseModel

from rtc_server.openapi import ERROR, UNAUTHORIZED, Body, Operation, Query
from rtc_server.realtime import models as rm
from rtc_server.realtime.client_secrets import SecretRequest
from rtc_server.signalling import SDP_TYPE

SDP = Body(SDP_TYPE, schema={"type": "string"})
FORM = Body(
    "multipart/form-data",
    schema={
        "type": "object",
        "required": ["sdp"],
        "properties": {
            "sdp": {"type": "string", "description": "the SDP offer"},
            "session": {
                "type": "string",
                "description": "optional JSON of a session configuration (as in session.update's `session`)",
            },
        },
    },
)
CALL_NOT_FOUND = ("no Realtime call at this URL (`unknown_call`)", ERROR)
DOC = "docs/REALTIME.md"

REALTIME_OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "POST",
        "/v1/realtime/calls",
        "Start a Realtime API call over WebRTC",
        "realtime",
        request=SDP,
        responses={
            201: ("the SDP answer", SDP),
            400: ("bad SDP, a malformed form or session, or a session value this server refuses", ERROR),
            UNAUTHORIZED[0]: UNAUTHORIZED[1],
            403: ("a browser request from an origin not in `server.allowed_origins` (`bad_origin`)", ERROR),
            413: ("body too large", ERROR),
            415: ("neither application/sdp nor multipart/form-data", ERROR),
            429: ("this client has too many calls connecting, or sent too many offers a minute", ERROR),
            503: ("the queue is full or too many calls are connecting", ERROR),
        },
        response_headers={201: {"Location": "`/v1/realtime/calls/{call_id}`: DELETE hangs up"}},
        description="OpenAI Realtime API, WebRTC: the body is the SDP offer (`application/sdp`), or a "
        "multipart form with `sdp` and an optional `session` JSON (the same body as `multipart/form-data`). "
        "The offer has one audio track, optionally a camera track (omni duplex), and a data channel "
        "labelled `oai-events` that carries the Realtime events (`x-realtime-events`). The model's speech "
        f"is the answer's audio track. Mapping and compatibility table: {DOC}.",
    ),
    Operation(
        "DELETE",
        "/v1/realtime/calls/{call_id}",
        "Hang up a Realtime call",
        "realtime",
        responses={204: ("hung up", None), 401: UNAUTHORIZED[1], 404: CALL_NOT_FOUND},
    ),
    Operation(
        "POST",
        "/v1/realtime/calls/{call_id}/hangup",
        "Hang up a Realtime call (OpenAI's spelling)",
        "realtime",
        responses={200: ("hung up", None), 401: UNAUTHORIZED[1], 404: CALL_NOT_FOUND},
    ),
    Operation(
        "POST",
        "/v1/realtime/client_secrets",
        "Mint a short-lived client secret for a browser",
        "realtime",
        request=Body(model=SecretRequest),
        responses={
            200: (
                "the key (`ek_...`), its expiry (Unix seconds) and the session it starts",
                Body(model=rm.ClientSecretAnswer),
            ),
            400: ("bad JSON, or a session value this server refuses", ERROR),
            UNAUTHORIZED[0]: UNAUTHORIZED[1],
            415: ("Content-Type is not application/json", ERROR),
        },
        description="With `auth.api_token` set, a browser cannot hold the token: the app's server mints a key "
        "here and the browser starts its call with `Authorization: Bearer ek_...`. A key opens only "
        "`POST /v1/realtime/calls`, until it expires (`expires_after.seconds`, 10..7200, default 600), and the "
        "call starts with the key's `session`.",
    ),
    Operation(
        "GET",
        "/v1/realtime",
        "Realtime API session over WebSocket",
        "realtime",
        query=(Query("model", "any model name (this server serves one model); optional"),),
        responses={
            101: ("switching protocols: Realtime events flow as JSON text messages", None),
            400: ("not a WebSocket upgrade (`websocket_required`)", ERROR),
            UNAUTHORIZED[0]: UNAUTHORIZED[1],
            429: ("this client opened too many sessions a minute", ERROR),
            503: ("the server is busy", ERROR),
        },
        description="OpenAI Realtime API, WebSocket (for servers; the bearer token goes in the "
        "`Authorization` header). Audio is base64 PCM16 mono at 24 kHz both ways "
        f"(`input_audio_buffer.append`, `response.output_audio.delta`). See {DOC}.",
    ),
)

REALTIME_CLIENT_EVENTS: tuple[type[BaseModel], ...] = (
    rm.SessionUpdate,
    rm.AudioAppend,
    rm.AudioCommit,
    rm.AudioClear,
    rm.ItemCreate,
    rm.ItemTruncate,
    rm.ItemRetrieve,
    rm.ItemDelete,
    rm.ResponseCreate,
    rm.ResponseCancel,
    rm.OutputAudioClear,
)
REALTIME_SERVER_EVENTS: tuple[type[BaseModel], ...] = (
    rm.RealtimeError,
    rm.SessionCreated,
    rm.SessionUpdated,
    rm.SpeechStarted,
    rm.SpeechStopped,
    rm.AudioCommitted,
    rm.AudioCleared,
    rm.ItemAdded,
    rm.ItemDone,
    rm.ItemTruncated,
    rm.ItemRetrieved,
    rm.ResponseCreated,
    rm.ResponseDone,
    rm.OutputItemAdded,
    rm.OutputItemDone,
    rm.ContentPartAdded,
    rm.ContentPartDone,
    rm.TranscriptDelta,
    rm.TranscriptDone,
    rm.TextDelta,
    rm.TextDone,
    rm.AudioDelta,
    rm.AudioDone,
    rm.OutputBufferStarted,
    rm.OutputBufferStopped,
    rm.OutputBufferCleared,
)
REALTIME_EVENTS_DOC = {
    "channels": "the `oai-events` data channel (WebRTC) or the WebSocket's text messages",
    "description": f"OpenAI Realtime API events (GA shape); what maps to what: {DOC}",
    "server_to_client": [m.__name__ for m in REALTIME_SERVER_EVENTS],
    "client_to_server": [m.__name__ for m in REALTIME_CLIENT_EVENTS],
}
