"""Clean URLs for the UI pages (`/admin`, `/docs`, ...); every other file is served by app.py's static route."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

PAGES = {
    "/call": "call.html",
    "/history": "history.html",
    "/settings": "settings.html",
    "/admin": "admin.html",
    "/docs": "docs.html",
}


def public_file(public: Path, name: str) -> Path | None:
    """The file under `public` that a URL path names; None if it is missing, outside `public`, or not a valid
    file name (a null byte, a name too long for the file system)."""
    if "\0" in name:
        return None
    try:
        path = (public / name).resolve()
        return path if path.is_relative_to(public) and path.is_file() else None
    except (OSError, ValueError):
        return None


def page_handler(public: Path, filename: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def serve(request: web.Request) -> web.StreamResponse:
        path = public / filename
        if not path.is_file():
            raise web.HTTPNotFound(text=f"{filename} is missing from {public}")
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    return serve


def add_page_routes(app: web.Application, public: Path) -> None:
    for url, filename in PAGES.items():
        app.router.add_get(url, page_handler(public, filename))
