"""A hostile caller against its own call's data channel and media (security review, issue 22): every call here
is a real aiortc peer connection to the real server over loopback."""

from __future__ import annotations

import asyncio
import fractions
import gc
import json
import threading
import time
from typing import Any

import av
import numpy as np
import pytest
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from tests.rtc_client import FRAME, RATE, Call

MAX_ERROR_TEXT = 300  # an error event's message never grows with what the caller sent


def _tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)


async def _wait_for(predicate, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


async def _next_event(call: Call, start: int, kind: str, timeout: float = 10.0) -> dict[str, Any]:
    """The first `kind` event at or after index `start` of the call's events."""
    found: list[dict[str, Any]] = []

    def seen() -> bool:
        found[:] = [e for e in call.events[start:] if e.get("type") == kind]
        return bool(found)

    await _wait_for(seen, timeout, f"no {kind} event after #{start}; got {call.events[start:]}")
    return found[0]


async def _connected_call(server, seconds: float = 60) -> Call:  # noqa: ANN001
    call = Call(server.url, _tone(seconds))
    await call.start_json("loopback")
    await call.wait_connected()
    await call.channel_open.wait()
    await call.wait_event("session", phase="active")
    return call


# ---- 1. one data-channel message must not end the call -----------------------------------------------------

HOSTILE_MESSAGES: dict[str, tuple[str | bytes, str]] = {
    # message -> the error code the caller gets for it
    "deep_nesting": ("[" * 100_000, "message_too_large"),
    "deep_nesting_small": ("[" * 60_000, "bad_message"),
    "mode_name_60k": (json.dumps({"type": "set_mode", "mode": "m" * 60_000}), "bad_message"),
    "mode_name_64": (json.dumps({"type": "set_mode", "mode": "m" * 64}), "unknown_mode"),
    "mode_prompt_30k": (
        json.dumps({"type": "set_mode", "mode": "loopback", "system_prompt": "p" * 30_000}),
        "bad_message",
    ),
    "mode_prompt_number": (
        json.dumps({"type": "set_mode", "mode": "loopback", "system_prompt": 7}),
        "bad_message",
    ),
    "mode_name_262k": (json.dumps({"type": "set_mode", "mode": "m" * 262_100}), "message_too_large"),
    "message_300k": (json.dumps({"type": "text", "text": "t" * 300_000}), "message_too_large"),
    "type_tag_60k": (json.dumps({"type": "x" * 60_000}), "bad_message"),
    "not_utf8": (b"\xff\xfe" * 100, "bad_message"),
    "huge_number": ("1" * 50_000, "bad_message"),
}


@pytest.mark.parametrize("case", list(HOSTILE_MESSAGES))
async def test_a_hostile_message_is_answered_and_the_call_goes_on(start_test_server, case: str) -> None:
    message, code = HOSTILE_MESSAGES[case]
    server = await start_test_server()
    call = await _connected_call(server)
    try:
        # aiortc refuses to send more than the server's advertised 256 KiB; a hostile peer ignores that.
        call.pc.sctp._remote_max_message_size = 0
        start = len(call.events)
        call.channel.send(message)
        error = await _next_event(call, start, "error")
        assert error["code"] == code, error
        assert len(error["message"]) <= MAX_ERROR_TEXT, len(error["message"])
        assert call.pc.connectionState == "connected"
        start = len(call.events)
        call.send({"type": "pause"})
        await _next_event(call, start, "paused")
        call.send({"type": "resume"})
        await _next_event(call, start, "resumed")
        assert server.manager.get(call.session_id) is not None
    finally:
        await call.close()


async def test_an_event_too_large_for_the_channel_is_dropped_and_the_call_goes_on(start_test_server) -> None:
    from rtc_server import events as ev

    server = await start_test_server()
    call = await _connected_call(server)
    try:
        session = server.manager.get(call.session_id)
        session.send_event(ev.TextEvent(text="w" * 300_000, turn=0))  # past the peer's 256 KiB limit
        start = len(call.events)
        call.send({"type": "pause"})
        await _next_event(call, start, "paused")
        assert call.pc.connectionState == "connected"
        assert not any(e["type"] == "text" for e in call.events)
    finally:
        await call.close()


# ---- 14. an error before the events channel opens still reaches the caller ---------------------------------


async def test_a_mode_that_fails_to_open_tells_the_caller_before_the_call_ends(start_test_server) -> None:
    server = await start_test_server(workers={"heartbeat_timeout_s": 30.0})
    # The tiny chat model cannot keep a context window of one position: opening the mode fails. Once the
    # worker has loaded the model, that happens within milliseconds of connecting, before the events channel
    # is open.
    for attempt in range(3):
        call = Call(server.url, _tone(30))
        try:
            await call.start_json("chat", options={"max_kv_tokens": 1})
            await call.wait_connected()
            error = await call.wait_event("error", timeout=60)
            assert error["code"] == "mode_error", (attempt, error)
            await _wait_for(lambda: not server.manager.sessions, 10, "the call to end")  # noqa: B023
        finally:
            await call.close()


# ---- 8. audio faster than real time ------------------------------------------------------------------------


class UnpacedAudioTrack(MediaStreamTrack):
    """20 ms frames of a tone, returned as fast as the sender asks (no wall clock)."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._index = 0
        t = np.arange(FRAME) / RATE
        self._chunk = (3000 * np.sin(2 * np.pi * 330 * t)).astype(np.int16).reshape(1, -1)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        await asyncio.sleep(0)
        frame = av.AudioFrame.from_ndarray(self._chunk, format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.time_base = fractions.Fraction(1, RATE)
        frame.pts = self._index * FRAME
        self._index += 1
        return frame


async def test_audio_faster_than_real_time_is_dropped_and_reported(start_test_server) -> None:
    server = await start_test_server()
    call = Call(server.url, _tone(1))
    call.pc.getTransceivers()[0].sender.replaceTrack(UnpacedAudioTrack())
    try:
        await call.start_json("loopback")
        await call.wait_connected()
        await call.wait_event("session", phase="active")
        session = server.manager.get(call.session_id)
        sent_before, started = server.manager.stats.units_sent, time.monotonic()
        await asyncio.sleep(4.0)
        elapsed = time.monotonic() - started
        units = server.manager.stats.units_sent - sent_before
        unit_s = server.config.loopback.unit_ms / 1000
        assert session.inbound is not None
        print(f"unpaced caller: {session.inbound.frames_in} frames in, {units} units in {elapsed:.1f} s")
        assert session.inbound.frames_in * 0.02 > 2 * elapsed, "the caller was not faster than real time"
        assert units * unit_s <= elapsed + 0.5 + 1.0, (units, elapsed)
        assert session.inbound.frames_dropped > 0
        error = await call.wait_event("error", code="audio_too_fast")
        assert len(error["message"]) <= MAX_ERROR_TEXT
        assert call.pc.connectionState == "connected"
    finally:
        await call.close()


POLICER_CASES = {
    # name: (frame seconds, frame interval seconds, frames, pause before the last half, max admitted seconds)
    "real_time": (0.02, 0.02, 500, 0.0, 10.0),
    "ten_times_real_time": (0.02, 0.002, 2500, 0.0, 5.0 + 0.5),
    "burst_after_a_short_stall": (0.02, 0.02, 200, 1.5, 4.0),  # the stalled 1.5 s arrives at once: all kept
    "burst_after_a_long_silence": (0.02, 0.0, 500, 30.0, 0.5 + 2.0 + 0.5),  # 30 s earn 2 s of credit
}


@pytest.mark.parametrize("case", list(POLICER_CASES))
def test_the_real_time_policer(case: str) -> None:
    from media_tracks.audio_in import RealTimePolicer

    frame_s, interval_s, frames, pause_s, most_s = POLICER_CASES[case]
    policer = RealTimePolicer(16000)
    samples = int(frame_s * 16000)
    now, admitted = 100.0, 0
    for k in range(frames):
        if k == frames // 2:
            now += pause_s
        admitted += samples if policer.admit(samples, now) else 0
        now += interval_s
    elapsed = now - 100.0
    print(f"{case}: {admitted / 16000:.2f} s of {frames * frame_s:.2f} s admitted in {elapsed:.2f} s")
    assert admitted / 16000 <= most_s + 1e-9
    if case in ("real_time", "burst_after_a_short_stall"):
        assert admitted == frames * samples


class JumpingTimestampsTrack(MediaStreamTrack):
    """Paced 20 ms frames whose timestamps jump 0.5 s ahead each time: gap filling would make each 0.5 s."""

    kind = "audio"

    def __init__(self, frames: int) -> None:
        super().__init__()
        self._left = frames
        self._pts = 0

    async def recv(self) -> av.AudioFrame:
        if self._left == 0:
            raise MediaStreamError
        self._left -= 1
        await asyncio.sleep(0.02)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, FRAME), np.int16), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.time_base = fractions.Fraction(1, RATE)
        frame.pts = self._pts
        self._pts += FRAME + RATE // 2
        return frame


async def test_timestamps_that_jump_ahead_do_not_make_audio_faster_than_real_time() -> None:
    from media_tracks import InboundAudio, UnitCutter

    inbound = InboundAudio(JumpingTimestampsTrack(50), UnitCutter(unit_samples=1600), lambda unit: None)
    started = time.monotonic()
    inbound.start()
    await inbound.wait_ended()
    elapsed = time.monotonic() - started
    print(
        f"jumping timestamps: {inbound.samples_out / 16000:.2f} s in {elapsed:.2f} s, gaps {inbound.gap_samples}"
    )
    assert inbound.gap_samples > 0 and inbound.frames_dropped > 0
    assert inbound.samples_out / 16000 <= elapsed + 0.5 + 0.1


# ---- 11. nothing per call outlives the call ----------------------------------------------------------------


def _os_threads() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


async def test_short_calls_leave_no_threads_behind(start_test_server) -> None:
    server = await start_test_server(rtc={"offers_per_minute": 1000})

    async def short_call() -> None:
        call = Call(server.url, _tone(3))
        try:
            await call.start_json("loopback")
            await call.wait_connected()
            await call.wait_event("metrics")  # audio went both ways: every codec and resampler was used
            await call.hang_up()
        finally:
            await call.close()
        await _wait_for(lambda: not server.manager.sessions, 10, "the session to end")

    await short_call()  # warm-up: thread pools and caches that live as long as the process
    await asyncio.sleep(0.5)
    gc.collect()
    py_threads, os_threads, rss = threading.active_count(), _os_threads(), _rss_mb()
    started = time.monotonic()
    for _ in range(25):
        await short_call()
    gc.collect()
    grown = _rss_mb() - rss
    after_collected = threading.active_count(), _os_threads()
    # A call's threads must end with the call, not whenever the garbage collector next breaks its cycles.
    gc.disable()
    try:
        for _ in range(25):
            await short_call()
        await asyncio.sleep(0.5)
        after_uncollected = threading.active_count(), _os_threads()
    finally:
        gc.enable()
    print(
        f"50 calls in {time.monotonic() - started:.1f} s: python/OS threads {py_threads}/{os_threads} -> "
        f"{after_collected} (25 calls) -> {after_uncollected} (25 more, no gc); RSS +{grown:.1f} MB (25 calls)"
    )
    for py, os_ in (after_collected, after_uncollected):
        assert py <= py_threads + 4 and os_ <= os_threads + 4, (py_threads, os_threads, py, os_)
    assert grown < 40


# ---- 12. camera frames with each unit ----------------------------------------------------------------------


class ColourTrack(MediaStreamTrack):
    """160x120 frames of one colour at 15 fps."""

    kind = "video"

    def __init__(self) -> None:
        super().__init__()
        self.image = np.full((120, 160, 3), 128, dtype=np.uint8)
        self._start: float | None = None
        self._count = 0

    async def recv(self) -> av.VideoFrame:
        if self._start is None:
            self._start = time.monotonic()
        await asyncio.sleep(max(0.0, self._start + self._count / 15 - time.monotonic()))
        frame = av.VideoFrame.from_ndarray(self.image, format="rgb24")
        frame.pts = self._count * 6000
        frame.time_base = fractions.Fraction(1, 90000)
        self._count += 1
        return frame


async def _frame_probe_call(server) -> Call:  # noqa: ANN001
    call = Call(server.url, _tone(30))
    call.pc.addTrack(ColourTrack())
    await call.start_json("frame_probe")
    await call.wait_connected()
    await call.wait_event("text", timeout=15)  # units with frames reach the mode
    return call


async def test_a_failing_frame_snapshot_ends_the_call_with_an_error(
    start_test_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from media_tracks import LatestVideoFrame

    monkeypatch.setenv("MINICPMO45_EXTRA_MODES", "tests.probe_modes")
    server = await start_test_server()
    call = await _frame_probe_call(server)
    try:
        session_id = call.session_id

        def broken(self: LatestVideoFrame, max_side: int | None = None, fit: object = None) -> np.ndarray:
            raise RuntimeError("scaler failed")

        monkeypatch.setattr(LatestVideoFrame, "snapshot_rgb", broken)
        error = await call.wait_event("error", timeout=10)
        assert error["code"] == "internal_error", error
        await _wait_for(lambda: server.manager.get(session_id) is None, 10, "the call to end")
    finally:
        await call.close()


async def test_units_waiting_for_a_slow_frame_snapshot_are_bounded(
    start_test_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from media_tracks import LatestVideoFrame

    monkeypatch.setenv("MINICPMO45_EXTRA_MODES", "tests.probe_modes")
    server = await start_test_server()
    call = await _frame_probe_call(server)
    try:
        session = server.manager.get(call.session_id)
        snapshot = LatestVideoFrame.snapshot_rgb

        def slow(
            self: LatestVideoFrame, max_side: int | None = None, fit: object = None
        ) -> np.ndarray | None:
            time.sleep(1.0)  # in the executor: the event loop goes on cutting 200 ms units
            return snapshot(self, max_side, fit)  # type: ignore[arg-type]

        monkeypatch.setattr(LatestVideoFrame, "snapshot_rgb", slow)
        most = 0
        for _ in range(40):  # 4 s: 20 units arrive, 4 snapshots finish
            await asyncio.sleep(0.1)
            most = max(most, session.uplink.video_units.qsize())
        print(f"slow snapshots: at most {most} units waiting, {session.uplink.video_units_dropped} dropped")
        assert most <= 8
        assert session.uplink.video_units_dropped > 0
        assert call.pc.connectionState == "connected"
    finally:
        await call.close()


async def test_a_message_handler_failure_is_answered_and_the_call_goes_on(
    start_test_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rtc_server.session import CallSession

    server = await start_test_server()
    call = await _connected_call(server)
    try:
        pause = CallSession._pause
        failures = []

        def pause_once_broken(self: CallSession) -> None:
            if not failures:
                failures.append(1)
                raise RuntimeError("broken handler")
            pause(self)

        monkeypatch.setattr(CallSession, "_pause", pause_once_broken)
        start = len(call.events)
        call.send({"type": "pause"})
        error = await _next_event(call, start, "error")
        assert error["code"] == "internal_error", error
        start = len(call.events)
        call.send({"type": "pause"})
        await _next_event(call, start, "paused")
        assert call.pc.connectionState == "connected"
    finally:
        await call.close()


class OneJumpTrack(MediaStreamTrack):
    """Paced 20 ms frames of a tone whose timestamps jump 3 s ahead once, after 1 s (packets never sent)."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._index = 0
        self._start: float | None = None
        t = np.arange(FRAME) / RATE
        self._chunk = (3000 * np.sin(2 * np.pi * 330 * t)).astype(np.int16).reshape(1, -1)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        self._start = self._start or time.monotonic()
        wait = self._start + self._index * FRAME / RATE - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        frame = av.AudioFrame.from_ndarray(self._chunk, format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.time_base = fractions.Fraction(1, RATE)
        frame.pts = self._index * FRAME + (3 * RATE if self._index >= 50 else 0)
        self._index += 1
        return frame


async def test_inbound_audio_that_never_arrived_is_counted_shown_and_told(start_test_server) -> None:
    """Issue 15: a jump too long to fill is not silently dropped: the caller hears `audio_lost`, the session
    counts it, and `/metrics` shows it."""
    import aiohttp

    server = await start_test_server()
    call = Call(server.url, _tone(1))
    call.pc.getTransceivers()[0].sender.replaceTrack(OneJumpTrack())
    try:
        await call.start_json("loopback")
        await call.wait_connected()
        await call.wait_event("session", phase="active")
        error = await call.wait_event("error", code="audio_lost", timeout=15)
        assert "3.0 s" in error["message"], error
        session = server.manager.get(call.session_id)
        assert session is not None and session.snapshot().audio_lost_s == pytest.approx(3.0, abs=0.05)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{server.url}/metrics") as resp:
                text = await resp.text()
        lost = float(text.split("\nrtc_media_inbound_lost_seconds_total ")[1].split("\n")[0])
        assert lost == pytest.approx(3.0, abs=0.05)
        assert call.pc.connectionState == "connected"
    finally:
        await call.close()
