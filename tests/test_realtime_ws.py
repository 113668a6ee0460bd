"""The Realtime API over WebSocket (`GET /v1/realtime`), driven by the `openai` Python SDK's realtime client
(`client.realtime.connect`, `base_url` at the test server) against the embedded tiny model: a text turn, an
audio turn with server VAD, manual turns, response.cancel, conversation.item.truncate, and bad input."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from openai import AsyncOpenAI

from MiniCPMO45.audio.resample import resample
from rtc_server.realtime.websocket import SOCKETS_KEY
from tests.rtc_client import RATE, speech_signal

pytestmark = pytest.mark.asyncio(loop_scope="module")
WORKERS = {"heartbeat_timeout_s": 30.0}  # loading the model on a busy 2-core machine starves the worker's IPC
FIRST_EVENT_S = 180.0  # the first session waits for the worker to load the tiny model


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server():
    from rtc_server.app import start_server
    from tests.conftest import server_test_config

    running = await start_server(server_test_config(workers=WORKERS))
    yield running
    for client in CLIENTS:
        await client.close()
    CLIENTS.clear()
    await running.stop()
    assert not running.manager.admission.busy, "a Realtime session kept its slot"


@pytest.fixture(scope="module")
def speech_24k(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    pcm = speech_signal(tmp_path_factory.mktemp("speech") / "speech.wav", "Hello, can you tell me the time?")
    pcm = resample(pcm, RATE, 24000)
    pcm = np.concatenate([np.zeros(4800, np.float32), pcm, np.zeros(24000, np.float32)])
    return (np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes()


CLIENTS: list[AsyncOpenAI] = []  # closed with the server: an SDK client left open closes itself from __del__,
# in a task on whatever loop is running then (a later test would see it as a task it leaked)


def client_for(server: Any) -> AsyncOpenAI:
    client = AsyncOpenAI(base_url=server.url + "/v1", api_key="unused-without-auth.api_token")
    CLIENTS.append(client)
    return client


class Events:
    """Every event of one connection, as dicts, read in the background."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.seen: list[dict[str, Any]] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            raw = await self.conn.recv_bytes()
            self.seen.append(json.loads(raw))

    async def wait(self, kind: str, timeout: float = 60.0, after: int = 0, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.seen[after:]:
                if event["type"] == kind and all(event.get(k) == v for k, v in match.items()):
                    return event
            if self.task.done():
                self.task.result()
                raise AssertionError(f"connection ended before {kind}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {kind} in {timeout} s; got {[e['type'] for e in self.seen][-30:]}")
            await asyncio.sleep(0.05)

    async def error(self, after: int, timeout: float = 10.0) -> dict[str, Any]:
        return (await self.wait("error", timeout, after=after))["error"]

    def of(self, kind: str, where: Callable[[dict[str, Any]], bool] = lambda e: True) -> list[dict[str, Any]]:
        return [e for e in self.seen if e["type"] == kind and where(e)]

    def close(self) -> None:
        self.task.cancel()


async def open_session(conn: Any, **session: Any) -> Events:
    events = Events(conn)
    await events.wait("session.created", FIRST_EVENT_S)
    mark = len(events.seen)
    await conn.session.update(session={"type": "realtime", **session})
    await events.wait("session.updated", 30, after=mark)
    return events


async def say(conn: Any, pcm16: bytes, chunk_s: float = 0.5) -> None:
    step = int(24000 * 2 * chunk_s)
    for start in range(0, len(pcm16), step):
        await conn.input_audio_buffer.append(audio=base64.b64encode(pcm16[start : start + step]).decode())


async def text_turn(conn: Any, events: Events, text: str) -> tuple[int, dict[str, Any]]:
    mark = len(events.seen)
    await conn.conversation.item.create(
        item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    )
    await conn.response.create()
    created = await events.wait("response.created", FIRST_EVENT_S, after=mark)
    return mark, created


async def test_text_turn(server: Any) -> None:
    async with client_for(server).realtime.connect(model="minicpm-o-4.5") as conn:
        events = await open_session(conn, instructions="Answer in one word.", max_output_tokens=6)
        updated = events.of("session.updated")[-1]["session"]
        assert updated["instructions"] == "Answer in one word." and updated["max_output_tokens"] == 6
        assert updated["mode"] == "chat"
        mark, created = await text_turn(conn, events, "Hello there")
        rid = created["response"]["id"]
        done = await events.wait("response.done", 120, after=mark)
        response = done["response"]
        assert response["id"] == rid and response["status"] == "completed", response
        assert response["usage"]["output_tokens"] >= 1
        user = [e for e in events.of("conversation.item.added") if e["item"]["role"] == "user"]
        assert user[-1]["item"]["content"][0] == {
            "type": "input_text",
            "text": "Hello there",
            "transcript": None,
        }
        item_id = response["output"][0]["id"]
        assert events.of("response.output_item.added", lambda e: e["item"]["id"] == item_id)
        deltas = events.of("response.output_audio_transcript.delta", lambda e: e["response_id"] == rid)
        assert deltas, "no transcript deltas"
        (tdone,) = events.of("response.output_audio_transcript.done", lambda e: e["response_id"] == rid)
        assert tdone["transcript"] == "".join(d["delta"] for d in deltas)
        audio = b"".join(
            base64.b64decode(e["delta"])
            for e in events.of("response.output_audio.delta")
            if e["response_id"] == rid
        )
        assert len(audio) >= 2 * 2400, "less than 100 ms of speech came back"
        assert np.abs(np.frombuffer(audio, "<i2")).max() > 100, "the speech is silent"
        # the order of one response's events
        kinds = [
            e["type"]
            for e in events.seen[mark:]
            if e.get("response_id", e.get("response", {}).get("id")) == rid
        ]
        assert kinds[0] == "response.created" and kinds[-1] == "response.done"
        assert kinds.index("response.output_item.added") < kinds.index("response.output_audio.delta")
        events.close()


async def test_audio_turn_server_vad(server: Any, speech_24k: bytes) -> None:
    async with client_for(server).realtime.connect(model="minicpm-o-4.5") as conn:
        events = await open_session(
            conn,
            max_output_tokens=4,
            audio={
                "input": {
                    "turn_detection": {"type": "server_vad", "threshold": 0.5, "silence_duration_ms": 500}
                }
            },
        )
        td = events.of("session.updated")[-1]["session"]["audio"]["input"]["turn_detection"]
        assert td["type"] == "server_vad" and td["silence_duration_ms"] == 500
        mark = len(events.seen)
        await say(conn, speech_24k)
        started = await events.wait("input_audio_buffer.speech_started", 120, after=mark)
        stopped = await events.wait("input_audio_buffer.speech_stopped", 30, after=mark)
        committed = await events.wait("input_audio_buffer.committed", 30, after=mark)
        assert started["item_id"] == stopped["item_id"] == committed["item_id"]
        assert stopped["audio_end_ms"] >= started["audio_start_ms"]
        added = await events.wait("conversation.item.added", 30, after=mark)
        assert added["item"]["id"] == committed["item_id"] and added["item"]["role"] == "user"
        assert added["item"]["content"][0]["type"] == "input_audio"
        await events.wait("response.created", 60, after=mark)
        done = await events.wait("response.done", 120, after=mark)
        assert done["response"]["status"] in ("completed", "cancelled"), done
        events.close()


async def test_an_image_turn(server: Any) -> None:
    """conversation.item.create with an input_image (a data URL) and text: one user item, one response; a broken
    image is refused with an error and the session goes on."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(buf, "JPEG")
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    async with client_for(server).realtime.connect(model="minicpm-o-4.5") as conn:
        events = await open_session(conn, max_output_tokens=4)
        mark = len(events.seen)
        broken = {"type": "input_image", "image_url": "data:image/png;base64,bm90IGFuIGltYWdl"}
        await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [broken]})
        assert (await events.error(mark))["code"] == "invalid_image"
        mark = len(events.seen)
        content = [{"type": "input_image", "image_url": url}, {"type": "input_text", "text": "What is this?"}]
        await conn.conversation.item.create(item={"type": "message", "role": "user", "content": content})
        added = await events.wait("conversation.item.added", 30, after=mark)
        assert [c["type"] for c in added["item"]["content"]] == ["input_image", "input_text"]
        await conn.response.create()
        await events.wait("response.created", 60, after=mark)
        done = await events.wait("response.done", 120, after=mark)
        assert done["response"]["status"] == "completed", done
        events.close()


async def test_server_vad_turn_waits_for_response_create(server: Any, speech_24k: bytes) -> None:
    """create_response=false: the VAD commits the turn, and the response comes only on response.create."""
    async with client_for(server).realtime.connect(model="minicpm-o-4.5") as conn:
        td = {"type": "server_vad", "create_response": False, "interrupt_response": False}
        events = await open_session(conn, max_output_tokens=4, audio={"input": {"turn_detection": td}})
        assert not events.of("error"), events.of("error")
        shown = events.of("session.updated")[-1]["session"]["audio"]["input"]["turn_detection"]
        assert shown["create_response"] is False and shown["interrupt_response"] is False
        mark = len(events.seen)
        await say(conn, speech_24k)
        committed = await events.wait("input_audio_buffer.committed", 120, after=mark)
        await events.wait("conversation.item.added", 30, after=mark)
        await asyncio.sleep(1.5)
        assert not [e for e in events.seen[mark:] if e["type"] == "response.created"], "answered by itself"
        await conn.response.create()
        await events.wait("response.created", 60, after=mark)
        done = await events.wait("response.done", 120, after=mark)
        assert done["response"]["status"] in ("completed", "cancelled"), done
        assert committed["item_id"]
        events.close()


async def test_manual_turns(server: Any, speech_24k: bytes) -> None:
    async with client_for(server).realtime.connect(model="minicpm-o-4.5") as conn:
        events = await open_session(conn, max_output_tokens=4, audio={"input": {"turn_detection": None}})
        assert events.of("session.updated")[-1]["session"]["audio"]["input"]["turn_detection"] is None
        mark = len(events.seen)
        await conn.input_audio_buffer.commit()
        assert (await events.error(mark))["code"] == "input_audio_buffer_commit_empty"
        mark = len(events.seen)
        await say(conn, speech_24k)
        await asyncio.sleep(2.0)
        assert not events.of("input_audio_buffer.committed"), "manual turns committed by themselves"
        assert not events.of("response.created")
        await conn.input_audio_buffer.commit()
        committed = await events.wait("input_audio_buffer.committed", 30, after=mark)
        await events.wait(
            "conversation.item.added", 30, after=mark, item={**added_user_item(committed["item_id"])}
        )
        await conn.response.create()
        await events.wait("response.created", 60, after=mark)
        done = await events.wait("response.done", 120, after=mark)
        assert done["response"]["status"] == "completed"
        kinds = [e["type"] for e in events.seen if "delta" not in e["type"]]
        assert len(events.of("input_audio_buffer.committed")) == 1, kinds  # the turn is announced once
        mark = len(events.seen)
        await conn.response.create()
        assert (await events.error(mark))["code"] == "no_input"
        events.close()


def added_user_item(item_id: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "object": "realtime.item",
        "status": "completed",
        "role": "user",
        "content": [{"type": "input_audio", "text": None, "transcript": None}],
    }


async def cancel_a_reply(conn: Any, events: Events, text: str) -> dict[str, Any]:
    """response.cancel while a reply speaks; the random-weight model sometimes ends a reply within a few tokens,
    so a reply that completed before the cancel is followed by another try."""
    for _ in range(4):
        mark, created = await text_turn(conn, events, text)
        rid = created["response"]["id"]
        await events.wait("response.output_audio_transcript.delta", 120, after=mark)
        await conn.response.cancel(response_id=rid)
        done = await events.wait("response.done", 30, after=mark)
        assert done["response"]["id"] == rid
        if done["response"]["status"] == "cancelled":
            return done
        assert done["response"]["status"] == "completed"
        await asyncio.sleep(0.5)  # the late cancel is answered with response_cancel_not_active
    raise AssertionError("every reply ended before its cancel")


async def test_response_cancel(server: Any) -> None:
    async with client_for(server).realtime.connect(model="minicpm-o-4.5") as conn:
        events = await open_session(conn, max_output_tokens=200)
        mark = len(events.seen)
        await conn.response.cancel()
        assert (await events.error(mark))["code"] == "response_cancel_not_active"
        done = await cancel_a_reply(conn, events, "Tell me a long story.")
        rid = done["response"]["id"]
        assert done["response"]["status_details"]["reason"] == "client_cancelled"
        assert done["response"]["output"][0]["status"] == "incomplete"
        # no more audio or text of the cancelled response after its response.done
        await asyncio.sleep(1.5)
        at = events.seen.index(done)
        assert not [e for e in events.seen[at + 1 :] if e.get("response_id") == rid]
        # the conversation goes on
        done = await cancel_a_reply(conn, events, "Hi")
        assert done["response"]["status"] == "cancelled"
        events.close()


async def test_truncate(server: Any) -> None:
    async with client_for(server).realtime.connect(model="minicpm-o-4.5") as conn:
        events = await open_session(conn, max_output_tokens=12)
        mark, created = await text_turn(conn, events, "Say something")
        done = await events.wait("response.done", 120, after=mark)
        item = done["response"]["output"][0]
        rid = created["response"]["id"]
        samples = sum(
            len(base64.b64decode(e["delta"])) // 2
            for e in events.of("response.output_audio.delta")
            if e["response_id"] == rid
        )
        total_ms = samples * 1000 // 24000
        assert total_ms > 100
        full = item["content"][0]["transcript"]
        translator = server.runner.app[SOCKETS_KEY][events.seen[0]["session"]["id"]].conversation.translator
        await asyncio.sleep(1.0)  # a unit after the reply: its metrics say the session's KV length
        kv_before = translator.kv_tokens
        assert kv_before is not None
        mark = len(events.seen)
        await conn.conversation.item.truncate(
            item_id=item["id"], content_index=0, audio_end_ms=total_ms + 1000
        )
        assert (await events.error(mark))["param"] == "audio_end_ms"
        mark = len(events.seen)
        await conn.conversation.item.truncate(item_id="item_nope", content_index=0, audio_end_ms=0)
        assert (await events.error(mark))["code"] == "item_not_found"
        mark = len(events.seen)
        await conn.conversation.item.truncate(item_id=item["id"], content_index=0, audio_end_ms=total_ms // 2)
        truncated = await events.wait("conversation.item.truncated", 10, after=mark)
        assert truncated["item_id"] == item["id"] and truncated["audio_end_ms"] == total_ms // 2
        await conn.conversation.item.retrieve(item_id=item["id"])
        retrieved = await events.wait("conversation.item.retrieved", 10, after=mark)
        kept = retrieved["item"]["content"][0]["transcript"]
        assert full.startswith(kept) and len(kept) == round(len(full) * (total_ms // 2) / total_ms)
        # the model's context lost the unheard half of the reply too (heard-only context)
        await asyncio.wait_for(_until(lambda: (translator.kv_tokens or 0) < kv_before), 10)
        events.close()


async def test_bad_input(server: Any) -> None:
    async with client_for(server).realtime.connect(model="minicpm-o-4.5") as conn:
        # events sent before reading anything: session.created still comes first, then their answers in order
        await conn.send_raw("{not json")
        await conn.send_raw(
            json.dumps({"type": "session.update", "session": {"instructions": 5}, "event_id": "e1"})
        )
        events = Events(conn)
        await events.wait("session.created", FIRST_EVENT_S)
        assert events.seen[0]["type"] == "session.created"
        first = await events.error(0)
        assert first["code"] == "invalid_json" and first["type"] == "invalid_request_error"
        await events.wait("error", 10, after=2)
        wrong_type = events.of("error")[1]["error"]
        assert wrong_type["event_id"] == "e1" and wrong_type["param"] == "session.instructions"

        async def answer(raw: Any) -> dict[str, Any]:
            mark = len(events.seen)
            await conn.send_raw(raw if isinstance(raw, str) else json.dumps(raw))
            return await events.error(mark)

        assert (await answer([1, 2]))["code"] == "invalid_event"
        assert (await answer({"no": "type"}))["code"] == "missing_required_parameter"
        assert (await answer({"type": "session.explode"}))["code"] == "unknown_event"
        unknown_field = await answer({"type": "response.create", "bogus": 1})
        assert unknown_field["code"] == "unknown_parameter" and unknown_field["param"] == "bogus"
        bad_audio = await answer({"type": "input_audio_buffer.append", "audio": 5})
        assert bad_audio["param"] == "audio"
        assert (await answer({"type": "input_audio_buffer.append", "audio": "***"}))[
            "code"
        ] == "invalid_value"
        big = base64.b64encode(b"\0" * (16 * 24000 * 2)).decode()  # 16 s: over the 15 s bound
        assert (await answer({"type": "input_audio_buffer.append", "audio": big}))[
            "code"
        ] == "audio_too_large"
        voice = await answer(
            {"type": "session.update", "session": {"audio": {"output": {"voice": "nobody"}}}}
        )
        assert voice["param"] == "session.audio.output.voice" and "unknown voice" in voice["message"]
        assert events.of("session.updated")[-1]["session"]["audio"]["output"]["voice"] == "default"
        tools = await answer(
            {"type": "session.update", "session": {"tools": [{"type": "function", "name": "f"}]}}
        )
        assert tools["code"] == "unsupported_value"
        image = {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}  # not an image
        item = {
            "type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [image]},
        }
        assert (await answer(item))["code"] == "invalid_image"
        spoken = {"type": "input_audio", "audio": "AAAA"}
        item = {
            "type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [spoken]},
        }
        assert (await answer(item))["code"] == "unsupported_content"
        assert (await answer({"type": "output_audio_buffer.clear"}))["code"] == "invalid_request"
        # after all that the session still works
        mark = len(events.seen)
        await conn.session.update(session={"type": "realtime", "instructions": "still here"})
        updated = await events.wait("session.updated", 10, after=mark)
        assert updated["session"]["instructions"] == "still here"
        events.close()


async def test_websocket_route_errors(server: Any) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/v1/realtime?model=x") as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "websocket_required"


async def test_g711_codecs() -> None:  # async: the module runs on one event loop
    from rtc_server.realtime.g711 import alaw_decode, alaw_encode, ulaw_decode, ulaw_encode

    codes = np.arange(256, dtype=np.uint8)
    ulaw = ulaw_decode(codes)
    alaw = alaw_decode(codes)
    assert (ulaw[0x00], ulaw[0x80], ulaw[0xFF], ulaw[0x7F]) == (-32124, 32124, 0, 0)
    assert (alaw[0x55], alaw[0xD5], alaw[0x2A], alaw[0xAA]) == (-8, 8, -32256, 32256)
    assert np.array_equal(ulaw_encode(ulaw)[codes != 0x7F], codes[codes != 0x7F])  # 0x7F is -0: encodes as +0
    assert np.array_equal(alaw_encode(alaw), codes)
    ramp = np.linspace(-32768, 32767, 4001).astype(np.int16)
    for encode, decode in ((ulaw_encode, ulaw_decode), (alaw_encode, alaw_decode)):
        error = np.abs(decode(encode(ramp)).astype(np.int32) - ramp)
        assert (error <= np.maximum(np.abs(ramp.astype(np.int32)) // 16, 16) + 1100).all()  # within a step


async def test_g711_audio_turn(server: Any, speech_24k: bytes) -> None:
    from rtc_server.realtime.g711 import ulaw_decode, ulaw_encode

    pcm = np.frombuffer(speech_24k, "<i2").astype(np.float32) / 32768
    narrow = (resample(pcm, 24000, 8000) * 32767).astype(np.int16)
    mulaw = ulaw_encode(narrow).tobytes()
    async with client_for(server).realtime.connect(model="minicpm-o-4.5") as conn:
        fmt = {"type": "audio/pcmu"}
        events = await open_session(
            conn,
            max_output_tokens=4,
            audio={
                "input": {
                    "format": fmt,
                    "turn_detection": {"type": "server_vad", "silence_duration_ms": 500},
                },
                "output": {"format": fmt},
            },
        )
        audio = events.of("session.updated")[-1]["session"]["audio"]
        assert audio["input"]["format"] == audio["output"]["format"] == {"type": "audio/pcmu", "rate": 8000}
        mark = len(events.seen)
        await conn.send_raw(
            json.dumps(
                {
                    "type": "session.update",
                    "session": {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 8000}}}},
                }
            )
        )
        assert (await events.error(mark))["param"] == "session.audio.input.format.rate"
        mark = len(events.seen)
        for start in range(0, len(mulaw), 4000):
            await conn.input_audio_buffer.append(audio=base64.b64encode(mulaw[start : start + 4000]).decode())
        await events.wait("input_audio_buffer.committed", 120, after=mark)
        created = await events.wait("response.created", 60, after=mark)
        await events.wait("response.done", 120, after=mark)
        rid = created["response"]["id"]
        out = b"".join(
            base64.b64decode(e["delta"])
            for e in events.of("response.output_audio.delta")
            if e["response_id"] == rid
        )
        assert len(out) >= 800, "less than 100 ms of mu-law speech"
        assert np.abs(ulaw_decode(np.frombuffer(out, np.uint8))).max() > 100
        events.close()


async def test_duplex_session_over_websocket(server: Any, speech_24k: bytes) -> None:
    """turn_detection duplex: audio_duplex on the worker; the request/response events answer errors."""
    async with client_for(server).realtime.connect(model="minicpm-o-4.5") as conn:
        events = await open_session(conn, audio={"input": {"turn_detection": {"type": "duplex"}}})
        session = events.of("session.updated")[-1]["session"]
        assert session["mode"] == "audio_duplex"
        assert session["audio"]["input"]["turn_detection"]["type"] == "duplex"
        call = server.runner.app[SOCKETS_KEY][session["id"]]
        await asyncio.wait_for(_until(lambda: call.mode_open and call.mode == "audio_duplex"), 120)
        assert call.cutter.unit_samples == 16000  # the duplex mode's 1 s units
        for kind in ("response.create", "input_audio_buffer.commit"):
            mark = len(events.seen)
            await conn.send_raw(json.dumps({"type": kind}))
            assert (await events.error(mark))["code"] == "invalid_request", kind
        mark = len(events.seen)
        await say(conn, speech_24k)
        await asyncio.sleep(2.0)
        assert not [e for e in events.seen[mark:] if e["type"] == "error"]
        assert (
            call.fed >= len(speech_24k) // 2 * 2 // 3
        )  # the caller's audio went to the model as 16 kHz units
        events.close()


async def _until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.05)


async def test_openapi_documents_the_realtime_events() -> None:
    from openapi_spec_validator import validate

    from rtc_server.openapi import build_openapi
    from rtc_server.realtime.models import CLIENT_EVENT_TYPES

    doc = build_openapi()
    validate(doc)
    events = doc["x-realtime-events"]
    schemas = doc["components"]["schemas"]
    assert all(name in schemas for name in events["server_to_client"] + events["client_to_server"])
    documented = {schemas[name]["properties"]["type"]["const"] for name in events["client_to_server"]}
    assert documented == set(CLIENT_EVENT_TYPES)  # every client event the server takes is documented
    assert {"/v1/realtime", "/v1/realtime/calls", "/v1/realtime/client_secrets"} <= set(doc["paths"])


async def test_websocket_sessions_are_listed_and_can_be_hung_up(server: Any) -> None:
    import aiohttp

    async with client_for(server).realtime.connect(model="minicpm-o-4.5") as conn:
        events = Events(conn)
        created = await events.wait("session.created", FIRST_EVENT_S)
        sid = created["session"]["id"]
        call = server.runner.app[SOCKETS_KEY][sid]
        await asyncio.wait_for(_until(lambda: call.phase == "active" and call.mode_open), 120)
        await asyncio.sleep(1.0)  # a few units: their latency shows on the dashboard
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{server.url}/api/sessions") as resp:  # the operator's list (loopback)
                listed = {s["session_id"]: s for s in (await resp.json())["sessions"]}
            assert listed[sid]["mode"] == "chat" and listed[sid]["phase"] == "active"
            async with http.get(f"{server.url}/metrics") as resp:
                text = await resp.text()
            assert 'rtc_sessions{mode="chat",state="active"} 1' in text, text[:2000]
            async with http.get(f"{server.url}/api/admin/status") as resp:
                status = await resp.json()
            (mine,) = [s for s in status["sessions"] if s["session_id"] == sid]
            assert mine["units"] > 0
            async with http.delete(f"{server.url}/api/sessions/{sid}") as resp:
                assert resp.status == 200
            await asyncio.wait_for(_until(lambda: events.task.done()), 10)  # the server closed the socket
            async with http.get(f"{server.url}/api/sessions/{sid}") as resp:
                assert resp.status == 410
        assert sid not in server.manager.sessions and not server.manager.admission.busy


def test_speech_started_comes_when_the_caller_begins() -> None:
    """The mode's `user_turn` with `started` (the VAD's start) gives speech_started at once, without closing the
    reply in progress; the turn's end gives speech_stopped and the commit for the same item."""
    from rtc_server import events as ev
    from rtc_server.realtime.responses import Translator

    out: list[Any] = []
    translator = Translator(out.append, "websocket", lambda: "audio")
    translator.on_event(ev.StateEvent(state="thinking"))
    response = translator.active
    assert response is not None
    translator.on_event(ev.UserTurnEvent(turn=1, started=True))
    assert [type(e).__name__ for e in out[-1:]] == ["SpeechStarted"]
    assert translator.active is response  # the reply goes on (interrupt_response=false keeps it playing)
    translator.on_event(ev.UserTurnEvent(turn=1, seconds=1.5))
    names = [type(e).__name__ for e in out]
    assert names.count("SpeechStarted") == 1
    started = next(e for e in out if type(e).__name__ == "SpeechStarted")
    stopped = next(e for e in out if type(e).__name__ == "SpeechStopped")
    committed = next(e for e in out if type(e).__name__ == "AudioCommitted")
    assert started.item_id == stopped.item_id == committed.item_id


def test_server_vad_fields_become_chat_options() -> None:
    from rtc_server.realtime import models as rm
    from rtc_server.realtime.session_map import Settings, apply_update

    td = {"type": "server_vad", "threshold": 0.6, "silence_duration_ms": 600, "prefix_padding_ms": 300}
    update = rm.SessionConfig.model_validate(
        {
            "audio": {
                "input": {"turn_detection": {**td, "create_response": False, "interrupt_response": False}}
            }
        }
    )
    settings, problems = apply_update(Settings(), update, lambda _voice: False)
    assert problems == []
    options = settings.options()
    assert options["vad_threshold"] == 0.6 and options["min_silence_ms"] == 600
    assert options["preroll_ms"] == 300 and options["fast_silence_ms"] == 0
    assert options["auto_respond"] is False and options["barge_in"] is False
    from inference.options import ModeOptions

    ModeOptions.model_validate(options)  # what the worker will validate
