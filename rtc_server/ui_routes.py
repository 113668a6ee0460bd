"""The web UI's routes (pages, /api/info, /api/admin/*, /api/openapi.json), registered by app.py in one call."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from rtc_server.admin_api import add_admin_routes
from rtc_server.info_api import get_info
from rtc_server.openapi import get_openapi
from rtc_server.pages import add_page_routes


def add_ui_routes(app: web.Application, public: Path) -> None:
    """Call before the static catch-all route."""
    app.router.add_get("/api/info", get_info)
    app.router.add_get("/api/openapi.json", get_openapi)
    add_admin_routes(app)
    add_page_routes(app, public)
