"""`GET /api/info`: what the web UI needs to know about this server before a call."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from rtc_server.signalling import MANAGER_KEY

VERSION = "0.1.0"


class ServerInfo(BaseModel):
    """Body of `GET /api/info`."""

    model_config = ConfigDict(extra="forbid")

    version: str
    embedded_model: bool  # true: the tiny random-weight demo model; set `[model] path` for real weights
    modes: list[str]  # the modes this server can open now
    admin_token_required: bool


async def get_info(request: web.Request) -> web.Response:
    manager = request.app[MANAGER_KEY]
    info = ServerInfo(
        version=VERSION,
        embedded_model=not manager.config.model.path,
        modes=manager.known_modes(),
        admin_token_required=bool(manager.config.auth.admin_token),
    )
    return web.json_response(info.model_dump())
