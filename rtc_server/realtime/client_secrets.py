"""`POST /v1/realtime/client_secrets`: short-lived keys (`ek_...`) for browsers.

A server that holds the API token mints a key for a browser, which then starts its WebRTC call
(`POST /v1/realtime/calls`) with `Authorization: Bearer ek_...` instead of the real token. A key is good for
that one route until it expires (`expires_after.seconds`, 10..7200, default 600) and carries an optional
session configuration that the call starts with (the call's own `session` part is applied over it).
"""

from __future__ import annotations

import hmac
import json
import secrets
import time
from dataclasses import dataclass

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rtc_server.realtime import models as rm
from rtc_server.realtime.session_map import Settings, apply_update
from rtc_server.signalling import ApiError, validation_problems
from rtc_server.voice_ids import voice_exists

DEFAULT_TTL_S = 600
MAX_KEYS = 10_000  # the oldest are forgotten beyond this
EPHEMERAL_ROUTES = ("/v1/realtime/calls",)


class ExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    anchor: str = Field("created_at", pattern="^created_at$")
    seconds: int = Field(DEFAULT_TTL_S, ge=10, le=7200)


class SecretRequest(BaseModel):
    """Body of `POST /v1/realtime/client_secrets` (all optional)."""

    model_config = ConfigDict(extra="forbid")
    session: rm.SessionConfig | None = None
    expires_after: ExpiresAfter | None = None


@dataclass
class _Key:
    expires_at: float  # time.time()
    settings: Settings


class ClientSecrets:
    def __init__(self) -> None:
        self.keys: dict[str, _Key] = {}

    def mint(self, settings: Settings, ttl_s: int) -> tuple[str, int]:
        now = time.time()
        self.keys = {k: v for k, v in self.keys.items() if v.expires_at > now}
        while len(self.keys) >= MAX_KEYS:
            self.keys.pop(next(iter(self.keys)))
        value = "ek_" + secrets.token_urlsafe(24)
        expires_at = int(now + ttl_s)
        self.keys[value] = _Key(expires_at, settings)
        return value, expires_at

    def settings_for(self, authorization: str) -> Settings | None:
        """The key's session settings when `authorization` is `Bearer <a live key>`, else None."""
        value = authorization.removeprefix("Bearer ")
        for key, entry in self.keys.items():
            if hmac.compare_digest(key.encode(), value.encode()):
                return entry.settings if entry.expires_at > time.time() else None
        return None


SECRETS_KEY = web.AppKey("realtime_client_secrets", ClientSecrets)


def ephemeral_allowed(request: web.Request) -> bool:
    """Whether the request may use a client secret instead of the API token (for the auth middleware)."""
    store = request.app.get(SECRETS_KEY)
    if store is None or request.path not in EPHEMERAL_ROUTES or request.method != "POST":
        return False
    return store.settings_for(request.headers.get("Authorization", "")) is not None


async def create_secret(request: web.Request) -> web.Response:
    if request.content_type != "application/json":
        raise ApiError(
            415, "unsupported_media_type", f"expected application/json, got {request.content_type}"
        )
    try:
        raw = await request.read()
        body = SecretRequest.model_validate(json.loads(raw or b"{}"))
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, ValidationError):
            raise ApiError(400, "bad_request", validation_problems(exc)) from None
        raise ApiError(400, "bad_json", f"the body is not JSON: {exc}") from None
    settings = Settings()
    if body.session is not None:
        settings, problems = apply_update(
            settings, body.session, lambda voice: voice_exists(request.app, voice)
        )
        if problems:
            raise ApiError(400, problems[0].code, f"{problems[0].param}: {problems[0].message}")
    ttl = (body.expires_after or ExpiresAfter()).seconds
    value, expires_at = request.app[SECRETS_KEY].mint(settings, ttl)
    session = settings.describe("", False).model_dump()
    return web.json_response(
        rm.ClientSecretAnswer(value=value, expires_at=expires_at, session=session).model_dump()
    )


def add_secret_routes(app: web.Application) -> None:
    app[SECRETS_KEY] = ClientSecrets()
    app.router.add_post("/v1/realtime/client_secrets", create_secret)
