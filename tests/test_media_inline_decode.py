"""Inbound Opus decoded on the event loop (`media_tracks.inline_decode`) over real aiortc peer connections."""

from __future__ import annotations

import asyncio
import threading
import time

import aiortc
import numpy as np
import pytest
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection

from media_tracks import AudioUnit, InboundAudio, InlineAudioDecoder, UnitCutter, decode_inline
from tests.media_helpers import ColourVideoTrack, FunctionAudioTrack, dominant_frequency, stepped_tone

TONES = [700.0, 1300.0]


def decoder_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "audio-decoder" and t.is_alive()]


async def test_inbound_audio_is_decoded_on_the_loop_and_the_track_ends_with_the_call() -> None:
    """Every encoded frame is decoded in `put`, on the loop's thread, into the frames the track yields (the sent
    tones, in 16 kHz units as usual); aiortc's decoder thread only waits, and ends the track when the call ends."""
    before = set(decoder_threads())
    config = RTCConfiguration(iceServers=[])
    sender, receiver = RTCPeerConnection(config), RTCPeerConnection(config)
    remote: list[MediaStreamTrack] = []
    inline: list[InlineAudioDecoder] = []
    put_threads: set[int] = set()

    def on_track(track: MediaStreamTrack) -> None:
        remote.append(track)
        (transceiver,) = [t for t in receiver.getTransceivers() if t.receiver.track is track]
        decoder = decode_inline(transceiver.receiver)
        put = decoder.put

        def put_on_which_thread(task):  # noqa: ANN001, ANN202
            put_threads.add(threading.get_ident())
            put(task)

        decoder.put = put_on_which_thread  # type: ignore[method-assign]
        inline.append(decoder)

    receiver.on("track", on_track)
    sender.addTrack(FunctionAudioTrack(lambda t: stepped_tone(t, TONES, step_s=1.0)))
    await sender.setLocalDescription(await sender.createOffer())
    await receiver.setRemoteDescription(sender.localDescription)
    await receiver.setLocalDescription(await receiver.createAnswer())
    await sender.setRemoteDescription(receiver.localDescription)
    units: list[AudioUnit] = []
    inbound = InboundAudio(remote[0], UnitCutter(unit_samples=16000), units.append)
    inbound.start()
    try:
        deadline = time.monotonic() + 15
        while len(units) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(units) >= 2, f"only {len(units)} units after 15 s"
    finally:
        await sender.close()
        await receiver.close()
    await asyncio.wait_for(inbound.wait_ended(), 5)  # the parked thread ended the track as aiortc's does
    (decoder,) = inline
    assert put_threads == {threading.get_ident()}  # decoded on the event loop's thread
    assert decoder.decode_errors == 0 and decoder.frames_decoded >= 100
    assert inbound.frames_in == decoder.frames_decoded  # every frame the track gave came from `put`
    assert inbound.gap_samples == 0
    for unit, freq in zip(units, TONES, strict=False):
        assert abs(dominant_frequency(unit.pcm, 16000) - freq) <= 3
        assert np.sqrt(np.mean(unit.pcm**2)) > 0.2  # the tone's level (0.4 peak) survives
    await asyncio.sleep(0.1)
    assert set(decoder_threads()) <= before  # no decoder thread left behind


async def test_decode_inline_refuses_internals_it_does_not_know(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard: another aiortc version, a video receiver or one already started raise instead of patching."""
    config = RTCConfiguration(iceServers=[])
    offerer, answerer = RTCPeerConnection(config), RTCPeerConnection(config)
    try:
        for track in (
            FunctionAudioTrack(lambda t: 0 * t),
            ColourVideoTrack((0, 0, 0)),
            FunctionAudioTrack(lambda t: 0 * t),
        ):
            offerer.addTrack(track)
        await offerer.setLocalDescription(await offerer.createOffer())
        await answerer.setRemoteDescription(
            offerer.localDescription
        )  # the remote tracks exist, nothing started
        audio, video, started = (t.receiver for t in answerer.getTransceivers())
        assert (audio.track.kind, video.track.kind) == ("audio", "video")
        with monkeypatch.context() as patch:
            patch.setattr(aiortc, "__version__", "1.17.0")
            with pytest.raises(RuntimeError, match="1.16.0"):
                decode_inline(audio)
        with pytest.raises(RuntimeError, match="audio"):
            decode_inline(video)
        monkeypatch.setattr(started, "_RTCRtpReceiver__decoder_thread", threading.Thread(target=lambda: None))
        with pytest.raises(RuntimeError, match="already started"):
            decode_inline(started)
        assert isinstance(decode_inline(audio), InlineAudioDecoder)
        with pytest.raises(RuntimeError, match="decoder queue"):
            decode_inline(audio)  # twice: its queue is no longer aiortc's
    finally:
        await offerer.close()
        await answerer.close()
