"""HTTP hardening (issue 22): voice uploads are checked before decoding, malformed requests get 4xx instead
of 500, pages carry security headers, cross-origin writes are refused, and CORS/OPTIONS work for WHIP."""

from __future__ import annotations

import json
import resource
import struct
import time

import aiohttp
import numpy as np
import pytest
from multidict import CIMultiDictProxy
from yarl import URL

from rtc_server import voices
from tests.conftest import REPO_ROOT

EVIL = "https://evil.example"
FRIEND = "https://app.example"
TOKEN = "http-security-token"
KSDATAFORMAT_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"


def wav(
    data: bytes,
    *,
    tag: int = 1,
    channels: int = 1,
    rate: int = 16000,
    bits: int = 16,
    block_align: int | None = None,
    extensible: bool = False,
    data_size: int | None = None,
    order: str = "fd",
) -> bytes:
    """A RIFF/WAVE file built field by field, so that the header can say anything."""
    align = channels * bits // 8 if block_align is None else block_align
    fields = struct.pack("<HHIIHH", 0xFFFE if extensible else tag, channels, rate, rate * align, align, bits)
    if extensible:
        fields += struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", tag) + KSDATAFORMAT_TAIL
    chunks = {
        "f": b"fmt " + struct.pack("<I", len(fields)) + fields,
        "d": b"data" + struct.pack("<I", len(data) if data_size is None else data_size) + data,
    }
    body = b"WAVE" + b"".join(chunks[c] for c in order)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = 0.3 * np.sin(2 * np.pi * 440 * t)
    return np.repeat(mono[:, None], channels, axis=1).reshape(-1)


def pcm(samples: np.ndarray, bits: int) -> bytes:
    if bits == 8:
        return (samples * 127 + 128).astype(np.uint8).tobytes()
    if bits == 24:
        return (samples * (2**23 - 1)).astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    return (samples * (2 ** (bits - 1) - 1)).astype(f"<i{bits // 8}").tobytes()


async def fetch(
    method: str, url: str | URL, **kwargs
) -> tuple[int, CIMultiDictProxy[str], str | None, bytes]:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, url, allow_redirects=False, **kwargs) as resp:
            return resp.status, resp.headers, resp.content_type, await resp.read()


def error_code(ctype: str | None, body: bytes) -> str | None:
    if ctype != "application/json":
        return None
    return json.loads(body).get("error", {}).get("code")


async def test_voice_headers_are_checked_before_decoding(start_test_server, tmp_path) -> None:
    server = await start_test_server(voices={"dir": str(tmp_path / "voices"), "max_duration_s": 4.0})
    url = f"{server.url}/api/voices"
    wav_h = {"Content-Type": "audio/wav"}

    # 8,044 bytes that say "1 Hz, 8-bit mono": 8,000 s of audio, 512 MB of float32 at 16 kHz
    bomb = wav(b"\x80" * 8000, rate=1, bits=8)
    assert len(bomb) == 8044
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    started = time.monotonic()
    status, _, ctype, body = await fetch("POST", url, data=bomb, headers=wav_h)
    elapsed = time.monotonic() - started
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert (status, error_code(ctype, body)) == (400, "bad_sample_rate"), body
    assert elapsed < 2.0 and grown_mb < 50, (elapsed, grown_mb)

    one_s = pcm(tone(1.5, 16000), 16)
    bad = [
        (wav(one_s, rate=1_000_000), "bad_sample_rate"),
        (wav(one_s, rate=4000), "bad_sample_rate"),
        (wav(one_s, channels=0, block_align=2), "bad_channels"),
        (wav(one_s, channels=64, block_align=2), "bad_channels"),
        (wav(one_s, bits=12, block_align=2), "unsupported_format"),
        (wav(one_s, tag=2), "unsupported_format"),  # MS ADPCM
        (wav(one_s, tag=3, bits=16), "unsupported_format"),  # 16-bit float
        (wav(one_s, block_align=3), "bad_audio"),
        (wav(one_s, order="d"), "bad_audio"),  # no fmt chunk
        (wav(one_s, order="f"), "bad_audio"),  # no data chunk
        (wav(one_s, order="df"), "bad_audio"),  # data before fmt
        (wav(b""), "bad_audio"),  # no samples
        (wav(pcm(tone(5, 8000), 8), rate=8000, bits=8), "too_long"),
        (wav(pcm(tone(0.5, 16000), 16)), "too_short"),
    ]
    for data, code in bad:
        status, _, ctype, body = await fetch("POST", url, data=data, headers=wav_h)
        assert (status, error_code(ctype, body)) == (400, code), (code, body)

    good = [
        wav(pcm(tone(2, 22050), 16), rate=22050),
        wav(pcm(tone(1.5, 8000), 8), rate=8000, bits=8),
        wav(pcm(tone(1.5, 48000, 2), 24), rate=48000, bits=24, channels=2, extensible=True),
        wav(tone(1.5, 44100).astype("<f4").tobytes(), tag=3, rate=44100, bits=32),
        wav(pcm(tone(2, 16000), 16), data_size=0xFFFFFFFF),  # a streaming writer's "size unknown"
    ]
    for data in good:
        status, _, ctype, body = await fetch("POST", url, data=data, headers=wav_h)
        assert status == 201, body
    form = aiohttp.FormData()
    form.add_field("file", good[0], filename="me.wav", content_type="audio/wav")
    status, _, _, body = await fetch("POST", url, data=form)
    assert status == 201, body


def test_decoding_stops_past_the_longest_voice(monkeypatch) -> None:
    """The decoder's output is bounded on its own, should a header ever pass the checks and still lie."""
    monkeypatch.setattr(voices, "check_wav_format", lambda fmt, max_s: None)
    long_wav = wav(pcm(tone(60, 8000), 8), rate=8000, bits=8)
    with pytest.raises(voices.VoiceError, match="longer than 4 s"):
        voices.decode_wav(long_wav, 4.0)
    assert voices.decode_wav(long_wav[: 44 + 8000 * 3], 4.0).size == 16000 * 3


async def test_malformed_requests_get_4xx_not_500(start_test_server, tmp_path) -> None:
    server = await start_test_server(voices={"dir": str(tmp_path / "voices")})
    base = server.url
    json_h = {"Content-Type": "application/json"}
    voice = wav(pcm(tone(2, 16000), 16))
    part = b'Content-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\n'

    def form(ctype: str, body: bytes) -> dict:
        return {"data": body, "headers": {"Content-Type": ctype}}

    api = [
        # (method, path, kwargs, status, code)
        ("POST", "/api/sessions", {"data": "[" * 100_000, "headers": json_h}, 400, "bad_json"),
        (
            "POST",
            "/api/sessions",
            {"data": '{"a":' * 100_000 + "1" + "}" * 100_000, "headers": json_h},
            400,
            "bad_json",
        ),
        (
            "POST",
            "/api/voices",
            form("multipart/form-data", b"--x\r\n" + part + voice + b"\r\n--x--\r\n"),
            400,
            "bad_request",
        ),
        (
            "POST",
            "/api/voices",
            form("multipart/form-data; boundary=abc", b"--xyz\r\n" + part + voice),
            400,
            "bad_request",
        ),
        (
            "POST",
            "/api/voices",
            form("multipart/form-data; boundary=abc", b"--abc\r\ngarbage" * 50),
            400,
            "bad_request",
        ),
        (
            "POST",
            "/api/voices",
            form("multipart/form-data; boundary=abc", b"--abcgarbage\r\n\r\n"),
            400,
            "bad_request",
        ),
        ("PUT", "/api/sessions", {}, 405, "method_not_allowed"),
        ("GET", "/api/%00", {}, 404, "not_found"),
        ("GET", "/api/sessions/%00", {}, 404, "unknown_session"),
    ]
    for method, path, kwargs, want_status, want_code in api:
        status, headers, ctype, body = await fetch(method, URL(base + path, encoded=True), **kwargs)
        assert (status, error_code(ctype, body)) == (want_status, want_code), (method, path, body[:300])
        if status == 405:
            assert "POST" in headers.get("Allow", ""), headers

    assert (REPO_ROOT / "config.toml").is_file()  # what the traversal probes try to reach
    pages = [
        "/%00",
        "/index.html%00.js",
        "/css/%00app.css",
        "/" + "a" * 300,
        "/js/" + "b" * 300 + ".js",
        "/..%2fconfig.toml",
        "/%2e%2e/config.toml",
        "/css/..%2f..%2fconfig.toml",
        "//etc/passwd",
        "/%2fetc%2fpasswd",
    ]
    for path in pages:
        status, _, _, body = await fetch("GET", URL(base + path, encoded=True))
        assert status == 404, (path, status, body[:200])
        assert b"[server]" not in body and b"root:" not in body


async def test_pages_and_api_answers_carry_security_headers(start_test_server) -> None:
    server = await start_test_server()
    pages = [
        "/",
        "/call",
        "/settings",
        "/admin",
        "/docs",
        "/call.html",
        "/js/call.js",
        "/css/app.css",
        "/favicon.svg",
        "/missing.html",
    ]
    for path in pages:
        status, headers, _, _ = await fetch("GET", server.url + path)
        assert status in (200, 404), (path, status)
        csp = headers.get("Content-Security-Policy", "")
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, (path, csp)
        assert "script-src 'self'" in csp and "object-src 'none'" in csp, (path, csp)
        assert headers.get("X-Content-Type-Options") == "nosniff", path
        assert headers.get("X-Frame-Options") == "DENY", path
        assert headers.get("Referrer-Policy") == "no-referrer", path
    for method, path in [
        ("GET", "/api/info"),
        ("GET", "/api/sessions"),
        ("GET", "/metrics"),
        ("GET", "/api/nope"),
        ("POST", "/whip"),
    ]:
        status, headers, _, _ = await fetch(method, server.url + path)
        assert status < 500 and headers.get("X-Content-Type-Options") == "nosniff", (path, status)


async def test_cross_origin_writes_are_refused(start_test_server, tmp_path) -> None:
    server = await start_test_server(
        server={"allowed_origins": [FRIEND]}, voices={"dir": str(tmp_path / "voices")}
    )
    voices = f"{server.url}/api/voices"

    def upload() -> aiohttp.FormData:
        form = aiohttp.FormData()
        form.add_field("file", wav(pcm(tone(2, 16000), 16)), filename="a.wav", content_type="audio/wav")
        return form

    port = URL(server.url).port
    refused = [
        ("POST", "/api/voices", EVIL),
        ("POST", "/api/voices", "null"),
        ("POST", "/api/voices", f"http://127.0.0.1:{port + 1}"),
        ("POST", "/api/voices", f"https://127.0.0.1:{port}"),  # the server is plain HTTP
        ("POST", "/api/sessions", EVIL),
        ("DELETE", "/api/sessions/0123456789abcdef", EVIL),
        ("POST", "/whip?mode=loopback", EVIL),
        ("PATCH", "/whip/0123456789abcdef", EVIL),
        ("DELETE", "/whip/0123456789abcdef", EVIL),
        ("PUT", "/api/voices", EVIL),
        ("POST", "/v1/chat/completions", EVIL),
    ]
    for method, path, origin in refused:
        kwargs = {"data": upload()} if path == "/api/voices" and method == "POST" else {}
        status, _, ctype, body = await fetch(method, server.url + path, headers={"Origin": origin}, **kwargs)
        assert (status, error_code(ctype, body)) == (403, "bad_origin"), (method, path, origin, body)
    status, _, _, body = await fetch("GET", voices)
    assert json.loads(body)["voices"] == [], "a refused upload was stored"

    # same origin (scheme + Host), a configured origin, and no Origin at all (curl, native clients) pass
    for origin in [f"http://127.0.0.1:{port}", FRIEND, None]:
        headers = {"Origin": origin} if origin else {}
        status, _, _, body = await fetch("POST", voices, data=upload(), headers=headers)
        assert status == 201, (origin, body)
    status, _, _, _ = await fetch("GET", voices, headers={"Origin": EVIL})
    assert status == 200  # reading is not a write (and the browser keeps the answer from evil.example)

    anyone = await start_test_server(
        server={"allowed_origins": ["*"]}, voices={"dir": str(tmp_path / "voices2")}
    )
    status, _, _, body = await fetch(
        "POST", f"{anyone.url}/api/voices", data=upload(), headers={"Origin": EVIL}
    )
    assert status == 201, body


async def test_cors_preflight_and_whip_options(start_test_server) -> None:
    ice = ["stun:stun.example.org:3478", "turn:turn.example.org:3478?transport=udp"]
    server = await start_test_server(
        server={"allowed_origins": [FRIEND]}, auth={"api_token": TOKEN}, rtc={"ice_servers": ice}
    )
    base = server.url
    preflight = {
        "Origin": FRIEND,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    cases = [
        # (path, request headers, the methods it allows, whether the origin is allowed)
        ("/whip", preflight, {"POST"}, True),
        ("/whip/0123456789abcdef", preflight, {"PATCH", "DELETE"}, True),
        ("/api/sessions", preflight, {"GET", "POST"}, True),
        ("/api/sessions/0123456789abcdef", preflight, {"GET", "DELETE"}, True),
        ("/api/voices", preflight, {"GET", "POST"}, True),
        ("/whip", {**preflight, "Origin": EVIL}, {"POST"}, False),
        ("/whip", {}, {"POST"}, False),  # a WHIP client asking for the ICE servers
    ]
    for path, headers, methods, allowed in cases:
        status, got, _, _ = await fetch("OPTIONS", base + path, headers=headers)
        assert status == 204, (path, status)
        assert methods <= set(got.get("Access-Control-Allow-Methods", "").replace(" ", "").split(",")), got
        assert got.get("Access-Control-Allow-Origin") == (headers["Origin"] if allowed else None), (path, got)
        assert (
            got.get("Access-Control-Allow-Headers")
            == "Authorization, Content-Type, If-Match, X-Admin-Token, X-Voice-Token"
        )
        assert got.get("Access-Control-Expose-Headers") == "Location, Link, ETag, Retry-After"
        assert int(got.get("Access-Control-Max-Age", "0")) > 0
        if path == "/whip":
            assert got.get("Accept-Post") == "application/sdp"
            assert got.getall("Link") == [f'<{url}>; rel="ice-server"' for url in ice], got
        else:
            assert "Link" not in got and "Accept-Post" not in got
    status, _, ctype, body = await fetch("OPTIONS", base + "/api/nope", headers=preflight)
    assert (status, error_code(ctype, body)) == (404, "not_found")

    # actual answers: an allowed origin can read them (errors included), another origin cannot
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for headers, want in [({**auth, "Origin": FRIEND}, 200), ({"Origin": FRIEND}, 401)]:
        status, got, _, _ = await fetch("GET", base + "/api/sessions", headers=headers)
        assert status == want
        assert got.get("Access-Control-Allow-Origin") == FRIEND and "Location" in got.get(
            "Access-Control-Expose-Headers", ""
        )
        assert "Origin" in got.get("Vary", "")
    status, got, _, _ = await fetch("GET", base + "/api/sessions", headers={**auth, "Origin": EVIL})
    assert status == 200 and "Access-Control-Allow-Origin" not in got
    status, got, ctype, body = await fetch("PUT", base + "/whip", headers=auth)
    assert (status, error_code(ctype, body)) == (405, "method_not_allowed") and "POST" in got.get("Allow", "")


@pytest.mark.parametrize("where", ["whip", "json"])
async def test_a_long_mode_name_is_refused_without_being_echoed(start_test_server, where: str) -> None:
    """An unknown mode of 5,000 characters (query string or JSON body) gets a short 400, not its own text back."""
    server = await start_test_server()
    mode = "m" * 5000
    async with aiohttp.ClientSession() as http:
        if where == "whip":
            request = http.post(
                f"{server.url}/whip?mode={mode}", data="v=0\r\n", headers={"Content-Type": "application/sdp"}
            )
        else:
            request = http.post(
                f"{server.url}/api/sessions", json={"sdp": "v=0", "type": "offer", "mode": mode}
            )
        async with request as resp:
            body = await resp.text()
    assert resp.status in (400, 414), body[:200]
    assert len(body) < 2000, f"the error echoed {len(body)} characters"
