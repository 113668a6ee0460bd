"""The model modes over real aiortc calls (WHIP and JSON) on the embedded tiny model: event order, speech on
the track, barge-in flush, mode switches, pause/resume and the pause timeout, reference voices."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiortc.mediastreams import VideoStreamTrack

from MiniCPMO45.audio.resample import resample
from MiniCPMO45.audio.wav import pcm16_wav
from tests.conftest import REPO_ROOT
from tests.rtc_client import RATE, Call, speech_signal
from tests.test_rtc_lifecycle import parse_prometheus

EMBEDDED_CONFIG = REPO_ROOT / ".cache" / "embedded" / "minicpmo45-tiny-random" / "config.json"


# Loading the model in a worker on a busy 2-core machine can starve its IPC loop for a few seconds.
WORKERS = {"heartbeat_timeout_s": 30.0}


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    return speech_signal(
        tmp_path_factory.mktemp("speech") / "speech.wav", "Wait, stop, let me ask you something."
    )


class TimedCall(Call):
    """A call that records when each event arrived and can say something at any moment."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.timed: list[tuple[float, dict[str, Any]]] = []
        self.channel.on("message", lambda data: self.timed.append((time.monotonic(), json.loads(data))))

    def say(self, pcm: np.ndarray, after_s: float = 0.1) -> None:
        """Put `pcm` (48 kHz) into the outgoing signal shortly after what is being sent now."""
        start = len(self.track.sent_at) * 960 + int(after_s * RATE)
        n = min(pcm.size, self.track.signal.size - start)
        self.track.signal[start : start + n] = (np.clip(pcm[:n], -1, 1) * 32767).astype(np.int16)

    def arrival(self, kind: str, after: float = 0.0, **match: Any) -> float | None:
        for at, event in self.timed:
            if at >= after and event.get("type") == kind and all(event.get(k) == v for k, v in match.items()):
                return at
        return None

    def energy_between(self, start: float, end: float) -> float:
        rec = self.recorder
        chunks = [c for c, at in zip(rec.chunks, rec.arrived_at, strict=True) if start <= at < end]
        return float(np.abs(np.concatenate(chunks)).max()) if chunks else 0.0


async def wait_until(predicate, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), dtype=np.float32)


def check_order(events: list[dict[str, Any]]) -> None:
    """The first event is `session`; text belongs to a turn that is not older than an earlier text's."""
    assert events[0]["type"] == "session", events[:3]
    turns = [e["turn"] for e in events if e["type"] == "text"]
    assert turns == sorted(turns), turns
    for e in events:
        if e["type"] == "state":
            assert e["state"] in ("listening", "thinking", "speaking")


async def test_chat_over_json_text_turn_speech_and_barge_in(start_test_server, speech: np.ndarray) -> None:
    server = await start_test_server(workers=WORKERS)
    call = TimedCall(server.url, silence(60))
    try:
        options = {"force": "speak", "max_new_tokens": 60, "seed": 1, "min_silence_ms": 400}
        await call.start_json("chat", options=options)
        await call.wait_connected()
        await call.wait_event("session", timeout=60, mode="chat", phase="active")
        await call.channel_open.wait()
        sent_at = time.monotonic()
        call.send({"type": "text", "text": "Tell me a story."})
        await call.wait_event("state", timeout=90, state="speaking")
        spoke_at = call.arrival("state", state="speaking")
        assert spoke_at is not None
        # the unit whose tick sent the first speech says how long after the turn (server side: within what the
        # caller saw, from sending the text to hearing that the reply speaks)
        timed = lambda: [e for e in call.events if e["type"] == "metrics" and e["turn_to_speech_ms"]]  # noqa: E731
        await wait_until(lambda: bool(timed()), 20, "no metrics with turn_to_speech_ms")
        first = timed()[0]
        assert 0 < first["turn_to_speech_ms"] < (spoke_at - sent_at) * 1000, (first, spoke_at - sent_at)
        await wait_until(
            lambda: call.energy_between(spoke_at, time.monotonic()) > 0.01, 60, "no speech heard"
        )
        assert any(e["type"] == "text" and e["turn"] == 0 for e in call.events)
        # Barge-in: the caller talks over the answer; the server flushes and goes back to listening.
        said_at = time.monotonic()
        call.say(speech)
        await wait_until(
            lambda: call.arrival("state", after=said_at, state="listening") is not None, 15, "no flush"
        )
        flushed_at = call.arrival("state", after=said_at, state="listening")
        assert flushed_at is not None
        # The caller's words end a new turn, which the model answers (turn 1 or later).
        await call.wait_event("state", timeout=30, state="thinking")
        await wait_until(
            lambda: call.arrival("state", after=flushed_at, state="thinking") is not None, 30, "no turn"
        )
        next_turn = call.arrival("state", after=flushed_at, state="thinking")
        assert next_turn is not None
        # Nothing of the old answer is heard after the flush (allowing the receive jitter buffer, ~100 ms).
        heard = call.energy_between(flushed_at + 0.25, next_turn + 0.25)
        print(
            f"barge-in: flushed {flushed_at - said_at:.2f} s after speech began; max level after flush {heard:.5f}"
        )
        assert heard < 1e-3, heard
        metrics = [e for e in call.events if e["type"] == "metrics"]
        assert metrics and all(m["vad_ms"] is not None for m in metrics)
        # one per reply that spoke (the typed turn's, and the spoken turn's if it spoke before the end)
        speaking = lambda: [e for e in call.events if e["type"] == "state" and e["state"] == "speaking"]  # noqa: E731
        await wait_until(
            lambda: len(timed()) == len(speaking()), 10, "a reply's first speech without its time"
        )
        # and /metrics has them (the shards' counters reach the front once a second)
        replies = len(timed())

        async def scraped() -> dict[str, float]:
            async with aiohttp.ClientSession() as http, http.get(f"{server.url}/metrics") as resp:
                rows = parse_prometheus(await resp.text())
            name = "rtc_chat_turn_to_speech_seconds"
            return {k: sum(v for _, v in rows.get(f"{name}_{k}", [])) for k in ("count", "sum")}

        deadline = time.monotonic() + 10
        while (got := await scraped())["count"] < replies and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert got["count"] == replies, got
        assert got["sum"] == pytest.approx(sum(m["turn_to_speech_ms"] for m in timed()) / 1000, abs=0.01)
        # the early replies' outcomes, as counted by the units' metrics
        async with aiohttp.ClientSession() as http, http.get(f"{server.url}/metrics") as resp:
            rows = parse_prometheus(await resp.text())
        early = {labels["outcome"]: v for labels, v in rows["rtc_chat_early_replies_total"]}
        units = [e for e in call.events if e["type"] == "metrics"]
        assert early == {
            "answered": sum(1 for m in units if m.get("early_reply")),
            "dropped": sum(1 for m in units if m.get("early_dropped")),
        }, early
        print(f"early replies: {early}")
        check_order(call.events)
    finally:
        await call.close()


async def test_audio_duplex_whip_mode_switch_pause_and_timeout(start_test_server) -> None:
    server = await start_test_server(workers=WORKERS, session={"pause_timeout_s": 1.5})
    call = TimedCall(server.url, silence(60))
    try:
        await call.start_whip("audio_duplex")
        await call.wait_connected()
        await call.wait_event("session", timeout=60, mode="audio_duplex", phase="active")
        await call.wait_event("state", timeout=60, state="listening")
        metric = await call.wait_event("metrics", timeout=20)
        assert metric["prefill_ms"] is not None and metric["kv_tokens"] > 0 and metric["lag_ms"] >= 0
        await call.channel_open.wait()
        switches = {}
        # a switch may bring the new mode's prompt ("" is the mode's own default); without one it carries over
        prompts = {"omni_duplex": None, "chat": "Answer in one sentence.", "audio_duplex": ""}
        for mode, prompt in prompts.items():
            call.send(
                {"type": "set_mode", "mode": mode, **({} if prompt is None else {"system_prompt": prompt})}
            )
            await wait_until(
                lambda m=mode: any(
                    e["type"] == "session" and e["mode"] == m and e["switch_ms"] for e in call.events[1:]
                ),
                20,
                f"no switch to {mode}",
            )
            event = [e for e in call.events if e["type"] == "session" and e["mode"] == mode][-1]
            switches[mode] = event["switch_ms"]
            session = server.manager.get(call.session_id)
            assert session is not None and session.system_prompt == (
                {"chat": "Answer in one sentence."}.get(mode)
            )
        print(f"mode switch times (ms, worker close + open, tiny model on CPU): {switches}")
        # nothing is reloaded: a switch costs a system-prompt prefill, far below a model load
        assert max(switches.values()) < 2000, switches
        after_switches = len(call.events)
        await wait_until(  # units flow again after the switches
            lambda: any(e["type"] == "metrics" for e in call.events[after_switches:]),
            30,
            "no units after switch",
        )
        call.send({"type": "pause"})
        paused = await call.wait_event("paused")
        assert paused["timeout_s"] == 1.5
        call.send({"type": "resume"})
        await call.wait_event("resumed")
        await asyncio.sleep(2.0)  # longer than the timeout: resume cancelled it
        assert server.manager.get(call.session_id) is not None
        call.send({"type": "pause"})
        error = await call.wait_event("error", timeout=5, code="pause_timeout")
        assert "released" in error["message"]
        await wait_until(lambda: server.manager.get(call.session_id) is None, 5, "slot not released")
        check_order(call.events)
    finally:
        await call.close()


# `prefill_ahead`: each unit is also opened with its frame before its audio comes (its tick feeds the audio alone)
@pytest.mark.parametrize("prefill_ahead", [False, True], ids=["frames-ahead", "prefill-ahead"])
async def test_omni_duplex_forced_speech_with_video(start_test_server, prefill_ahead: bool) -> None:
    server = await start_test_server(workers=WORKERS)
    call = TimedCall(server.url, silence(60))
    call.pc.addTrack(VideoStreamTrack())
    try:
        options = {"force": "speak", "seed": 2, "prefill_ahead": prefill_ahead}
        await call.start_json("omni_duplex", options=options, system_prompt="Describe.")
        await call.wait_connected()
        await call.wait_event("session", timeout=60, mode="omni_duplex", phase="active")
        await call.wait_event("state", timeout=90, state="speaking")
        await wait_until(lambda: any(e["type"] == "text" for e in call.events), 60, "no text")
        start = call.arrival("state", state="speaking") or 0.0
        await wait_until(lambda: call.energy_between(start, time.monotonic()) > 0.01, 60, "no speech heard")
        metrics = [e for e in call.events if e["type"] == "metrics"]
        assert any(m["tts_ms"] is not None and m["vocoder_ms"] is not None for m in metrics), metrics
        assert all(m["batch_sessions"] == 1 for m in metrics)  # the only call: a tick of one
        # the tick loop's split of the worker's time: the wait before the unit's tick, then the tick itself
        for m in metrics:
            assert m["tick_ms"] > 0 and m["tick_wait_ms"] >= 0, m
            assert m["tick_wait_ms"] + m["tick_ms"] <= m["compute_ms"] + 0.01, m
        assert sum(m["tick_ms"] for m in metrics) > 0.5 * sum(m["compute_ms"] for m in metrics), metrics
        # the first three units are listens: each holds the audio (13 positions) and one camera frame
        query_num = json.loads(EMBEDDED_CONFIG.read_text())["query_num"]
        kv = {m["unit"]: m["kv_tokens"] for m in metrics}
        assert kv[2] - kv[1] == 13 + query_num + 2, kv
        # from the second unit on, each unit's frame went to the worker ahead of the unit and through the vision
        # tower before the unit's tick (one may miss it under load: its tick then encodes the frame)
        ahead = [m["vision_ahead_ms"] for m in metrics if m["unit"] >= 1]
        assert len(ahead) >= 3 and sum(a is not None and a > 0 for a in ahead) >= len(ahead) - 1, ahead
        assert (
            metrics[0]["unit"] != 0 or metrics[0]["vision_ahead_ms"] is None
        )  # the first: no unit before it
        opened = [m["prefill_ahead_ms"] is not None for m in metrics if m["unit"] >= 1]
        if prefill_ahead:  # those units opened with their frames ahead (one may miss it under load)
            assert sum(opened) >= len(opened) - 1, metrics
        else:
            assert not any(opened)
        check_order(call.events)
    finally:
        await call.close()


async def test_voice_upload_validation_and_use(start_test_server, speech: np.ndarray, tmp_path) -> None:
    server = await start_test_server(
        workers=WORKERS,
        voices={
            "dir": str(tmp_path / "voices"),
            "max_bytes": 150_000,
            "min_duration_s": 1.0,
            "max_duration_s": 4.0,
        },
    )
    voice = pcm16_wav(resample(speech, RATE, 22050), 22050)
    tone = 0.3 * np.sin(np.arange(8000 * 5) * 0.2)
    async with aiohttp.ClientSession() as http:
        url = f"{server.url}/api/voices"

        async def post(body: bytes | aiohttp.FormData, ctype: str | None) -> tuple[int, dict]:
            headers = {"Content-Type": ctype} if ctype else {}
            async with http.post(url, data=body, headers=headers) as resp:
                return resp.status, await resp.json()

        status, body = await post(voice, "audio/wav")
        assert status == 201, body
        voice_id = body["voice_id"]
        assert body["sample_rate"] == 16000 and 1.0 < body["duration_s"] < 4.0
        form = aiohttp.FormData()
        form.add_field("file", voice, filename="me.wav", content_type="audio/wav")
        # the browser's multipart form; same content, same id (and no owner token: the first upload owns it)
        assert await post(form, None) == (201, {**body, "owner_token": None})
        bad = [
            (b"plain text, not audio", "text/plain", 415, "unsupported_media_type"),
            (b"RIFF....WAVEjunk" * 10, "audio/wav", 400, "bad_audio"),
            (b"ID3\x03 an mp3 maybe" * 10, "audio/wav", 400, "not_wav"),
            (pcm16_wav(tone[:4000], 8000), "audio/wav", 400, "too_short"),
            (pcm16_wav(tone, 8000), "audio/wav", 400, "too_long"),
            (pcm16_wav(np.zeros(16000 * 3), 16000)[:44] + b"\0" * 160_000, "audio/wav", 413, "too_large"),
        ]
        for data, ctype, want_status, want_code in bad:
            status, body = await post(data, ctype)
            assert (status, body["error"]["code"]) == (want_status, want_code), (want_code, body)
        async with http.get(url) as resp:
            assert [v["voice_id"] for v in (await resp.json())["voices"]] == [voice_id]
        # the library: a name (control characters and runs of spaces go), a preview of the stored audio, a
        # rename, a delete; the first upload of a recording owns it, a second upload names nothing
        async with http.post(
            f"{url}?name=Grandpa%00%20%20Joe",
            data=pcm16_wav(resample(speech[::-1].copy(), RATE, 16000), 16000),
            headers={"Content-Type": "audio/wav"},
        ) as resp:
            body = await resp.json()
        other = body["voice_id"]
        assert body["name"] == "Grandpa Joe" and body["owner_token"], body
        async with http.post(f"{url}?name=Mine", data=voice, headers={"Content-Type": "audio/wav"}) as resp:
            again = await resp.json()
        assert again["voice_id"] == voice_id and again["owner_token"] is None and again["name"] != "Mine"
        async with http.get(url) as resp:
            listed = (await resp.json())["voices"]
        assert [v["voice_id"] for v in listed] == [other, voice_id]  # the newest first
        assert all("owner" not in v and v["owner_token"] is None for v in listed)
        async with http.get(f"{url}/{voice_id}") as resp:
            assert resp.status == 200 and resp.content_type == "audio/wav"
            assert (await resp.read())[:4] == b"RIFF"
        patch = {"Content-Type": "application/json"}
        async with http.patch(f"{url}/{voice_id}", data=b'{"name": "Joe"}', headers=patch) as resp:
            assert resp.status == 200 and (await resp.json())["name"] == "Joe"
        async with http.post(
            f"{url}?name={'n' * 201}", data=voice, headers={"Content-Type": "audio/wav"}
        ) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["code"] == "bad_request"
        for bad_body, code in (
            (b'{"name": "' + b"n" * 201 + b'"}', 400),
            (b'{"name": "\\u0000\\u0007"}', 400),  # nothing printable left
            (b'{"name": ""}', 400),
            (b'{"name": 5}', 400),
            (b"{", 400),
            (b'{"nom": "x"}', 400),
        ):
            async with http.patch(f"{url}/{voice_id}", data=bad_body, headers=patch) as resp:
                assert resp.status == code and (await resp.json())["error"]["code"] == "bad_request"
        for method in ("GET", "PATCH", "DELETE"):
            for bad_id in ("0" * 24, "..%2F..%2Fetc%2Fpasswd", "X" * 24):
                async with http.request(
                    method, f"{url}/{bad_id}", data=b'{"name":"a"}', headers=patch
                ) as resp:
                    assert resp.status == 404, (method, bad_id, resp.status)
        async with http.delete(f"{url}/{other}") as resp:
            assert resp.status == 204
        async with http.get(url) as resp:
            assert [v["voice_id"] for v in (await resp.json())["voices"]] == [voice_id]
    # a voice the server no longer has does not block a call: the default voice speaks, and the call says so
    call = TimedCall(server.url, silence(30))
    try:
        await call.start_json("chat", voice=other)
        await call.wait_connected()
        notice = await call.wait_event("error", timeout=20, code="unknown_voice")
        assert "default voice" in notice["message"]
        await call.wait_event("session", timeout=60, mode="chat", phase="active")
    finally:
        await call.close()
    # the next call uses the uploaded voice: the worker loads it (LLM reference audio + vocoder prompt)
    call = TimedCall(server.url, silence(30))
    try:
        await call.start_json("chat", voice=voice_id, options={"force": "speak", "max_new_tokens": 10})
        await call.wait_connected()
        await call.wait_event("session", timeout=60, mode="chat", phase="active")
        await call.channel_open.wait()
        call.send({"type": "text", "text": "Hi"})
        await call.wait_event("state", timeout=90, state="speaking")
        assert not [e for e in call.events if e["type"] == "error"]
    finally:
        await call.close()


async def test_duplex_calls_share_worker_ticks_on_their_phase_grid(start_test_server) -> None:
    """Three calls started apart, on a worker with two tick phases: the server cuts each call's audio on the
    grid of the phase the worker gave it (whole seconds for the first and third call, half seconds for the
    second), so the first and third call's units reach the worker together and run in one tick
    (`batch_sessions` 2 in their metrics) while the second call's run in ticks of their own."""
    server = await start_test_server(workers={**WORKERS, "tick_phases": 2})
    calls = [TimedCall(server.url, silence(40)) for _ in range(3)]
    try:
        for call in calls:
            await call.start_json("audio_duplex", options={"force": "listen"})
            await call.wait_event("metrics", timeout=90)
            await asyncio.sleep(0.37)  # a phase no grid would give by chance
        done = lambda c: len([e for e in c.events if e["type"] == "metrics"])  # noqa: E731
        await wait_until(lambda: all(done(c) >= 6 for c in calls), 60, "too few units")
        sizes = [[e["batch_sessions"] for e in c.events if e["type"] == "metrics"][2:] for c in calls]
        # after the padded first unit, the third call shares the first call's ticks, the second runs alone
        assert sizes[2].count(2) >= len(sizes[2]) - 1, sizes
        assert sizes[1].count(1) >= len(sizes[1]) - 1, sizes

        def grid_distance(call: TimedCall, offset: float) -> float:
            """Median distance (s) of the call's unit ends from its phase grid (the server's clock is ours)."""
            ends = [at - e["roundtrip_ms"] / 1000 for at, e in call.timed if e["type"] == "metrics"][2:]
            return float(np.median([min((t - offset) % 1.0, 1.0 - (t - offset) % 1.0) for t in ends]))

        # and their units end where their grids say: on the whole seconds, and half a second later
        distances = [grid_distance(c, off) for c, off in zip(calls, (0.0, 0.5, 0.0), strict=True)]
        assert max(distances) < 0.15, distances
        # which the server reports in each unit's metrics (`grid_ms`, signed: the test's are after the data
        # channel's delivery, so a little later)
        for call, offset in zip(calls, (0.0, 0.5, 0.0), strict=True):
            for at, e in [(at, e) for at, e in call.timed if e["type"] == "metrics"][2:]:
                seen = ((at - e["roundtrip_ms"] / 1000 - offset + 0.5) % 1.0 - 0.5) * 1000
                assert -1.0 <= seen - e["grid_ms"] < 100.0, (seen, e)
    finally:
        for call in calls:
            await call.close()
