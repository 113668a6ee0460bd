"""Loopback calls over real aiortc peer connections: WHIP and the JSON API, events, and the heard delay."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from MiniCPMO45.audio.wav import write_wav
from tests.conftest import REPO_ROOT
from tests.rtc_client import RATE, Call, speech_signal

ARTIFACTS = REPO_ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    speech = speech_signal(tmp_path_factory.mktemp("speech") / "speech.wav")
    silence = np.zeros(RATE // 2, dtype=np.float32)
    return np.concatenate([silence, speech, silence])


async def run_loopback_call(call: Call, delay_s: float, seconds: float) -> None:
    await call.wait_connected()
    await asyncio.sleep(seconds + delay_s + 0.5)


def check_heard(call: Call, delay_s: float, name: str, packet_ms: int) -> None:
    """The caller heard its speech `delay_s` later, plus what packets longer than 20 ms (`packet_ms`,
    `rtc.outbound_packet_ms`) add at an aiortc caller: its jitter buffer holds a fixed 4 packets before it plays,
    and the outbound track's grid is as much coarser (README, "Loopback")."""
    later_s = 5 * (packet_ms - 20) / 1000
    delay, ncc, windows = call.measure()
    write_wav(ARTIFACTS / f"{name}-received.wav", call.recorder.signal(), RATE)
    print(
        f"{name}: heard delay {delay * 1000:.1f} ms (configured {delay_s * 1000:.0f} ms), global ncc {ncc:.3f}, "
        f"per-250-ms ncc median {np.median(windows):.3f} min {windows.min():.3f} over {windows.size} windows"
    )
    assert windows.size >= 6, "too little speech to compare"
    assert np.median(windows) > 0.8, f"the recording does not match what was sent: {np.round(windows, 2)}"
    assert np.mean(windows > 0.6) >= 0.75, f"too many windows differ: {np.round(windows, 2)}"
    assert ncc > 0.3, f"global correlation {ncc:.3f}: not the caller's audio"
    assert abs(delay - delay_s - later_s) < 0.1, (
        f"heard delay {delay * 1000:.0f} ms, configured {delay_s * 1000:.0f} ms (+ {later_s * 1000:.0f} ms expected)"
    )


async def test_whip_loopback_plays_back_after_the_configured_delay(
    start_test_server, speech: np.ndarray
) -> None:
    delay_s = 0.6
    server = await start_test_server(loopback={"delay_s": delay_s})
    call = Call(server.url, speech)
    try:
        await call.start_whip("loopback")
        assert call.location == f"/whip/{call.session_id}"
        audio_section = call.pc.remoteDescription.sdp.split("m=audio", 1)[1].split("m=", 1)[0]
        assert "a=sendrecv" in audio_section  # unlike ingest-only WHIP: the caller hears the server
        await run_loopback_call(call, delay_s, speech.size / RATE)
        check_heard(call, delay_s, "whip-loopback", server.config.rtc.outbound_packet_ms)
        assert await call.hang_up() in (200, 204)
        await asyncio.sleep(0.2)
        assert server.manager.sessions == {}
    finally:
        await call.close()


async def test_a_call_encodes_its_speech_at_the_configured_opus_level(start_test_server) -> None:
    """`rtc.opus_compression_level` reaches the call's outbound encoder (the default is 5)."""
    server = await start_test_server(rtc={"opus_compression_level": 2})
    call = Call(server.url, np.zeros(RATE, dtype=np.float32))
    try:
        await call.start_whip("loopback")
        await call.wait_connected()
        encoder = server.manager.sessions[call.session_id].speech._encoder
        assert encoder is not None and encoder.compression_level == 2
        assert await call.hang_up() in (200, 204)
    finally:
        await call.close()


async def test_loopback_in_60_ms_packets_plays_back_after_the_configured_delay(
    start_test_server, speech: np.ndarray
) -> None:
    """`rtc.outbound_packet_ms` = 60: the caller's aiortc gets one 60 ms frame per packet and hears its own speech,
    later than with 20 ms packets by what the longer packets add: aiortc's jitter buffer holds a fixed 4 packets
    before it plays (4 x 40 ms more) and the track's grid is 40 ms coarser (README, "Loopback")."""
    delay_s = 0.6
    server = await start_test_server(loopback={"delay_s": delay_s}, rtc={"outbound_packet_ms": 60})
    call = Call(server.url, speech)
    try:
        await call.start_whip("loopback")
        await run_loopback_call(call, delay_s, speech.size / RATE)
        track = server.manager.sessions[call.session_id].speech
        assert track.packet_ms == 60 and track.frames_out == 3 * track.packets_out > 0
        per_frame = call.recorder.samples / call.recorder.frames  # at 16 kHz
        assert abs(per_frame - 0.06 * RATE) < 0.05 * 0.06 * RATE, per_frame
        check_heard(call, delay_s, "whip-loopback-60ms", 60)
        assert await call.hang_up() in (200, 204)
    finally:
        await call.close()


@pytest.mark.parametrize("inline", [True, False, "unknown aiortc"])
async def test_the_callers_audio_is_decoded_on_the_loop_unless_turned_off(
    start_test_server, speech: np.ndarray, inline: bool | str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rtc.inline_audio_decode` (on by default): the call's inbound Opus is decoded on the event loop; off, by
    aiortc's decoder thread. Either way the unit stream reaches the worker; and an aiortc whose internals the
    inline decoder does not know leaves the call to aiortc's thread instead of failing it."""
    if inline == "unknown aiortc":
        import aiortc

        monkeypatch.setattr(aiortc, "__version__", "9.9.9")
    server = await start_test_server(rtc={"inline_audio_decode": bool(inline)})
    call = Call(server.url, speech)
    try:
        await call.start_whip("loopback")
        await call.wait_connected()
        await asyncio.sleep(1.0)
        session = server.manager.sessions[call.session_id]
        assert session.inbound is not None and session.inbound.frames_in >= 30
        if inline is True:
            assert session.inline_decoder is not None
            decoded = session.inline_decoder.frames_decoded  # those still queued for the track are not in yet
            assert session.inbound.frames_in <= decoded <= session.inbound.frames_in + 3
        else:
            assert session.inline_decoder is None
        assert await call.hang_up() in (200, 204)
    finally:
        await call.close()


async def test_json_api_loopback_with_events(start_test_server, speech: np.ndarray) -> None:
    server = await start_test_server()  # default delay: 1 s
    delay_s = server.config.loopback.delay_s
    call = Call(server.url, speech)
    try:
        await call.start_json("loopback", system_prompt="be brief")
        session = await call.wait_event("session", session_id=call.session_id)
        assert session["mode"] == "loopback"
        await call.wait_event("state", state="listening")
        await call.channel_open.wait()
        call.send("this is not json")
        call.send({"type": "no_such_message"})
        call.send({"type": "text", "text": "typed words"})
        await run_loopback_call(call, delay_s, speech.size / RATE)
        errors = [e for e in call.events if e["type"] == "error"]
        assert len(errors) == 2 and all(e["code"] == "bad_message" for e in errors), errors
        assert any(e["type"] == "text" and e["text"] == "typed words" for e in call.events)
        metrics = [e for e in call.events if e["type"] == "metrics"]
        assert metrics and all(m["handoff_ms"] >= 0 for m in metrics)
        check_heard(
            call, delay_s, "json-loopback", server.config.rtc.outbound_packet_ms
        )  # went on after bad ones
        # the other client messages are accepted; switching to an unknown mode is an error, the call goes on
        sessions_before = sum(e["type"] == "session" for e in call.events)
        for message in ({"type": "pause"}, {"type": "resume"}, {"type": "interrupt"}):
            call.send(message)
        call.send({"type": "system_prompt", "text": "You are a mirror."})
        call.send({"type": "set_mode", "mode": "karaoke"})
        call.send({"type": "set_mode", "mode": "loopback"})
        await call.wait_event("error", code="unknown_mode")
        await asyncio.sleep(0.5)
        assert sum(e["type"] == "session" for e in call.events) == sessions_before + 1  # re-opened
        assert sum(e["type"] == "error" for e in call.events) == 3
        listed = await _list_sessions(server.url)
        assert [s["session_id"] for s in listed] == [call.session_id]
        assert listed[0]["phase"] == "active"
        assert await call.hang_up() == 200
        assert await _list_sessions(server.url) == []
    finally:
        await call.close()


async def _list_sessions(url: str) -> list[dict]:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/api/sessions") as resp:
            assert resp.status == 200
            return (await resp.json())["sessions"]
