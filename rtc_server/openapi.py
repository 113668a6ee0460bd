"""The OpenAPI 3.1 document of the server, generated from the pydantic models, at `/api/openapi.json`.

`OPERATIONS` names every route the app registers, with its request and response models; the schemas come
from the models' JSON schemas (`pydantic.json_schema.models_json_schema`). The data channel events are in
the same document under `x-data-channel-events` (names of component schemas, by direction), so that the
/docs page renders both from one source. tests/test_ui_api.py checks `OPERATIONS` against the router.

One module over ~500 lines on purpose: most of it is the one `OPERATIONS` table, which is checked against the
router as a whole and reads best as one list of every route.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema

from rtc_server import events as ev
from rtc_server.admin_api import ADMIN_HEADER, AdminStatus
from rtc_server.info_api import VERSION, ServerInfo
from rtc_server.presets import PresetList
from rtc_server.recordings import Recording, RecordingList
from rtc_server.signalling import MANAGER_KEY, SDP_TYPE, TRICKLE_TYPE
from rtc_server.voices import VoiceInfo, VoiceList, VoicePatch

REF = "#/components/schemas/{model}"
Auth = Literal["none", "api", "admin"]


class SessionClosed(BaseModel):
    """Response of `DELETE /api/sessions/{session_id}`."""

    model_config = ConfigDict(extra="forbid")
    session_id: str
    closed: bool


@dataclass(frozen=True)
class Body:
    """A request or response body: a pydantic model (JSON) or a plain schema for another media type."""

    content_type: str = "application/json"
    model: type[BaseModel] | None = None
    schema: dict[str, Any] | None = None


@dataclass(frozen=True)
class Query:
    name: str
    description: str
    required: bool = False


@dataclass(frozen=True)
class Operation:
    method: str
    path: str  # as aiohttp's `resource.canonical` spells it
    summary: str
    tag: str
    responses: dict[int, tuple[str, Body | None]]
    request: Body | None = None
    query: tuple[Query, ...] = ()
    auth: Auth = "api"
    description: str = ""
    response_headers: dict[int, dict[str, str]] = field(default_factory=dict)


def _json(model: type[BaseModel]) -> Body:
    return Body(model=model)


ERROR = _json(ev.ErrorResponse)
TEXT = {"type": "string"}
HTML = Body("text/html", schema=TEXT)
NOT_FOUND = (404, ("no such session", ERROR))
REC_NOT_FOUND = ("no such recording (`unknown_recording`)", ERROR)
GONE = (410, ("the session ended lately; the error says how (`session_ended`, `media_process_lost`)", ERROR))
UNAUTHORIZED = (401, ("missing or wrong bearer token (when `auth.api_token` is set)", ERROR))

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "POST",
        "/api/sessions",
        "Start a call (JSON signalling)",
        "signalling",
        request=_json(ev.SessionRequest),
        responses={
            201: (
                "the SDP answer; the call is admitted or queued (see the `queue` event)",
                _json(ev.SessionAnswer),
            ),
            400: (
                "bad JSON, bad SDP (`bad_sdp`: also no fingerprint or ICE credentials) or unknown mode",
                ERROR,
            ),
            UNAUTHORIZED[0]: UNAUTHORIZED[1],
            403: ("a browser request from an origin not in `server.allowed_origins` (`bad_origin`)", ERROR),
            413: ("body too large", ERROR),
            415: ("Content-Type is not application/json", ERROR),
            429: ("this client has too many calls connecting, or sent too many offers a minute", ERROR),
            503: ("the queue is full (`queue_full`) or too many calls are connecting (`server_busy`)", ERROR),
        },
        response_headers={
            201: {"Location": "URL of the session resource: the caller's capability, keep it private"},
            429: {"Retry-After": "seconds"},
            503: {"Retry-After": "seconds"},
        },
        description="Send an SDP offer with one audio track (and a video track for video modes) and one data "
        "channel labelled `events`. Speech comes back on the answer's audio track.",
    ),
    Operation(
        "GET",
        "/api/sessions",
        "List live sessions (operator only)",
        "signalling",
        auth="admin",
        responses={
            200: ("live and queued sessions", _json(ev.SessionList)),
            401: (
                f"missing or wrong `{ADMIN_HEADER}` (when `auth.admin_token` is set) or bearer token",
                ERROR,
            ),
            403: ("no admin token is configured and the client is not on this host (`admin_only`)", ERROR),
        },
    ),
    Operation(
        "GET",
        "/api/sessions/{session_id}",
        "One session",
        "signalling",
        responses={
            200: ("the session", _json(ev.SessionInfo)),
            401: UNAUTHORIZED[1],
            404: NOT_FOUND[1],
            410: GONE[1],
        },
    ),
    Operation(
        "DELETE",
        "/api/sessions/{session_id}",
        "Hang up",
        "signalling",
        responses={
            200: ("the session is closed", _json(SessionClosed)),
            401: UNAUTHORIZED[1],
            404: NOT_FOUND[1],
            410: GONE[1],
        },
    ),
    Operation(
        "POST",
        "/api/voices",
        "Upload a reference voice (WAV)",
        "voices",
        request=Body("audio/wav", schema={"type": "string", "format": "binary"}),
        responses={
            201: ("the stored voice; pass its id as `voice` when starting a call", _json(VoiceInfo)),
            400: (
                "not a WAV (`not_wav`), undecodable (`bad_audio`), `too_short`, `too_long` or `silent`",
                ERROR,
            ),
            UNAUTHORIZED[0]: UNAUTHORIZED[1],
            413: ("larger than `voices.max_bytes`", ERROR),
            415: ("Content-Type is not audio/wav (or multipart/form-data with a `file` part)", ERROR),
        },
        query=(Query("name", "the voice's name in the library (default: the upload time)"),),
        description="The body is a WAV file (`audio/wav`), or a multipart form whose `file` part is one. It is "
        "decoded with PyAV, resampled to 16 kHz mono and stored under its content hash, which is the voice id.",
    ),
    Operation(
        "GET",
        "/api/voices",
        "List the stored voices, the newest first",
        "voices",
        responses={200: ("stored voices", _json(VoiceList)), 401: UNAUTHORIZED[1]},
    ),
    Operation(
        "GET",
        "/api/voices/{voice_id}",
        "A voice's audio (16 kHz mono WAV), to preview it",
        "voices",
        responses={
            200: ("the voice", Body("audio/wav", schema={"type": "string", "format": "binary"})),
            401: UNAUTHORIZED[1],
            404: ("no such voice (`unknown_voice`)", ERROR),
        },
    ),
    Operation(
        "PATCH",
        "/api/voices/{voice_id}",
        "Rename a voice",
        "voices",
        request=_json(VoicePatch),
        responses={
            200: ("the renamed voice", _json(VoiceInfo)),
            400: ("an invalid name (`bad_request`)", ERROR),
            401: UNAUTHORIZED[1],
            404: ("no such voice (`unknown_voice`)", ERROR),
            415: ("Content-Type is not application/json", ERROR),
        },
    ),
    Operation(
        "DELETE",
        "/api/voices/{voice_id}",
        "Delete a voice (calls using it keep it; new calls asking for it get the default voice)",
        "voices",
        responses={
            204: ("deleted", None),
            401: UNAUTHORIZED[1],
            404: ("no such voice (`unknown_voice`)", ERROR),
        },
    ),
    Operation(
        "GET",
        "/api/recordings",
        "List every call recording, the newest first (admin)",
        "recordings",
        auth="admin",
        responses={
            200: ("the recordings", _json(RecordingList)),
            401: UNAUTHORIZED[1],
            403: ("not an admin (`admin_only` without an admin token: loopback clients only)", ERROR),
        },
    ),
    Operation(
        "GET",
        "/api/recordings/{recording_id}",
        "A call's recording: its summary, transcript and metrics events (with `t`, seconds), frame times",
        "recordings",
        responses={200: ("the recording", _json(Recording)), 401: UNAUTHORIZED[1], 404: REC_NOT_FOUND},
        description="The id is the call's id: whoever held the call's URL may read its recording.",
    ),
    Operation(
        "GET",
        "/api/recordings/{recording_id}/audio",
        "Both sides of the call in one 24 kHz WAV, in sync (replay, download)",
        "recordings",
        responses={
            200: ("the audio", Body("audio/wav", schema={"type": "string", "format": "binary"})),
            401: UNAUTHORIZED[1],
            404: REC_NOT_FOUND,
        },
    ),
    Operation(
        "GET",
        "/api/recordings/{recording_id}/frames/{ms}",
        "A camera snapshot, `ms` after the recording started (see `frame_times_ms`)",
        "recordings",
        responses={
            200: ("the snapshot", Body("image/jpeg", schema={"type": "string", "format": "binary"})),
            401: UNAUTHORIZED[1],
            404: ("no such recording or frame", ERROR),
        },
    ),
    Operation(
        "DELETE",
        "/api/recordings/{recording_id}",
        "Delete a recording",
        "recordings",
        responses={
            204: ("deleted", None),
            401: UNAUTHORIZED[1],
            404: REC_NOT_FOUND,
            409: ("the call is still running (`call_running`)", ERROR),
        },
    ),
    Operation(
        "GET",
        "/api/presets",
        "System-prompt presets per mode (English and Chinese)",
        "presets",
        query=(Query("mode", "only the presets of this mode"),),
        responses={200: ("the presets", _json(PresetList)), 401: UNAUTHORIZED[1]},
    ),
    Operation(
        "POST",
        "/whip",
        "Start a call (WHIP, RFC 9725)",
        "whip",
        request=Body(SDP_TYPE, schema=TEXT),
        query=(
            Query("mode", "the mode to open, e.g. `loopback`", required=True),
            Query("system_prompt", "optional system prompt"),
        ),
        responses={
            201: ("the SDP answer (audio is sendrecv)", Body(SDP_TYPE, schema=TEXT)),
            400: ("missing mode, bad SDP or unknown mode", ERROR),
            401: UNAUTHORIZED[1],
            415: ("Content-Type is not application/sdp", ERROR),
            503: ("all slots busy and the queue is full", ERROR),
        },
        response_headers={201: {"Location": "`/whip/<session_id>`: PATCH and DELETE go there"}},
    ),
    Operation(
        "PATCH",
        "/whip/{session_id}",
        "Trickle ICE candidates",
        "whip",
        request=Body(TRICKLE_TYPE, schema=TEXT),
        responses={
            204: ("candidates added", None),
            400: ("a candidate line cannot be parsed", ERROR),
            401: UNAUTHORIZED[1],
            404: NOT_FOUND[1],
            410: GONE[1],
            415: ("Content-Type is not application/trickle-ice-sdpfrag", ERROR),
        },
    ),
    Operation(
        "DELETE",
        "/whip/{session_id}",
        "Hang up (WHIP)",
        "whip",
        responses={
            204: ("the session is closed", None),
            401: UNAUTHORIZED[1],
            404: NOT_FOUND[1],
            410: GONE[1],
        },
    ),
    Operation(
        "GET",
        "/api/info",
        "Server facts for the UI",
        "info",
        responses={
            200: ("version, modes, whether the embedded demo model runs", _json(ServerInfo)),
            401: UNAUTHORIZED[1],
        },
    ),
    Operation(
        "GET",
        "/api/openapi.json",
        "This document",
        "info",
        responses={200: ("OpenAPI 3.1", Body(schema={"type": "object"})), 401: UNAUTHORIZED[1]},
    ),
    Operation(
        "GET",
        "/api/admin/status",
        "Workers, sessions, queue and recent errors",
        "admin",
        auth="admin",
        responses={
            200: ("the dashboard data", _json(AdminStatus)),
            401: (
                f"missing or wrong `{ADMIN_HEADER}` (when `auth.admin_token` is set) or bearer token",
                ERROR,
            ),
        },
    ),
    Operation(
        "GET",
        "/metrics",
        "Prometheus metrics",
        "metrics",
        responses={
            200: ("text exposition format 0.0.4", Body("text/plain", schema=TEXT)),
            401: UNAUTHORIZED[1],
        },
    ),
    Operation("GET", "/", "Home page", "pages", auth="none", responses={200: ("HTML", HTML)}),
    Operation("GET", "/call", "Call page", "pages", auth="none", responses={200: ("HTML", HTML)}),
    Operation("GET", "/settings", "Settings page", "pages", auth="none", responses={200: ("HTML", HTML)}),
    Operation(
        "GET",
        "/history",
        "Recent calls: replay recordings",
        "pages",
        auth="none",
        responses={200: ("HTML", HTML)},
    ),
    Operation("GET", "/admin", "Admin dashboard", "pages", auth="none", responses={200: ("HTML", HTML)}),
    Operation("GET", "/docs", "API documentation", "pages", auth="none", responses={200: ("HTML", HTML)}),
    Operation(
        "GET",
        "/{path}",
        "Static files of the UI (HTML, CSS, JavaScript)",
        "pages",
        auth="none",
        responses={
            200: ("the file", Body("application/octet-stream", schema=TEXT)),
            404: ("no such file", None),
        },
    ),
)

SERVER_EVENTS: tuple[type[BaseModel], ...] = (
    ev.SessionEvent,
    ev.StateEvent,
    ev.TextEvent,
    ev.UserTurnEvent,
    ev.MetricsEvent,
    ev.QueueEvent,
    ev.ErrorEvent,
    ev.PausedEvent,
    ev.ResumedEvent,
)
CLIENT_MESSAGES: tuple[type[BaseModel], ...] = (
    ev.SetModeMessage,
    ev.InterruptMessage,
    ev.PauseMessage,
    ev.ResumeMessage,
    ev.SystemPromptMessage,
    ev.TextMessage,
    ev.EndTurnMessage,
)


def _all_operations() -> tuple[Operation, ...]:
    """Ours and the Realtime API's (rtc_server/realtime/openapi_ops.py, imported here: it builds on this module)."""
    from rtc_server.realtime.openapi_ops import REALTIME_OPERATIONS

    return OPERATIONS + REALTIME_OPERATIONS


def _models() -> list[type[BaseModel]]:
    from rtc_server.realtime.openapi_ops import REALTIME_CLIENT_EVENTS, REALTIME_SERVER_EVENTS

    found: list[type[BaseModel]] = []
    for op in _all_operations():
        bodies = [op.request] + [body for _, body in op.responses.values()]
        for body in bodies:
            if body is not None and body.model is not None and body.model not in found:
                found.append(body.model)
    events = SERVER_EVENTS + CLIENT_MESSAGES + REALTIME_SERVER_EVENTS + REALTIME_CLIENT_EVENTS
    return found + [m for m in events if m not in found]


def _content(body: Body, refs: dict[type[BaseModel], dict[str, Any]]) -> dict[str, Any]:
    schema = refs[body.model] if body.model is not None else (body.schema or {})
    return {body.content_type: {"schema": schema}}


def _operation(op: Operation, refs: dict[type[BaseModel], dict[str, Any]], api_token: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "summary": op.summary,
        "tags": [op.tag],
        "operationId": re.sub(r"[^A-Za-z0-9]+", "_", f"{op.method.lower()}{op.path}").strip("_"),
    }
    if op.description:
        out["description"] = op.description
    params = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in re.findall(r"{(\w+)}", op.path)
    ]
    params += [
        {"name": q.name, "in": "query", "required": q.required, "description": q.description, "schema": TEXT}
        for q in op.query
    ]
    if params:
        out["parameters"] = params
    if op.request is not None:
        out["requestBody"] = {"required": True, "content": _content(op.request, refs)}
    responses: dict[str, Any] = {}
    for status, (description, body) in op.responses.items():
        response: dict[str, Any] = {"description": description}
        if body is not None:
            response["content"] = _content(body, refs)
        headers = op.response_headers.get(status)
        if headers:
            response["headers"] = {
                name: {"description": text, "schema": TEXT} for name, text in headers.items()
            }
        responses[str(status)] = response
    out["responses"] = responses
    bearer = [{"bearerAuth": []}] if api_token else []
    if op.auth == "api":
        out["security"] = bearer or [{}]
    elif op.auth == "admin":
        out["security"] = [{"adminToken": [], **(bearer[0] if bearer else {})}]
    else:
        out["security"] = [{}]
    return out


def build_openapi(api_token: bool = False, admin_token: bool = False) -> dict[str, Any]:
    """The document; `api_token`/`admin_token` say whether this server requires them."""
    models = _models()
    keys, top = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    refs = {m: keys[(m, "validation")] for m in models}
    from rtc_server.realtime.openapi_ops import REALTIME_EVENTS_DOC

    paths: dict[str, dict[str, Any]] = {}
    for op in _all_operations():
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, refs, api_token)
    state = "required on this server" if api_token else "not required on this server (auth.api_token unset)"
    admin_state = "required on this server" if admin_token else "not required on this server"
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "MiniCPM-o 4.5 real-time server",
            "version": VERSION,
            "description": "WebRTC signalling (JSON and WHIP), server facts, admin status and metrics. "
            "During a call, JSON events flow both ways on the `events` data channel: see "
            "`x-data-channel-events`.",
        },
        "paths": paths,
        "components": {
            "schemas": top.get("$defs", {}),
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": f"`auth.api_token` as `Authorization: Bearer <token>`; {state}.",
                },
                "adminToken": {
                    "type": "apiKey",
                    "in": "header",
                    "name": ADMIN_HEADER,
                    "description": f"`auth.admin_token`; {admin_state}.",
                },
            },
        },
        "tags": [
            {"name": "signalling", "description": "Start and end calls with a JSON body"},
            {"name": "whip", "description": "Start and end calls the WHIP way (application/sdp)"},
            {"name": "info", "description": "What the server offers"},
            {"name": "admin", "description": "Operator dashboard data"},
            {"name": "metrics", "description": "Prometheus scraping"},
            {"name": "pages", "description": "The web UI"},
            {"name": "realtime", "description": "OpenAI Realtime API compatibility (WebRTC and WebSocket)"},
        ],
        "x-data-channel-events": {
            "channel": "events",
            "server_to_client": [m.__name__ for m in SERVER_EVENTS],
            "client_to_server": [m.__name__ for m in CLIENT_MESSAGES],
        },
        "x-realtime-events": REALTIME_EVENTS_DOC,
    }


async def get_openapi(request: web.Request) -> web.Response:
    auth = request.app[MANAGER_KEY].config.auth
    return web.json_response(build_openapi(bool(auth.api_token), bool(auth.admin_token)))
