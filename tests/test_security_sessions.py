"""Security probes of the signalling layer (issue 22): session isolation, offer checks, pending-session limits.

Probes come from real aiohttp requests; a flood comes from other loopback addresses (127.0.0.2...) than the
real caller (127.0.0.1), so that per-address limits can be told apart.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Callable

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import make_mocked_request

from rtc_server.admin_api import ADMIN_HEADER, get_admin_status
from rtc_server.client_limits import RateWindow
from rtc_server.config import RtcSettings
from rtc_server.signalling import ApiError, is_loopback, list_sessions
from tests.rtc_client import RATE, Call

ADMIN_TOKEN = "admin-s3cret"
SDP_TYPE = {"Content-Type": "application/sdp"}
TRICKLE_TYPE = {"Content-Type": "application/trickle-ice-sdpfrag"}


def _tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


async def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _request(
    method: str, url: str, source: str = "127.0.0.1", **kwargs
) -> tuple[int, dict, dict[str, str]]:
    """One request from the loopback address `source`; (status, JSON body or {}, headers)."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.request(method, url, **kwargs) as resp:
            body = await resp.json() if resp.content_type == "application/json" else {}
            return resp.status, body, dict(resp.headers)


async def _real_offer(url: str) -> str:
    """An offer from a real aiortc peer; it is closed at once, so an answer to it never connects."""
    caller = Call(url, _tone(0.1))
    try:
        return await caller._offer()
    finally:
        await caller.close()


# ---- 1. isolation: the session URL is the capability; the list is for the admin --------------------


@pytest.mark.parametrize(
    ("remote", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.9.8.7", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("203.0.113.9", False),
        ("::ffff:10.0.0.1", False),
        ("fe80::1", False),
        ("", False),
        (None, False),
        ("localhost", False),
    ],
)
def test_loopback_check(remote: str | None, loopback: bool) -> None:
    assert is_loopback(remote) is loopback


async def test_without_admin_token_the_list_and_admin_are_loopback_only(start_test_server) -> None:
    server = await start_test_server()
    app = server.runner.app
    for handler, path in ((list_sessions, "/api/sessions"), (get_admin_status, "/api/admin/status")):
        for remote in ("203.0.113.9", "10.1.2.3", "2001:db8::5"):
            request = make_mocked_request("GET", path, app=app).clone(remote=remote)
            with pytest.raises(ApiError) as refused:
                await handler(request)
            assert refused.value.status == 403 and '"admin_only"' in refused.value.text, (path, remote)
        local = make_mocked_request("GET", path, app=app).clone(remote="127.0.0.1")
        assert (await handler(local)).status == 200
        status, body, _ = await _request("GET", server.url + path, source="127.0.0.2")
        assert status == 200, (path, body)


def _wrong_ids(real: str) -> list[str]:
    return [
        secrets.token_urlsafe(24),  # a fresh id of the right shape
        real[:-1],
        real + "A",
        real.swapcase(),
        real[1:] + real[0],
        "0" * len(real),
        "A" * 200,
    ]


async def test_sessions_are_private_to_their_url_and_the_admin(start_test_server) -> None:
    server = await start_test_server(auth={"admin_token": ADMIN_TOKEN})
    url = server.url
    json_call, whip_call = Call(url, _tone(20)), Call(url, _tone(20))
    try:
        await json_call.start_json("loopback")
        await whip_call.start_whip("loopback")
        ids = [json_call.session_id, whip_call.session_id]
        for session_id in ids:
            assert session_id is not None and len(session_id) >= 32
            assert re.fullmatch(r"[A-Za-z0-9_-]+", session_id) and not re.fullmatch(r"[0-9a-f]+", session_id)

        probes = 0
        # the list: only with the admin token
        for headers in ({}, {ADMIN_HEADER: "wrong"}, {ADMIN_HEADER: ADMIN_TOKEN + "x"}):
            status, body, _ = await _request("GET", f"{url}/api/sessions", headers=headers)
            assert status == 401 and body["error"]["code"] == "admin_unauthorized", body
            assert not any(i in str(body) for i in ids)
            probes += 1
        status, body, _ = await _request("GET", f"{url}/api/sessions", headers={ADMIN_HEADER: ADMIN_TOKEN})
        assert status == 200 and sorted(s["session_id"] for s in body["sessions"]) == sorted(ids)

        # wrong ids: every per-session route answers 404 and names no live session
        for wrong in _wrong_ids(json_call.session_id):
            for method, path, kwargs in (
                ("GET", f"/api/sessions/{wrong}", {}),
                ("DELETE", f"/api/sessions/{wrong}", {}),
                ("PATCH", f"/whip/{wrong}", {"data": "a=end-of-candidates", "headers": TRICKLE_TYPE}),
                ("DELETE", f"/whip/{wrong}", {}),
            ):
                status, body, _ = await _request(method, url + path, **kwargs)
                assert status == 404 and body["error"]["code"] in ("unknown_session", "not_found"), (
                    path,
                    body,
                )
                assert not any(i in str(body) for i in ids)
                probes += 1
        assert sorted(server.manager.sessions) == sorted(ids), "a probe hung up a caller"
        print(f"isolation probes: {probes}")

        # the holder of the URL needs no admin token; the admin may end any call
        status, body, _ = await _request("GET", url + json_call.location)
        assert status == 200 and body["session_id"] == json_call.session_id
        status, _, _ = await _request("DELETE", url + whip_call.location, headers={ADMIN_HEADER: ADMIN_TOKEN})
        assert status == 204
        assert await json_call.hang_up() == 200
    finally:
        await json_call.close()
        await whip_call.close()


# ---- 2. offers without DTLS fingerprint or ICE credentials ------------------------------------------


def _sections(sdp: str) -> list[list[str]]:
    """The session part and each media section, as lists of lines."""
    parts: list[list[str]] = [[]]
    for line in sdp.splitlines():
        if line.startswith("m="):
            parts.append([])
        parts[-1].append(line)
    return parts


def _join(parts: list[list[str]]) -> str:
    return "\r\n".join(line for part in parts for line in part) + "\r\n"


def _drop(prefix: str, section: int | None = None) -> Callable[[str], str]:
    def mutate(sdp: str) -> str:
        parts = _sections(sdp)
        for i, part in enumerate(parts):
            if section is None or i == section:
                part[:] = [line for line in part if not line.startswith(prefix)]
        return _join(parts)

    return mutate


def _sub(pattern: str, replacement: str) -> Callable[[str], str]:
    return lambda sdp: re.sub(pattern, replacement, sdp, flags=re.MULTILINE)


def _to_session_level(sdp: str) -> str:
    """Fingerprints and ICE credentials once at session level (as Firefox writes fingerprints)."""
    parts = _sections(sdp)
    moved = [line for line in parts[1] if line.startswith(("a=fingerprint:", "a=ice-ufrag:", "a=ice-pwd:"))]
    for part in parts[1:]:
        part[:] = [line for line in part if line not in moved]
    parts[0] += moved
    return _join(parts)


BAD_OFFERS: dict[str, Callable[[str], str]] = {
    "no fingerprint": _drop("a=fingerprint:"),
    "no fingerprint on the data section": _drop("a=fingerprint:", section=2),
    "md5 fingerprints": _sub(r"^a=fingerprint:sha-\d+", "a=fingerprint:md5"),
    "sha-1 fingerprints": _sub(r"^a=fingerprint:sha-\d+", "a=fingerprint:sha-1"),
    "fingerprint without value": _sub(r"^(a=fingerprint:sha-\d+) .*$", r"\1"),
    "fingerprint too short": _sub(r"^(a=fingerprint:sha-\d+) .*$", r"\1 AB:CD"),
    "fingerprint not hex": _sub(r"^(a=fingerprint:sha-\d+) ..", r"\1 ZZ"),
    "no ice-ufrag": _drop("a=ice-ufrag:"),
    "no ice-pwd": _drop("a=ice-pwd:"),
    "no ice-ufrag on the audio section": _drop("a=ice-ufrag:", section=1),
    "empty ice-pwd": _sub(r"^a=ice-pwd:.*$", "a=ice-pwd:"),
}


async def test_offers_without_fingerprint_or_ice_credentials_are_refused(start_test_server) -> None:
    server = await start_test_server()
    url = server.url
    offer = await _real_offer(url)
    probes = 0
    for name, mutate in BAD_OFFERS.items():
        bad = mutate(offer)
        assert bad != offer, name
        for method_path, kwargs in (
            ("/api/sessions", {"json": {"sdp": bad, "type": "offer", "mode": "loopback"}}),
            ("/whip?mode=loopback", {"data": bad, "headers": SDP_TYPE}),
        ):
            status, body, _ = await _request("POST", url + method_path, **kwargs)
            assert status == 400 and body["error"]["code"] == "bad_sdp", (name, method_path, status, body)
            assert server.manager.sessions == {}, name
            probes += 1
    print(f"offer probes: {probes}")
    assert server.manager.admission.busy == {} and server.manager.admission.waiting == []
    # fingerprints and ICE credentials at session level are fine
    status, body, headers = await _request(
        "POST", f"{url}/whip?mode=loopback", data=_to_session_level(offer), headers=SDP_TYPE
    )
    assert status == 201, body
    status, _, _ = await _request("DELETE", url + headers["Location"])
    assert status == 204 and server.manager.sessions == {}


# ---- 3. callers who never connect take no slot --------------------------------------------------------

# (name, config sections, flood source addresses, token, statuses expected for 20 POSTs, caller waits)
FLOODS = [
    (
        "pending per address",
        {"rtc": {"max_pending_per_client": 4}},
        ["127.0.0.2"],
        None,
        [201] * 4 + [429] * 16,
    ),
    (
        "offers per minute",
        {"rtc": {"offers_per_minute": 6, "max_pending_per_client": 100}},
        ["127.0.0.2"],
        None,
        [201] * 6 + [429] * 14,
    ),
    (
        "pending per token",
        {"rtc": {"max_pending_per_client": 4}, "auth": {"api_token": "tok"}},
        ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"],
        "tok",
        [201] * 4 + [429] * 16,
    ),
    (
        "pending overall",  # capacity 4 + queue 2 < 8: at most 8 pending
        {"rtc": {"max_pending_per_client": 100}, "queue": {"max_length": 2}},
        ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"],
        None,
        [201] * 8 + [503] * 12,
    ),
]


@pytest.mark.parametrize(
    ("name", "sections", "sources", "token", "expected"), FLOODS, ids=[f[0] for f in FLOODS]
)
async def test_callers_that_never_connect_hold_no_slot(
    start_test_server, name: str, sections: dict, sources: list[str], token: str | None, expected: list[int]
) -> None:
    sections = {key: dict(value) for key, value in sections.items()}
    sections.setdefault("rtc", {})["connect_timeout_s"] = 3.0
    server = await start_test_server(**sections)
    url = server.url
    offer = await _real_offer(url)
    auth = {"Authorization": f"Bearer {token}"} if token else {}

    async def post(i: int) -> tuple[int, dict, dict[str, str]]:
        return await _request(
            "POST",
            f"{url}/whip?mode=loopback",
            source=sources[i % len(sources)],
            data=offer,
            headers={**SDP_TYPE, **auth},
        )

    started = time.monotonic()
    answers = [await post(i) for i in range(20)]
    took = time.monotonic() - started
    statuses = [status for status, _, _ in answers]
    assert statuses == expected, (name, statuses)
    for status, body, headers in answers:
        if status == 429:
            assert body["error"]["code"] == "too_many_requests" and int(headers["Retry-After"]) >= 1
        elif status == 503:
            assert int(headers["Retry-After"]) >= 1
    print(f"{name}: 20 offers in {took:.2f} s -> {statuses.count(201)} pending, then {statuses[-1]}")
    # nobody who has not connected holds a worker slot or a queue place
    assert server.manager.admission.busy == {} and server.manager.admission.waiting == []
    assert all(s.phase == "connecting" for s in server.manager.sessions.values())

    if statuses[-1] == 503 or token:  # the bound is shared with the flood: wait for the connect timeout
        await _wait_for(lambda: not server.manager.sessions, 3.0 + 3.0, "the pending sessions to expire")
    caller = Call(url, _tone(20), token=token)
    try:
        await caller.start_whip("loopback")
        await caller.wait_connected()
        await caller.wait_event("session", phase="active")
        assert list(server.manager.admission.busy) == [caller.session_id]
        assert await caller.hang_up() == 204
    finally:
        await caller.close()
    await _wait_for(lambda: caller.session_id not in server.manager.sessions, 5, "the call to end")
    assert server.manager.admission.busy == {}


async def test_queue_is_entered_on_connect_and_a_full_queue_ends_the_call(start_test_server) -> None:
    server = await start_test_server(workers={"cpu_capacity": 1}, queue={"max_length": 0})
    first, second = Call(server.url, _tone(20)), Call(server.url, _tone(20))
    try:
        # both are answered while the slot is free; neither holds it before connecting
        answers = [await first.post_json("loopback"), await second.post_json("loopback")]
        assert server.manager.admission.busy == {}
        await first.apply_answer(answers[0]["sdp"])
        await first.wait_event("session", phase="active")
        await second.apply_answer(answers[1]["sdp"])
        error = await second.wait_event("error", code="queue_full")
        assert error["message"]
        await _wait_for(
            lambda: second.session_id not in server.manager.sessions, 5, "the refused call to end"
        )
        assert list(server.manager.admission.busy) == [first.session_id]
        assert await first.hang_up() == 200
    finally:
        await first.close()
        await second.close()


def test_connect_timeout_default_is_short() -> None:
    settings = RtcSettings()
    assert settings.connect_timeout_s == 10.0
    assert settings.max_pending_per_client == 4 and settings.offers_per_minute == 30


def test_offer_rate_window_slides() -> None:
    now = [100.0]
    window = RateWindow(limit=2, window_s=60.0, clock=lambda: now[0], max_keys=1)
    assert window.acquire("a") == 0 and window.acquire("b") == 0
    now[0] += 10
    assert window.acquire("a") == 0
    assert window.acquire("a") == pytest.approx(50.0)  # the first of a's two offers leaves the window then
    now[0] += 50
    assert window.acquire("a") == 0
    assert "b" not in window._events  # over max_keys: keys with nothing left in the window are forgotten


async def test_only_a_voices_uploader_or_the_admin_may_rename_or_delete_it(
    start_test_server, tmp_path
) -> None:
    """Voices are listed to every API user; renaming or deleting one takes the owner token its first upload
    returned (X-Voice-Token), or the admin token. Loopback is no admin here: an admin token is set."""
    from MiniCPMO45.audio.wav import pcm16_wav
    from tests.rtc_client import speech_signal

    server = await start_test_server(auth={"admin_token": "the-admin"}, voices={"dir": str(tmp_path / "v")})
    url = f"{server.url}/api/voices"
    wav = pcm16_wav(speech_signal(tmp_path / "speech.wav")[: 16000 * 3], 16000)
    json_type = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}?name=Mine", data=wav, headers={"Content-Type": "audio/wav"}) as resp:
            created = await resp.json()
        voice_id, token = created["voice_id"], created["owner_token"]
        assert resp.status == 201 and token
        for method in ("PATCH", "DELETE"):
            for headers in ({}, {"X-Voice-Token": "not-it"}, {"X-Voice-Token": token[:-1]}):
                async with http.request(
                    method, f"{url}/{voice_id}", data=b'{"name": "Theirs"}', headers={**json_type, **headers}
                ) as resp:
                    assert resp.status == 403, (method, headers, resp.status)
                    assert (await resp.json())["error"]["code"] == "not_voice_owner"
        owner = {**json_type, "X-Voice-Token": token}
        async with http.patch(f"{url}/{voice_id}", data=b'{"name": "Still mine"}', headers=owner) as resp:
            assert resp.status == 200 and (await resp.json())["name"] == "Still mine"
        admin = {**json_type, "X-Admin-Token": "the-admin"}
        async with http.patch(f"{url}/{voice_id}", data=b'{"name": "Admin says"}', headers=admin) as resp:
            assert resp.status == 200
        async with http.delete(f"{url}/{voice_id}", headers={"X-Voice-Token": token}) as resp:
            assert resp.status == 204
        async with http.get(url) as resp:
            assert (await resp.json())["voices"] == []
