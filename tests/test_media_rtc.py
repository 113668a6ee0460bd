"""The media tracks over real aiortc peer connections on loopback (Opus and VP8 round trips)."""

from __future__ import annotations

import asyncio
import time

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError

from media_tracks import AudioUnit, InboundAudio, LatestVideoFrame, SpeechTrack, UnitCutter
from tests.media_helpers import (
    ColourVideoTrack,
    FunctionAudioTrack,
    best_correlation,
    chirp,
    connect_pair,
    dominant_frequency,
    stepped_tone,
)

TONES = [600.0, 1100.0, 1700.0]


async def test_inbound_audio_over_a_peer_connection_yields_16k_units_of_the_sent_signal() -> None:
    source = FunctionAudioTrack(lambda t: stepped_tone(t, TONES, step_s=1.0))
    sender, receiver, (remote,) = await connect_pair([source])
    units: list[AudioUnit] = []
    got_three = asyncio.Event()

    def on_unit(unit: AudioUnit) -> None:
        units.append(unit)
        if len(units) == 3:
            got_three.set()

    inbound = InboundAudio(remote, UnitCutter(unit_samples=16000), on_unit)
    inbound.start()
    backlog = 0
    try:
        deadline = time.monotonic() + 15
        while not got_three.is_set() and time.monotonic() < deadline:
            # aiortc's RemoteStreamTrack queue is unbounded; the reader must keep it empty.
            backlog = max(backlog, remote._queue.qsize())
            await asyncio.sleep(0.05)
        assert got_three.is_set(), f"only {len(units)} units after 15 s"
    finally:
        await sender.close()
        await receiver.close()
    await asyncio.wait_for(inbound.wait_ended(), 5)
    assert inbound.ended  # the remote track ended cleanly (MediaStreamError)
    assert backlog <= 10  # 3 s of growth would be 150 frames
    assert inbound.frames_in >= 150  # 3 s of 20 ms frames
    assert inbound.gap_samples == 0  # nothing lost on loopback: the gap filler must stay idle

    assert [u.index for u in units[:3]] == [0, 1, 2]
    assert all(u.pcm.size == 16000 and u.pcm.dtype == np.float32 for u in units)
    assert all(a.completed_at < b.completed_at for a, b in zip(units, units[1:], strict=False))
    for unit, freq in zip(units, TONES, strict=False):
        assert abs(dominant_frequency(unit.pcm, 16000) - freq) <= 3

    received = np.concatenate([u.pcm for u in units[:3]])
    expected = stepped_tone(np.arange(48000) / 16000, TONES, step_s=1.0)
    score, lag = best_correlation(received, expected, max_lag=4000)
    assert score > 0.9, (score, lag)
    level = np.sqrt(np.mean(received[lag:] ** 2)) / np.sqrt(np.mean(expected**2))
    assert 0.8 < level < 1.25  # stereo-to-mono keeps the level (average, not sum)


async def test_speech_track_round_trip_through_opus() -> None:
    speech = SpeechTrack(input_rate=24000)
    sender, receiver, (remote,) = await connect_pair([speech])
    chunks: list[np.ndarray] = []

    async def record() -> None:
        try:
            while True:
                frame: av.AudioFrame = await remote.recv()
                pcm = frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0]
                chunks.append(pcm.astype(np.float32) / 32768)
        except MediaStreamError:
            pass

    recorder = asyncio.ensure_future(record())
    try:
        # wait until media flows, then speak 1 s of a chirp
        deadline = time.monotonic() + 10
        while sum(c.size for c in chunks) < 9600 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert chunks, "no audio received"
        heard_before = sum(c.size for c in chunks)
        t24 = np.arange(24000) / 24000
        assert speech.push(chirp(t24, 300, 3000, 1.0).astype(np.float32), turn=0, end_of_turn=True)
        await asyncio.sleep(1.6)
    finally:
        await sender.close()
        await receiver.close()
    await asyncio.wait_for(recorder, 5)

    received = np.concatenate(chunks)[heard_before:]
    expected = chirp(np.arange(48000) / 48000, 300, 3000, 1.0)
    score, lag = best_correlation(received, expected, max_lag=24000)
    assert score > 0.9, (score, lag)
    assert lag / 48000 < 0.4  # pushed audio plays out promptly
    if lag:
        assert np.sqrt(np.mean(received[:lag] ** 2)) < 0.01  # silence before the speech
    tail = received[lag + 48000 + 2400 :]
    assert tail.size > 0 and np.sqrt(np.mean(tail**2)) < 0.01  # and silence after it
    assert speech.speech_frames_out == 50 and speech.pacing.frames > 50


async def test_latest_video_frame_over_a_peer_connection() -> None:
    colour = (200, 40, 90)
    source = ColourVideoTrack(colour, width=640, height=480)
    sender, receiver, (remote,) = await connect_pair([source])
    latest = LatestVideoFrame(remote)
    assert latest.snapshot_rgb() is None
    latest.start()
    try:
        deadline = time.monotonic() + 15
        while latest.frames_in < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert latest.frames_in >= 5
        full = latest.snapshot_rgb()
        small = await latest.snapshot_rgb_async(max_side=100)
    finally:
        await sender.close()
        await receiver.close()
    await latest.stop()
    assert full is not None and small is not None
    assert full.shape == (480, 640, 3) and full.dtype == np.uint8
    assert small.shape == (75, 100, 3)
    for image in (full, small):
        mean = image.reshape(-1, 3).mean(axis=0)
        assert np.all(np.abs(mean - colour) < 12), mean
