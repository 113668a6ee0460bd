"""The UI's server routes: /api/info, /api/admin/status with its token, the OpenAPI document, page URLs."""

from __future__ import annotations

import copy
import logging

import aiohttp
import pytest
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

from rtc_server.admin_api import ADMIN_HEADER, AdminStatus
from rtc_server.info_api import ServerInfo
from rtc_server.metrics import percentile
from rtc_server.openapi import CLIENT_MESSAGES, SERVER_EVENTS, build_openapi

API_TOKEN = "api-secret"
ADMIN_TOKEN = "admin-secret"
BEARER = {"Authorization": f"Bearer {API_TOKEN}"}


def registered_routes(app) -> set[tuple[str, str]]:  # noqa: ANN001 (aiohttp Application)
    return {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}


def documented_routes(doc: dict) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in doc["paths"].items() for method in item}


async def test_openapi_is_valid_31_and_lists_every_route(start_test_server) -> None:
    server = await start_test_server(auth={"api_token": API_TOKEN, "admin_token": ADMIN_TOKEN})
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/api/openapi.json", headers=BEARER) as resp:
            assert resp.status == 200
            doc = await resp.json()
    assert doc["openapi"].startswith("3.1")
    validate(doc)  # raises on any violation of the OpenAPI 3.1 schema
    app = server.runner.app
    assert documented_routes(doc) == registered_routes(app)
    schemas = doc["components"]["schemas"]
    events = doc["x-data-channel-events"]
    assert events["server_to_client"] == [m.__name__ for m in SERVER_EVENTS]
    assert events["client_to_server"] == [m.__name__ for m in CLIENT_MESSAGES]
    for name in events["server_to_client"] + events["client_to_server"]:
        assert schemas[name]["properties"]["type"], name
    # Every request/response model comes from pydantic: the SessionRequest schema matches the model's own.
    request = doc["paths"]["/api/sessions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert request == {"$ref": "#/components/schemas/SessionRequest"}
    assert set(schemas["SessionRequest"]["required"]) == {"sdp", "type", "mode"}
    # This server requires both tokens, and the document says so.
    assert doc["paths"]["/api/sessions"]["post"]["security"] == [{"bearerAuth": []}]
    assert doc["paths"]["/api/admin/status"]["get"]["security"] == [{"adminToken": [], "bearerAuth": []}]
    assert doc["paths"]["/admin"]["get"]["security"] == [{}]


def test_openapi_validator_rejects_a_broken_document() -> None:
    doc = build_openapi()
    validate(doc)
    no_description = copy.deepcopy(doc)
    del no_description["paths"]["/api/sessions"]["post"]["responses"]["201"]["description"]
    with pytest.raises(OpenAPIValidationError):
        validate(no_description)
    dangling = copy.deepcopy(doc)
    del dangling["components"]["schemas"]["SessionAnswer"]
    with pytest.raises(Exception, match="SessionAnswer"):
        validate(dangling)


def test_route_comparison_notices_an_undocumented_route() -> None:
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.router.add_get("/api/info", handler)
    app.router.add_get("/api/undocumented", handler)
    missing = registered_routes(app) - documented_routes(build_openapi())
    assert missing == {("GET", "/api/undocumented")}


async def test_admin_status_needs_the_admin_token(start_test_server) -> None:
    server = await start_test_server(auth={"api_token": API_TOKEN, "admin_token": ADMIN_TOKEN})
    url = f"{server.url}/api/admin/status"
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers=BEARER) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "admin_unauthorized"
        async with http.get(url, headers={**BEARER, ADMIN_HEADER: "wrong"}) as resp:
            assert resp.status == 401
        async with http.get(url, headers={ADMIN_HEADER: ADMIN_TOKEN}) as resp:
            assert resp.status == 401  # the API bearer token is still needed
            assert (await resp.json())["error"]["code"] == "unauthorized"
        logging.getLogger("rtc_server.ui_test").warning("worker hiccup %d", 7)
        async with http.get(url, headers={**BEARER, ADMIN_HEADER: ADMIN_TOKEN}) as resp:
            assert resp.status == 200
            status = AdminStatus.model_validate(await resp.json())
        async with http.get(f"{server.url}/admin") as resp:
            assert resp.status == 200 and resp.content_type == "text/html"  # the page itself is public
    assert status.embedded_model is True
    assert [w.device for w in status.workers] == ["cpu"]
    worker = status.workers[0]
    assert worker.up and worker.pid is not None and worker.rss_mb is not None and worker.rss_mb > 1
    assert worker.capacity == status.capacity == server.config.workers.cpu_capacity
    assert status.sessions == [] and status.queue == []
    assert any(e.message == "worker hiccup 7" and e.level == "WARNING" for e in status.errors)


async def test_info_pages_and_open_admin_without_tokens(start_test_server) -> None:
    server = await start_test_server()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/api/info") as resp:
            info = ServerInfo.model_validate(await resp.json())
        async with http.get(f"{server.url}/api/admin/status") as resp:
            assert resp.status == 200  # no admin_token configured: open
        for path in (
            "/",
            "/call",
            "/settings",
            "/admin",
            "/docs",
            "/call.html",
            "/js/call.js",
            "/css/app.css",
        ):
            async with http.get(f"{server.url}{path}") as resp:
                assert resp.status == 200, path
        async with http.get(f"{server.url}/api/presets") as resp:
            assert resp.status == 200
            presets = (await resp.json())["presets"]
        # every model mode has presets in English and Chinese
        assert {(p["mode"], p["lang"]) for p in presets} == {
            (m, lang) for m in ("chat", "audio_duplex", "omni_duplex") for lang in ("en", "zh")
        }
    assert info.embedded_model is True and "loopback" in info.modes and info.admin_token_required is False


def test_percentile_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 95) == 5.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 95) == 95.0
    assert percentile(list(reversed(values)), 100) == 100.0
