"""Call recordings: the WAV writers on the call's clock, retention, and a real loopback call recorded,
listed, replayed and deleted through `/api/recordings`."""

from __future__ import annotations

import asyncio
import io
import json
import time
import wave
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from rtc_server import recordings as rec
from tests.rtc_client import RATE, Call


def test_a_track_keeps_the_calls_clock_and_is_readable_while_written(tmp_path: Path) -> None:
    t0 = time.monotonic() - 10.0
    track = rec.TrackWriter(tmp_path / "a.wav", 16000, t0)
    track.write(np.full(16000, 0.5, dtype=np.float32), ends_at=t0 + 2.0)  # second 1..2: silence before it
    track.write(np.full(8000, -0.5, dtype=np.float32), ends_at=t0 + 2.2)  # early: right after the last
    track.flush()  # what the periodic write leaves on disk mid-call
    with wave.open(str(tmp_path / "a.wav")) as w:
        assert w.getframerate() == 16000 and w.getnframes() == 16000 + 16000 + 8000
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    assert not pcm[:16000].any() and (pcm[16000:32000] > 16000).all() and (pcm[32000:] < -16000).all()
    track.close()
    track.write(np.ones(10, dtype=np.float32), ends_at=t0 + 3)  # after close: nothing, no error


def test_an_assistant_packet_starts_where_it_was_sent(tmp_path: Path) -> None:
    """A 40 ms packet tapped as the outbound track sends it plays from then on: the recording puts its first
    sample at its send time, not 40 ms before it."""
    recorder = rec.CallRecorder(tmp_path, "r" * 16, "audio_duplex")
    recorder.t0 -= 1.0  # the call started a second ago
    recorder.assistant.t0 = recorder.t0
    sent = time.monotonic()
    recorder.assistant_frame(np.full(1920, 1000, dtype=np.int16))  # 40 ms at 48 kHz
    recorder.close()
    with wave.open(str(tmp_path / ("r" * 16) / "assistant.wav")) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    first = int(np.flatnonzero(pcm)[0])
    assert pcm.size - first == 960
    assert abs(first / 24000 - (sent - recorder.t0)) < 0.005


def test_prune_drops_old_recordings_then_the_oldest_past_the_size_cap(tmp_path: Path) -> None:
    now = time.time()
    for name, age_days, size in (
        ("a" * 16, 40, 100),
        ("b" * 16, 3, 400),
        ("c" * 16, 2, 400),
        ("d" * 16, 1, 400),
    ):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "meta.json").write_text(json.dumps({"mode": "chat", "started_at": now - age_days * 86400}))
        (folder / "caller.wav").write_bytes(bytes(size))
    deleted = rec.prune(tmp_path, retention_days=30, max_bytes=1000, keep={"b" * 16})
    # "a" is too old; then the oldest left ("b") would go for size, but its call runs: "c" goes instead
    assert deleted == ["a" * 16, "c" * 16]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b" * 16, "d" * 16]


async def test_a_call_is_recorded_listed_replayed_and_deleted(start_test_server) -> None:
    server = await start_test_server()
    root = Path(server.config.recording.dir)
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(RATE * 8) / RATE)).astype(np.float32)
    call = Call(server.url, tone)
    async with aiohttp.ClientSession() as http:
        try:
            await call.start_json("loopback")
            await call.wait_connected()
            session = await call.wait_event("session", phase="active", timeout=15)
            assert session["recording"] is True
            await asyncio.sleep(3.5)
            url = f"{server.url}/api/recordings/{call.session_id}"
            async with http.delete(url) as resp:  # not while the call runs
                assert resp.status == 409
            # readable while the call runs: the WAV headers are rewritten every few seconds
            async with http.get(f"{url}/audio") as resp:
                assert resp.status == 200
            assert await call.hang_up() == 200
        finally:
            await call.close()
        for _ in range(50):
            if not server.manager.sessions:
                break
            await asyncio.sleep(0.1)
        async with http.get(f"{server.url}/api/recordings") as resp:  # loopback: the admin may list
            listed = (await resp.json())["recordings"]
        assert [r["recording_id"] for r in listed] == [call.session_id]
        assert listed[0]["ended"] and listed[0]["mode"] == "loopback" and 3.0 < listed[0]["duration_s"] < 8.0
        async with http.get(url) as resp:
            recording = await resp.json()
        kinds = {e["type"] for e in recording["events"]}
        assert {"session", "state", "metrics"} <= kinds, kinds
        times = [e["t"] for e in recording["events"]]
        assert times == sorted(times) and times[-1] < recording["duration_s"] + 0.5
        async with http.get(f"{url}/audio") as resp:
            assert resp.content_type == "audio/wav"
            data = await resp.read()
        with wave.open(io.BytesIO(data)) as w:
            rate, frames = w.getframerate(), w.getnframes()
            mixed = np.frombuffer(w.readframes(frames), dtype="<i2").astype(np.float32) / 32768
        assert rate == 24000 and abs(frames / rate - recording["duration_s"]) < 1.5
        # both sides are there: the caller's tone, and loopback's echo of it a second later
        caller = np.frombuffer((root / call.session_id / "caller.wav").read_bytes()[44:], dtype="<i2")
        assistant = np.frombuffer((root / call.session_id / "assistant.wav").read_bytes()[44:], dtype="<i2")
        assert np.abs(caller).max() > 3000 and np.abs(assistant).max() > 3000
        assert np.abs(mixed).max() > 0.1
        for bad in ("x" * 8, "0" * 32, "..%2Fsecrets"):
            async with http.get(f"{server.url}/api/recordings/{bad}") as resp:
                assert resp.status == 404
        for frame in ("abc", "0", "-1", "9" * 30):  # a loopback call has no camera: no frame at all
            async with http.get(f"{url}/frames/{frame}") as resp:
                assert resp.status == 404 and (await resp.json())["error"]["code"] == "unknown_frame"
        async with http.delete(url) as resp:
            assert resp.status == 204
        async with http.get(url) as resp:
            assert resp.status == 404
        assert not (root / call.session_id).exists()


async def test_recordings_list_is_the_admins_and_recording_can_be_off(start_test_server) -> None:
    server = await start_test_server(auth={"admin_token": "adm"}, recording={"enabled": False})
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/api/recordings") as resp:
            assert resp.status == 401  # an admin token is set: loopback is no admin
        async with http.get(f"{server.url}/api/recordings", headers={"X-Admin-Token": "adm"}) as resp:
            assert resp.status == 200 and (await resp.json())["recordings"] == []
    call = Call(server.url, np.zeros(RATE * 4, dtype=np.float32))
    try:
        await call.start_json("loopback")
        await call.wait_connected()
        session = await call.wait_event("session", phase="active", timeout=15)
        assert session["recording"] is False
    finally:
        await call.close()
    assert not any(Path(server.config.recording.dir).iterdir())


def test_mixed_wav_of_a_crashed_call_reads_what_is_there(tmp_path: Path) -> None:
    """A call whose server died: headers lag the data and there is no end time; the replay still works."""
    folder = tmp_path / ("r" * 20)
    folder.mkdir()
    (folder / "meta.json").write_text(json.dumps({"mode": "chat", "started_at": time.time(), "ended": False}))
    writer = rec.TrackWriter(folder / "caller.wav", 16000, time.monotonic() - 3)
    writer.write(np.full(16000 * 3, 0.25, dtype=np.float32), ends_at=time.monotonic())
    writer._file.write(np.concatenate(writer._pending).astype("<i2").tobytes())  # the data, not the header:
    writer._file.flush()  # the server died between the two, and the header still says 0 samples
    info = rec.info(folder)
    assert info is not None and not info.ended and info.duration_s == pytest.approx(3.0, abs=0.05)
    with wave.open(io.BytesIO(rec.mixed_wav(tmp_path, folder.name))) as w:
        assert w.getnframes() == pytest.approx(3 * 24000, abs=48)  # within 2 ms (the clock ran on)
