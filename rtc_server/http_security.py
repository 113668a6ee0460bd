"""Browser-facing HTTP security: headers on every answer, the Origin check on API writes, and CORS.

A browser sends `Origin` with every cross-origin request and with same-origin writes, so a write whose
Origin is neither the server's own nor configured (`server.allowed_origins`) is a cross-site request forgery
attempt: it is refused with 403 before any handler runs. Requests without Origin (curl, native WHIP
clients) are not browsers acting for someone else and pass. Preflights (`OPTIONS`) are answered here,
without the bearer token, and allowed origins can read the API's answers (CORS).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from rtc_server.signalling import SDP_TYPE, ApiError

API_ROOTS = ("/api", "/whip", "/v1")  # these paths and everything below them
NON_PAGE_ROOTS = (*API_ROOTS, "/metrics")
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
ALLOW_HEADERS = "Authorization, Content-Type, If-Match, X-Admin-Token, X-Voice-Token"
EXPOSE_HEADERS = "Location, Link, ETag, Retry-After"
PREFLIGHT_MAX_AGE_S = 600
PAGE_CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "style-src-attr 'unsafe-inline'",  # a few style="" attributes in public/*.html
        "img-src 'self' data:",
        "media-src 'self' blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
API_CSP = "default-src 'none'; frame-ancestors 'none'"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]
PrepareHook = Callable[[web.Request, web.StreamResponse], Awaitable[None]]


def under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == root or path.startswith(root + "/") for root in roots)


class OriginPolicy:
    """Which browser origins may write to the API and read its answers."""

    def __init__(self, allowed_origins: list[str]) -> None:
        self.any = "*" in allowed_origins
        self.listed = {o.rstrip("/").lower() for o in allowed_origins if o != "*"}

    def allows(self, request: web.Request, origin: str) -> bool:
        origin = origin.lower()
        return self.any or origin in self.listed or origin in own_origins(request)


def own_origins(request: web.Request) -> set[str]:
    """The server's origin as this request reached it: its scheme (or a TLS proxy's) and its Host header."""
    host = request.host.lower()
    schemes = {request.scheme}
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    if forwarded in ("http", "https"):
        # a browser cannot add this header to a cross-origin request without a preflight that we refuse
        schemes.add(forwarded)
    return {f"{scheme}://{host}" for scheme in schemes}


def preflight(request: web.Request) -> web.Response:
    """204 for an OPTIONS request to an API route, listing the methods that route has."""
    error = request.match_info.http_exception
    if not isinstance(error, web.HTTPMethodNotAllowed):
        raise error or web.HTTPNotFound()
    methods = ", ".join(sorted(error.allowed_methods | {"OPTIONS"}))
    headers = {
        "Allow": methods,
        "Access-Control-Allow-Methods": methods,
        "Access-Control-Allow-Headers": ALLOW_HEADERS,
        "Access-Control-Expose-Headers": EXPOSE_HEADERS,
        "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
    }
    return web.Response(status=204, headers=headers)


def origin_guard(policy: OriginPolicy) -> Middleware:
    """Answers API preflights and refuses API writes from origins that are not allowed."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not under(request.path, API_ROOTS):
            return await handler(request)
        if request.method == "OPTIONS" and request.match_info.http_exception is not None:
            return preflight(request)
        origin = request.headers.get("Origin")
        if request.method in WRITE_METHODS and origin is not None and not policy.allows(request, origin):
            raise ApiError(
                403,
                "bad_origin",
                f"requests from {origin} are not allowed; list it in server.allowed_origins",
            )
        return await handler(request)

    return guard


def response_headers(policy: OriginPolicy, ice_servers: list[str]) -> PrepareHook:
    """Adds the security headers, and CORS headers for allowed origins, to every answer (errors included)."""

    async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
        headers = response.headers
        headers["X-Content-Type-Options"] = "nosniff"
        headers["X-Frame-Options"] = "DENY"
        headers["Referrer-Policy"] = "no-referrer"
        headers["Content-Security-Policy"] = API_CSP if under(request.path, NON_PAGE_ROOTS) else PAGE_CSP
        if not under(request.path, API_ROOTS):
            return
        vary = headers.get("Vary")
        headers["Vary"] = f"{vary}, Origin" if vary else "Origin"
        origin = request.headers.get("Origin")
        if origin is not None and policy.allows(request, origin):
            headers["Access-Control-Allow-Origin"] = origin
            headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        if request.path == "/whip" and request.method == "OPTIONS" and response.status == 204:
            headers["Accept-Post"] = SDP_TYPE
            for url in ice_servers:  # RFC 9725 section 4.6
                headers.add("Link", f'<{url}>; rel="ice-server"')

    return add_headers
