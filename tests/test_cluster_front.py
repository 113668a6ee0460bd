"""The cluster front's own checks of what callers send, before it asks Ray anything: the same answers as a
single-host server (`rtc_server/signalling.py` reads the bodies for both). No Ray cluster is started: a front
whose registry was never reached must still refuse bad input with a 4xx, never a 500."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import server_test_config

JSON = {"Content-Type": "application/json"}
SDP = {"Content-Type": "application/sdp"}
BAD_INPUT = [
    ("/api/sessions", "[" * 100_000, JSON, "bad_json"),
    ("/api/sessions", '{"a":' * 100_000 + "1" + "}" * 100_000, JSON, "bad_json"),
    ("/api/sessions", "{not json", JSON, "bad_json"),
    ("/api/sessions", '{"sdp": 1}', JSON, "bad_request"),
    ("/api/sessions", "{}", SDP, "unsupported_media_type"),
    ("/whip", "v=0", SDP, "missing_mode"),
]


@pytest.mark.parametrize(("path", "body", "headers", "code"), BAD_INPUT)
async def test_the_front_refuses_bad_offers_as_a_single_host_server_does(
    path: str, body: str, headers: dict[str, str], code: str
) -> None:
    pytest.importorskip(
        "ray", reason="cluster mode needs requirements-cluster.txt (scripts/test.sh installs it)"
    )
    from cluster.front import ClusterFront, make_front_app

    config = server_test_config()
    unreachable: Any = None  # the registry: never asked, the body is refused first
    runner = web.AppRunner(make_front_app(config, ClusterFront(config, unreachable)))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{port}{path}", data=body, headers=headers) as resp:
                status, answer = resp.status, await resp.json()
    finally:
        await runner.cleanup()
    assert 400 <= status < 500 and answer["error"]["code"] == code, (status, answer)
