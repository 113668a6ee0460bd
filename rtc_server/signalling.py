"""Signalling routes: the JSON API (`/api/sessions`) and the WHIP-style endpoint (`/whip`).

WHIP shape (RFC 9725) with one difference: the answer is sendrecv for audio, so the caller hears the
server's speech track on the same peer connection.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from rtc_server import events as ev
from rtc_server.admission import QueueFull
from rtc_server.client_limits import TooManyRequests, client_of
from rtc_server.events import quote
from rtc_server.manager import Call, ServerBusy, SessionManager, UnknownMode
from rtc_server.session import BadCandidate, BadOffer
from rtc_server.shards import ShardError
from rtc_server.voice_ids import voice_exists

MANAGER_KEY = web.AppKey("manager", SessionManager)
SDP_TYPE = "application/sdp"
TRICKLE_TYPE = "application/trickle-ice-sdpfrag"
ADMIN_HEADER = "X-Admin-Token"


class ApiError(web.HTTPException):
    """An HTTP error whose body is the JSON `ErrorResponse`."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        self.status_code = status
        super().__init__(
            text=ev.ErrorResponse(error=ev.ErrorBody(code=code, message=message)).model_dump_json(),
            content_type="application/json",
            headers=headers,
        )


def _manager(request: web.Request) -> SessionManager:
    return request.app[MANAGER_KEY]


def require_type(request: web.Request, expected: str) -> None:
    if request.content_type != expected:
        raise ApiError(
            415, "unsupported_media_type", f"expected Content-Type {expected}, got {request.content_type}"
        )


def is_loopback(remote: str | None) -> bool:
    """Whether a request came from this host: 127.0.0.0/8, ::1, or 127.x mapped into IPv6."""
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def require_admin(request: web.Request) -> None:
    """Admin routes: the `X-Admin-Token` header when `auth.admin_token` is set, else loopback clients only."""
    check_admin(request, _manager(request).config.auth.admin_token)


def check_admin(request: web.Request, expected: str) -> None:
    """`require_admin` with the admin token given (the cluster front has no session manager)."""
    if not expected:
        if not is_loopback(request.remote):
            raise ApiError(403, "admin_only", "without auth.admin_token only loopback clients may do this")
        return
    given = request.headers.get(ADMIN_HEADER, "")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(401, "admin_unauthorized", f"missing or wrong {ADMIN_HEADER} header")


def validation_problems(exc: ValidationError) -> str:
    """A pydantic error as one line: `field.path: message; ...`."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())


async def read_text(request: web.Request) -> str:
    try:
        return (await request.read()).decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "bad_encoding", "the body is not UTF-8") from None


async def _create(
    request: web.Request,
    sdp: str,
    mode: str,
    system_prompt: str | None,
    voice: str | None = None,
    options: dict[str, Any] | None = None,
    realtime: dict[str, Any] | None = None,
) -> Call:
    notice = None
    if voice is not None and not voice_exists(request.app, voice):
        # a voice deleted since the caller chose it must not block the call: the default voice speaks
        notice = ("unknown_voice", f"no voice {quote(voice)} on this server; the default voice speaks")
        voice = None
    manager = _manager(request)
    # the bearer token counts as a client only where tokens are in use (the auth middleware checked it)
    bearer = request.headers.get("Authorization") if manager.config.auth.api_token else None
    client = client_of(request.remote, bearer)
    try:
        return await manager.create(
            sdp, mode, system_prompt, voice, options, client=client, notice=notice, realtime=realtime
        )
    except UnknownMode as exc:
        raise ApiError(400, "unknown_mode", str(exc)) from None
    except BadOffer as exc:
        raise ApiError(400, "bad_sdp", str(exc)) from None
    except TooManyRequests as exc:
        raise ApiError(429, "too_many_requests", str(exc), headers={"Retry-After": exc.retry_after}) from None
    except ServerBusy as exc:
        retry_after = str(max(1, round(manager.config.rtc.connect_timeout_s)))
        raise ApiError(503, "server_busy", str(exc), headers={"Retry-After": retry_after}) from None
    except QueueFull as exc:
        raise ApiError(503, "queue_full", str(exc), headers={"Retry-After": "30"}) from None


def _session(request: web.Request) -> Call:
    manager = _manager(request)
    session_id = request.match_info["session_id"]
    session = manager.get(session_id)
    if session is None:
        ended = manager.how_ended(session_id)
        if ended is not None:  # 410: it was here, and this is how it ended
            raise ApiError(410, *ended)
        raise ApiError(404, "unknown_session", "no session at this URL")
    return session


# ---- JSON API ----


async def read_session_request(request: web.Request) -> tuple[ev.SessionRequest, dict[str, Any] | None]:
    """The checked body of `POST /api/sessions` (415, or 400 `bad_json` / `bad_request`) and its options as
    the modes take them (only those the caller set). The cluster front reads its offers with it too."""
    require_type(request, "application/json")
    try:
        body = json.loads(await read_text(request))
    except json.JSONDecodeError as exc:
        raise ApiError(400, "bad_json", f"the body is not JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "bad_json", "the body's JSON is nested too deeply") from None
    try:
        offer = ev.SessionRequest.model_validate(body)
    except ValidationError as exc:
        raise ApiError(400, "bad_request", validation_problems(exc)) from None
    options = offer.options.model_dump(exclude_defaults=True) if offer.options is not None else None
    return offer, options


def whip_query(request: web.Request) -> tuple[str, str | None, str | None]:
    """A WHIP offer's mode (required), system prompt and voice from its URL's query."""
    mode = request.query.get("mode", "")
    if not mode:
        raise ApiError(400, "missing_mode", "add ?mode=<mode> to the WHIP URL")
    return mode, request.query.get("system_prompt"), request.query.get("voice") or None


async def create_session(request: web.Request) -> web.Response:
    offer, options = await read_session_request(request)
    session = await _create(request, offer.sdp, offer.mode, offer.system_prompt, offer.voice, options)
    answer = ev.SessionAnswer(session_id=session.id, sdp=session.answer_sdp)
    return web.json_response(
        answer.model_dump(), status=201, headers={"Location": f"/api/sessions/{session.id}"}
    )


async def list_sessions(request: web.Request) -> web.Response:
    require_admin(request)  # session ids are capabilities: only the admin sees them all
    sessions = [s.info() for s in _manager(request).sessions.values()]
    return web.json_response(ev.SessionList(sessions=sessions).model_dump())


async def get_session(request: web.Request) -> web.Response:
    return web.json_response(_session(request).info().model_dump())


async def delete_session(request: web.Request) -> web.Response:
    session = _session(request)
    await session.close("hangup (DELETE)")
    return web.json_response({"session_id": session.id, "closed": True})


# ---- WHIP ----


async def whip_offer(request: web.Request) -> web.Response:
    require_type(request, SDP_TYPE)
    mode, system_prompt, voice = whip_query(request)
    session = await _create(request, await read_text(request), mode, system_prompt, voice)
    return web.Response(
        status=201,
        text=session.answer_sdp,
        content_type=SDP_TYPE,
        headers={"Location": f"/whip/{session.id}"},
    )


def parse_sdpfrag(text: str) -> tuple[list[tuple[str | None, str]], bool]:
    """Candidates (mid, candidate line) of a trickle-ice-sdpfrag body, and whether it ends candidates."""
    mid: str | None = None
    candidates: list[tuple[str | None, str]] = []
    end = False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("a=mid:"):
            mid = line[len("a=mid:") :]
        elif line.startswith("a=candidate:"):
            candidates.append((mid, line[len("a=") :]))
        elif line == "a=end-of-candidates":
            end = True
    return candidates, end


async def whip_patch(request: web.Request) -> web.Response:
    session = _session(request)
    require_type(request, TRICKLE_TYPE)
    candidates, end = parse_sdpfrag(await read_text(request))
    try:
        await session.add_candidates(candidates, end)
    except BadCandidate as exc:
        raise ApiError(400, "bad_candidate", str(exc)) from None
    except ShardError as exc:
        status = 400 if exc.code == "bad_candidate" else 404 if exc.code == "unknown_session" else 503
        raise ApiError(status, exc.code, str(exc)) from None
    return web.Response(status=204)


async def whip_delete(request: web.Request) -> web.Response:
    await _session(request).close("hangup (WHIP DELETE)")
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/sessions", create_session)
    app.router.add_get("/api/sessions", list_sessions)
    app.router.add_get("/api/sessions/{session_id}", get_session)
    app.router.add_delete("/api/sessions/{session_id}", delete_session)
    app.router.add_post("/whip", whip_offer)
    app.router.add_patch("/whip/{session_id}", whip_patch)
    app.router.add_delete("/whip/{session_id}", whip_delete)
