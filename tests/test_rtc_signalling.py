"""Bad signalling inputs get clear 4xx JSON errors, and the server keeps serving good calls."""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
import pytest

from tests.rtc_client import RATE, Call


async def _request(method: str, url: str, **kwargs) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, url, **kwargs) as resp:
            assert resp.content_type == "application/json", f"{method} {url}: {resp.content_type}"
            return resp.status, await resp.json()


def _tone(seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


async def test_bad_inputs_get_json_errors_and_a_good_call_still_works(start_test_server) -> None:
    server = await start_test_server()
    url = server.url
    json_h = {"Content-Type": "application/json"}
    cases = [
        # (method, path, kwargs, expected status, expected code)
        ("POST", "/api/sessions", {"data": "{not json", "headers": json_h}, 400, "bad_json"),
        ("POST", "/api/sessions", {"data": "[1, 2]", "headers": json_h}, 400, "bad_request"),
        ("POST", "/api/sessions", {"json": {"type": "offer", "mode": "loopback"}}, 400, "bad_request"),
        ("POST", "/api/sessions", {"data": "sdp=1", "headers": {"Content-Type": "text/plain"}}, 415, None),
        (
            "POST",
            "/api/sessions",
            {"json": {"sdp": "v=0\r\nthis is not sdp\r\n", "type": "offer", "mode": "loopback"}},
            400,
            "bad_sdp",
        ),
        (
            "POST",
            "/api/sessions",
            {"json": {"sdp": "x", "type": "offer", "mode": "karaoke"}},
            400,
            "unknown_mode",
        ),
        ("POST", "/api/sessions", {"data": b"x" * (10 << 20), "headers": json_h}, 413, "too_large"),
        (
            "POST",
            "/whip?mode=loopback",
            {"data": "garbage", "headers": {"Content-Type": "application/sdp"}},
            400,
            "bad_sdp",
        ),
        (
            "POST",
            "/whip?mode=karaoke",
            {"data": "v=0", "headers": {"Content-Type": "application/sdp"}},
            400,
            "unknown_mode",
        ),
        (
            "POST",
            "/whip",
            {"data": "v=0", "headers": {"Content-Type": "application/sdp"}},
            400,
            "missing_mode",
        ),
        ("DELETE", "/api/sessions/0123456789abcdef", {}, 404, "unknown_session"),
        ("GET", "/api/sessions/nope", {}, 404, "unknown_session"),
        ("DELETE", "/whip/nope", {}, 404, "unknown_session"),
        (
            "PATCH",
            "/whip/nope",
            {"data": "a=end-of-candidates", "headers": {"Content-Type": "application/trickle-ice-sdpfrag"}},
            404,
            "unknown_session",
        ),
        ("GET", "/api/no-such-route", {}, 404, "not_found"),
    ]
    for method, path, kwargs, status, code in cases:
        got_status, body = await _request(method, url + path, **kwargs)
        assert got_status == status, f"{method} {path}: {got_status} {body}"
        assert set(body) == {"error"} and body["error"]["message"], body
        if code is not None:
            assert body["error"]["code"] == code, body
    assert server.manager.sessions == {}

    # A real call right after the bad ones works, including a trickled candidate over WHIP PATCH.
    call = Call(url, _tone(1.5))
    try:
        await call.start_whip("loopback")
        frag = (
            "a=mid:0\r\n"
            + "\r\n".join(
                line for line in call.pc.localDescription.sdp.splitlines() if line.startswith("a=candidate:")
            )
            + "\r\na=end-of-candidates\r\n"
        )
        async with aiohttp.ClientSession() as http:
            async with http.patch(
                url + call.location, data=frag, headers={"Content-Type": "application/trickle-ice-sdpfrag"}
            ) as resp:
                assert resp.status == 204, await resp.text()
            async with http.patch(
                url + call.location,
                data="a=mid:0\r\na=candidate:broken\r\n",
                headers={"Content-Type": "application/trickle-ice-sdpfrag"},
            ) as resp:
                assert resp.status == 400 and (await resp.json())["error"]["code"] == "bad_candidate"
        await call.wait_connected()
        await asyncio.sleep(1.5 + server.config.loopback.delay_s + 0.3)
        received = call.recorder.signal()
        assert np.sqrt(np.mean(received**2)) > 0.02, "no audio came back"
        assert await call.hang_up() == 204
    finally:
        await call.close()
    assert server.manager.sessions == {}


@pytest.mark.parametrize("token", ["s3cret"])
async def test_api_token_guards_signalling_but_not_pages(start_test_server, token: str) -> None:
    server = await start_test_server(auth={"api_token": token})
    url = server.url
    for method, path in [
        ("GET", "/api/sessions"),
        ("POST", "/api/sessions"),
        ("POST", "/whip?mode=loopback"),
        ("GET", "/metrics"),
    ]:
        status, body = await _request(method, url + path)
        assert status == 401 and body["error"]["code"] == "unauthorized", (path, status, body)
        status, body = await _request(method, url + path, headers={"Authorization": "Bearer wrong"})
        assert status == 401, path
    status, body = await _request("GET", url + "/api/sessions", headers={"Authorization": f"Bearer {token}"})
    assert status == 200 and body == {"sessions": []}
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/call.html") as resp:
            assert resp.status == 200
        async with http.get(url + "/api-docs.html") as resp:  # a page whose name starts like a route
            assert resp.status == 404 and resp.content_type != "application/json"
    call = Call(url, _tone(0.5), token=token)
    try:
        await call.start_json("loopback")
        await call.wait_connected()
        assert await call.hang_up() == 200
    finally:
        await call.close()
