"""The Realtime API over WebRTC with an aiortc caller (`POST /v1/realtime/calls`, the `oai-events` channel):
a multipart offer with a session, session.created, typed turns with speech on the track, response.cancel,
output_audio_buffer events, truncate, bad events on the channel, hang-up; and the route's HTTP errors."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np

from rtc_server.session import CallSession
from tests.rtc_client import RATE, Call, PacedAudioTrack

WORKERS = {"heartbeat_timeout_s": 30.0}


@dataclass
class RealtimeCall(Call):
    """An aiortc caller with the Realtime API's `oai-events` channel instead of our `events` one."""

    def __post_init__(self) -> None:
        self.track = PacedAudioTrack(self.signal)
        self.pc.addTrack(self.track)
        self.channel = self.pc.createDataChannel("oai-events")
        self.channel.on("message", lambda data: self.events.append(json.loads(data)))
        self.pc.on("track", lambda track: self.recorder.start(track) if track.kind == "audio" else None)
        self.channel_open = asyncio.Event()
        self.channel.on("open", self.channel_open.set)

    async def post_realtime(self, session: dict[str, Any] | None) -> aiohttp.ClientResponse:
        sdp = await self._offer()
        form = aiohttp.FormData()
        form.add_field("sdp", sdp, content_type="application/sdp")
        if session is not None:
            form.add_field("session", json.dumps(session), content_type="application/json")
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{self.base_url}/v1/realtime/calls", data=form, headers=self.headers()
            ) as resp:
                body = await resp.text()
                assert resp.status == 201, (resp.status, body)
                assert resp.content_type == "application/sdp"
                self.location = resp.headers["Location"]
        self.session_id = self.location.rsplit("/", 1)[1]
        self.answer = body
        return resp

    async def next_event(self, kind: str, after: int, timeout: float = 60.0, **match: Any) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for event in self.events[after:]:
                if event.get("type") == kind and all(event.get(k) == v for k, v in match.items()):
                    return event
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no {kind}; got {[e['type'] for e in self.events[after:]][-30:]}")
            await asyncio.sleep(0.05)

    def say_text(self, text: str) -> None:
        self.send(
            {
                "type": "conversation.item.create",
                "item": {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": text}],
                },
            }
        )
        self.send({"type": "response.create"})


async def test_realtime_call_with_an_aiortc_caller(start_test_server: Any) -> None:
    server = await start_test_server(workers=WORKERS)
    call = RealtimeCall(server.url, np.zeros(RATE * 90, np.float32))
    try:
        session_config = {
            "type": "realtime",
            "instructions": "Be brief.",
            "max_output_tokens": 40,
            "audio": {"input": {"turn_detection": None}},
        }
        await call.post_realtime(session_config)
        assert call.location == f"/v1/realtime/calls/{call.session_id}"
        session = server.manager.get(call.session_id)
        assert isinstance(session, CallSession)
        assert session.options["max_new_tokens"] == 40 and session.options["fast_silence_ms"] == 0
        # the test option `force` (ModeOptions): the first reply runs to max_new_tokens, so a cancel meets it
        session.options["force"] = "speak"
        await call.apply_answer(call.answer)
        await call.wait_connected()
        created = await call.next_event("session.created", 0, 30)
        assert call.events[0]["type"] == "session.created"
        assert created["session"]["instructions"] == "Be brief."
        assert created["session"]["audio"]["input"]["turn_detection"] is None
        assert created["session"]["max_output_tokens"] == 40
        assert session.system_prompt == "Be brief."
        # bad events on the channel: errors, and the call goes on
        mark = len(call.events)
        call.send("{oops")
        assert (await call.next_event("error", mark))["error"]["code"] == "invalid_json"
        mark = len(call.events)
        call.send({"type": "input_audio_buffer.append", "audio": "AAAA", "event_id": "a1"})
        error = (await call.next_event("error", mark))["error"]
        assert error["code"] == "invalid_request" and error["event_id"] == "a1"
        # a typed turn, cancelled while it speaks
        await asyncio.wait_for(_until(lambda: session.mode_open), 180)
        mark = len(call.events)
        call.say_text("Tell me something long.")
        created = await call.next_event("response.created", mark, 120)
        rid = created["response"]["id"]
        await call.next_event("output_audio_buffer.started", mark, 60, response_id=rid)
        await call.next_event("response.output_audio_transcript.delta", mark, 60, response_id=rid)
        await asyncio.sleep(1.0)
        call.send({"type": "response.cancel"})
        done = await call.next_event("response.done", mark, 30)
        assert done["response"]["id"] == rid and done["response"]["status"] == "cancelled"
        await call.next_event("output_audio_buffer.cleared", mark, 10, response_id=rid)
        assert np.abs(call.recorder.signal()).max() > 0.001, "no speech came on the track"
        # a turn that runs to its end: output_audio_buffer.stopped once the track played it out
        mark = len(call.events)
        call.send({"type": "session.update", "session": {"type": "realtime", "max_output_tokens": 6}})
        await call.next_event("session.updated", mark, 10)
        await asyncio.wait_for(_until(lambda: session.mode_open), 60)
        mark = len(call.events)
        stale_before = session.speech.stale_pushes
        heard_before = session.speech.speech_frames_out
        call.say_text("Hi")
        done = await call.next_event("response.done", mark, 120)
        assert done["response"]["status"] == "completed"
        await call.next_event("output_audio_buffer.stopped", mark, 30, response_id=done["response"]["id"])
        # the re-opened mode counts turns from 0 again: its speech still plays (not dropped as stale)
        assert session.speech.stale_pushes == stale_before
        assert session.speech.speech_frames_out > heard_before
        item = done["response"]["output"][0]
        mark = len(call.events)
        call.send(
            {
                "type": "conversation.item.truncate",
                "item_id": item["id"],
                "content_index": 0,
                "audio_end_ms": 0,
            }
        )
        truncated = await call.next_event("conversation.item.truncated", mark, 10)
        assert truncated["item_id"] == item["id"]
        mark = len(call.events)
        call.send({"type": "output_audio_buffer.clear"})
        await call.next_event("output_audio_buffer.cleared", mark, 10)
        assert await call.hang_up() == 204
        await asyncio.wait_for(_until(lambda: server.manager.get(call.session_id) is None), 10)
        assert await call.hang_up() == 404
    finally:
        await call.close()


async def _until(predicate: Any) -> None:
    while not predicate():
        await asyncio.sleep(0.05)


async def test_realtime_calls_http_errors(start_test_server: Any) -> None:
    server = await start_test_server(workers=WORKERS, auth={"api_token": "secret-token"})
    url = f"{server.url}/v1/realtime/calls"
    good = {"Authorization": "Bearer secret-token"}
    offer = await RealtimeCall(server.url, np.zeros(RATE, np.float32))._offer()

    async def post(
        data: Any, headers: dict[str, str] | None = None, content_type: str | None = None
    ) -> tuple[int, dict]:
        headers = dict(good if headers is None else headers)
        if content_type:
            headers["Content-Type"] = content_type
        async with aiohttp.ClientSession() as http:
            async with http.post(url, data=data, headers=headers) as resp:
                return resp.status, await resp.json()

    def form(sdp: str | None, session: str | None) -> aiohttp.FormData:
        data = aiohttp.FormData()
        if sdp is not None:
            data.add_field("sdp", sdp, content_type="application/sdp")  # a part with a type: multipart
        if session is not None:
            data.add_field("session", session, content_type="application/json")
        return data

    status, body = await post(offer, headers={}, content_type="application/sdp")
    assert status == 401 and body["error"]["code"] == "unauthorized"
    status, body = await post("hello", content_type="text/plain")
    assert status == 415
    status, body = await post(form(None, "{}"))
    assert status == 400 and "sdp" in body["error"]["message"]
    status, body = await post(form(offer, "{nope"))
    assert status == 400 and body["error"]["code"] == "bad_json"
    status, body = await post(form(offer, json.dumps({"bogus": 1})))
    assert status == 400 and "bogus" in body["error"]["message"]
    status, body = await post(form(offer, json.dumps({"audio": {"output": {"voice": "nobody"}}})))
    assert status == 400 and body["error"]["code"] == "invalid_value"
    status, body = await post("v=0\r\nnot an offer\r\n", content_type="application/sdp")
    assert status == 400 and body["error"]["code"] == "bad_sdp"
    async with aiohttp.ClientSession() as http:
        async with http.delete(f"{url}/nothing-here", headers=good) as resp:
            assert resp.status == 404
        async with http.get(
            f"{server.url}/v1/realtime?model=x",
            headers={
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            },
        ) as resp:
            assert resp.status == 401  # the WebSocket upgrade needs the bearer token too
        async with http.ws_connect(
            f"{server.url.replace('http', 'ws')}/v1/realtime?model=x", headers=good
        ) as ws:
            first = await ws.receive_json(timeout=30)
            assert first["type"] == "session.created"


async def test_realtime_duplex_call_with_a_camera(start_test_server: Any) -> None:
    """The `duplex` turn detection extension: with a camera track the call runs omni_duplex; each stretch of
    speech the model chooses is one response; output_audio_buffer.clear cancels the current one."""
    from aiortc.mediastreams import VideoStreamTrack

    server = await start_test_server(workers=WORKERS)
    call = RealtimeCall(server.url, np.zeros(RATE * 90, np.float32))
    call.pc.addTrack(VideoStreamTrack())
    try:
        await call.post_realtime(
            {"type": "realtime", "audio": {"input": {"turn_detection": {"type": "duplex"}}}}
        )
        session = server.manager.get(call.session_id)
        assert isinstance(session, CallSession) and session.mode == "omni_duplex"
        session.options["force"] = "speak"  # test option: the tiny random model decides to speak every unit
        await call.apply_answer(call.answer)
        await call.wait_connected()
        created = await call.next_event("session.created", 0, 30)
        assert created["session"]["mode"] == "omni_duplex"
        assert created["session"]["audio"]["input"]["turn_detection"]["type"] == "duplex"
        mark = len(call.events)
        call.send({"type": "response.create"})
        assert (await call.next_event("error", mark, 10))["error"]["code"] == "invalid_request"
        first = await call.next_event("response.created", 0, 240)
        rid = first["response"]["id"]
        await call.next_event("output_audio_buffer.started", 0, 60, response_id=rid)
        mark = len(call.events)
        call.send({"type": "output_audio_buffer.clear"})
        done = await call.next_event("response.done", mark, 30)
        assert done["response"]["id"] == rid and done["response"]["status"] == "cancelled"
        await call.next_event("output_audio_buffer.cleared", mark, 10, response_id=rid)
        # the model speaks again: a new stretch, a new response
        second = await call.next_event("response.created", mark, 60)
        assert second["response"]["id"] != rid
    finally:
        await call.close()


async def test_client_secrets_open_only_the_call_route(start_test_server: Any) -> None:
    from rtc_server.realtime.client_secrets import SECRETS_KEY

    server = await start_test_server(workers=WORKERS, auth={"api_token": "secret-token"})
    good = {"Authorization": "Bearer secret-token"}
    mint = f"{server.url}/v1/realtime/client_secrets"
    body = {
        "session": {"type": "realtime", "instructions": "From the key."},
        "expires_after": {"seconds": 60},
    }
    async with aiohttp.ClientSession() as http:
        async with http.post(mint, json=body) as resp:
            assert resp.status == 401
        async with http.post(mint, json={"expires_after": {"seconds": 1}}, headers=good) as resp:
            assert resp.status == 400
        async with http.post(mint, json=body, headers=good) as resp:
            assert resp.status == 200
            secret = await resp.json()
        key = secret["value"]
        assert key.startswith("ek_") and secret["session"]["instructions"] == "From the key."
        async with http.get(f"{server.url}/api/voices", headers={"Authorization": f"Bearer {key}"}) as resp:
            assert resp.status == 401  # the key opens the call route only
    call = RealtimeCall(server.url, np.zeros(RATE * 5, np.float32), token=key)
    try:
        await call.post_realtime({"type": "realtime", "max_output_tokens": 9})
        session = server.manager.get(call.session_id)
        assert isinstance(session, CallSession)
        assert session.system_prompt == "From the key." and session.options["max_new_tokens"] == 9
    finally:
        await call.close()
    for entry in server.runner.app[SECRETS_KEY].keys.values():
        entry.expires_at = 0  # expired
    late = RealtimeCall(server.url, np.zeros(RATE, np.float32), token=key)
    try:
        try:
            await late.post_realtime(None)
        except AssertionError as exc:
            assert "401" in str(exc)
        else:
            raise AssertionError("an expired client secret opened a call")
    finally:
        await late.close()


async def test_realtime_call_on_a_media_shard(start_test_server: Any) -> None:
    """With media shards the call (and its `oai-events` channel) lives in a shard process."""
    server = await start_test_server(workers={**WORKERS, "media_procs": 1})
    call = RealtimeCall(server.url, np.zeros(RATE * 60, np.float32))
    try:
        await call.post_realtime({"type": "realtime", "instructions": "On a shard.", "max_output_tokens": 5})
        assert type(server.manager.get(call.session_id)).__name__ == "RemoteCall"
        await call.apply_answer(call.answer)
        await call.wait_connected()
        created = await call.next_event("session.created", 0, 60)
        assert (
            created["session"]["instructions"] == "On a shard."
            and created["session"]["max_output_tokens"] == 5
        )
        mark = len(call.events)
        call.send({"type": "nope"})
        assert (await call.next_event("error", mark, 10))["error"]["code"] == "unknown_event"
        mark = len(call.events)
        call.say_text("Hello")  # at once: held until the call has its worker slot and the mode is open
        done = await call.next_event("response.done", mark, 180)
        assert done["response"]["status"] == "completed"
        assert call.events.index(done) > mark
        assert await call.hang_up() == 204
    finally:
        await call.close()
