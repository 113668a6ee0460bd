"""SpeechTrack pulled directly (as aiortc's sender would): frames, pacing, flush, turns, overflow."""

from __future__ import annotations

import asyncio
import time

import av
import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError

from media_tracks import SpeechTrack
from media_tracks.speech_track import DEFAULT_COMPRESSION_LEVEL, FRAME_S, WAKE_PHASES, OpusFrameEncoder
from MiniCPMO45.audio.rates import WEBRTC_FRAME_SAMPLES, WEBRTC_RATE
from tests.media_helpers import dominant_frequency


def tone(freq: float, seconds: float, rate: int = 24000, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def samples_of(frame: av.AudioFrame) -> np.ndarray:
    return frame.to_ndarray().reshape(-1).astype(np.float32) / 32768


async def pull(track: SpeechTrack, n: int) -> list[av.AudioFrame]:
    return [await track.recv() for _ in range(n)]


async def test_frames_are_20ms_s16_mono_48k_with_monotonic_pts_and_silence_when_idle() -> None:
    track = SpeechTrack()
    frames = await pull(track, 5)
    for i, frame in enumerate(frames):
        assert frame.samples == WEBRTC_FRAME_SAMPLES
        assert frame.sample_rate == WEBRTC_RATE
        assert frame.format.name == "s16" and frame.layout.name == "mono"
        assert frame.time_base.numerator == 1 and frame.time_base.denominator == WEBRTC_RATE
        assert frame.pts == i * WEBRTC_FRAME_SAMPLES
        assert not samples_of(frame).any()
    assert track.frames_out == 5 and track.speech_frames_out == 0


async def test_pushed_24k_tone_comes_out_as_48k_tone_of_same_frequency_and_duration() -> None:
    track = SpeechTrack(input_rate=24000)
    assert track.push(tone(1000, 0.4), turn=0, end_of_turn=True)
    assert track.buffered_s == pytest.approx(0.4)
    out = np.concatenate([samples_of(f) for f in await pull(track, 24)])
    voiced = np.flatnonzero(np.abs(out) > 1e-3)
    duration = (voiced[-1] - voiced[0] + 1) / WEBRTC_RATE
    assert abs(duration - 0.4) <= WEBRTC_FRAME_SAMPLES / WEBRTC_RATE
    assert voiced[0] < 10  # speech starts in the first frame
    assert abs(dominant_frequency(out[: int(0.4 * WEBRTC_RATE)], WEBRTC_RATE) - 1000) <= 3
    expected = tone(1000, 0.4, rate=WEBRTC_RATE)
    assert np.max(np.abs(out[100:19000] - expected[100:19000])) < 0.01  # no lag, no gain change
    assert not out[20000:].any()
    assert track.buffered_s == 0 and track.played_samples == 19200


async def test_speech_split_into_many_pushes_is_continuous() -> None:
    track = SpeechTrack(input_rate=24000)
    whole = tone(440, 0.3)
    for chunk in np.array_split(whole, 7):
        assert track.push(chunk, turn=0)
    track.push(np.zeros(0, np.float32), turn=0, end_of_turn=True)
    assert track.buffered_s == pytest.approx(0.3)
    out = np.concatenate([samples_of(f) for f in await pull(track, 15)])
    expected = tone(440, 0.3, rate=WEBRTC_RATE)
    assert np.max(np.abs(out[100:14300] - expected[100:14300])) < 0.01


async def test_flush_makes_the_next_frame_silent_and_drops_the_queue() -> None:
    track = SpeechTrack()
    track.push(tone(500, 2.0), turn=0)
    frames = await pull(track, 3)
    assert all(np.abs(samples_of(f)).max() > 0.3 for f in frames)
    track.flush()
    assert track.buffered_s == 0
    assert track.flushed_samples > 1.8 * WEBRTC_RATE
    frames = await pull(track, 3)
    assert all(not samples_of(f).any() for f in frames)
    assert [f.pts for f in frames] == [
        3 * WEBRTC_FRAME_SAMPLES,
        4 * WEBRTC_FRAME_SAMPLES,
        5 * WEBRTC_FRAME_SAMPLES,
    ]


async def test_flush_while_the_sender_waits_applies_to_that_frame() -> None:
    track = SpeechTrack()
    await track.recv()
    track.push(tone(500, 1.0), turn=0)
    pending = asyncio.ensure_future(track.recv())  # sleeping until its due time
    await asyncio.sleep(0)
    track.flush(turn=1)
    assert not samples_of(await pending).any()


async def test_stale_turns_are_refused() -> None:
    track = SpeechTrack()
    assert track.push(tone(500, 0.1), turn=0)
    track.flush(turn=2)
    assert track.turn == 2
    assert track.push(tone(500, 0.1), turn=1) is False
    assert track.buffered_s == 0 and track.stale_pushes == 1
    assert track.push(tone(500, 0.1), turn=2, end_of_turn=True)
    assert track.buffered_s == pytest.approx(0.1)
    assert track.push(tone(500, 0.1), turn=3, end_of_turn=True)  # a newer turn is adopted
    assert track.turn == 3 and track.buffered_s == pytest.approx(0.2)
    assert track.push(tone(500, 0.1), turn=np.int64(3))  # numpy ints are turns too
    with pytest.raises(ValueError, match="older"):
        track.flush(turn=1)


async def test_overflow_drops_the_oldest_audio_and_counts_it() -> None:
    track = SpeechTrack(max_buffer_s=0.5)
    track.push(tone(300, 0.5), turn=0)
    track.push(tone(2000, 0.5), turn=0, end_of_turn=True)
    assert track.buffered_s == pytest.approx(0.5)
    assert track.dropped_samples == 24000 and track.overflows >= 1
    out = np.concatenate([samples_of(f) for f in await pull(track, 25)])
    assert abs(dominant_frequency(out, WEBRTC_RATE) - 2000) <= 3  # the newest audio was kept
    track.push(tone(700, 3.0), turn=0)  # one push longer than the whole buffer
    assert track.buffered_s == pytest.approx(0.5, abs=0.001)


async def test_pacing_50_frames_take_about_a_second() -> None:
    track = SpeechTrack()
    track.push(tone(500, 0.5), turn=0)
    start = time.monotonic()
    await pull(track, 51)  # the first frame is due at once, the 51st 1 s later
    elapsed = time.monotonic() - start
    assert 0.8 <= elapsed <= 1.5
    assert track.pacing.frames == 51
    assert track.pacing.reanchors == 0


async def test_a_long_stall_re_anchors_the_clock_instead_of_bursting() -> None:
    track = SpeechTrack(reanchor_after_s=0.2)
    await pull(track, 2)
    await asyncio.sleep(0.5)  # the sender stops pulling for 0.5 s
    late = await track.recv()
    assert track.pacing.reanchors == 1
    assert late.pts >= 2 * WEBRTC_FRAME_SAMPLES + 20 * WEBRTC_FRAME_SAMPLES  # the missed slots were skipped
    start = time.monotonic()
    after = await pull(track, 3)
    assert time.monotonic() - start >= 0.03  # paced again, not a catch-up burst
    assert [f.pts - late.pts for f in after] == [
        WEBRTC_FRAME_SAMPLES,
        2 * WEBRTC_FRAME_SAMPLES,
        3 * WEBRTC_FRAME_SAMPLES,
    ]


async def test_wait_buffered_below_returns_as_playback_drains() -> None:
    track = SpeechTrack()
    track.push(tone(500, 0.2), turn=0, end_of_turn=True)
    waiter = asyncio.ensure_future(track.wait_buffered_below(0.1))
    await asyncio.sleep(0)
    assert not waiter.done()
    await pull(track, 4)
    assert not waiter.done()
    await pull(track, 1)
    await asyncio.sleep(0)
    assert waiter.done()
    track.push(tone(500, 1.0), turn=0)
    waiter = asyncio.ensure_future(track.wait_buffered_below(0.1))
    await asyncio.sleep(0)
    track.flush()
    await asyncio.wait_for(waiter, 1)
    with pytest.raises(ValueError, match="seconds"):
        await track.wait_buffered_below(-1)


async def test_bad_input_and_stop() -> None:
    with pytest.raises(ValueError, match="input_rate"):
        SpeechTrack(input_rate=0)
    with pytest.raises(ValueError, match="max_buffer_s"):
        SpeechTrack(max_buffer_s=0.001)
    track = SpeechTrack()
    with pytest.raises(ValueError, match="1-D"):
        track.push(np.zeros((2, 100), np.float32), turn=0)
    with pytest.raises(ValueError, match="float"):
        track.push(np.zeros(100, np.int16), turn=0)
    with pytest.raises(ValueError, match="turn"):
        track.push(np.zeros(100, np.float32), turn="1")  # type: ignore[arg-type]
    track.push(np.array([np.nan, np.inf, -np.inf, 0.5], np.float32), turn=0, end_of_turn=True)
    frame = await track.recv()
    assert np.isfinite(samples_of(frame)).all()
    track.stop()
    with pytest.raises(MediaStreamError):
        await track.recv()


async def test_encoding_track_sends_one_opus_packet_per_frame_that_decodes_to_the_speech() -> None:
    """`encode=True` (the server's calls): Opus packets made on the loop, stamped with the track's clock. (No
    re-anchoring: a stall of the loaded test machine would otherwise skip slots and jump the pts, as it should in a
    call; seen once in CI-like load.)"""
    track = SpeechTrack(input_rate=24000, encode=True, reanchor_after_s=1e9)
    assert track.push(tone(440, 0.6), turn=0, end_of_turn=True)
    packets = await pull(track, 40)
    assert all(isinstance(p, av.Packet) for p in packets)
    assert [p.pts for p in packets] == [i * WEBRTC_FRAME_SAMPLES for i in range(40)]
    assert all(
        p.time_base == packets[0].time_base and p.time_base.denominator == WEBRTC_RATE for p in packets
    )
    decoder = av.CodecContext.create("libopus", "r")
    decoder.sample_rate, decoder.layout, decoder.format = WEBRTC_RATE, "mono", "s16"
    pcm = (
        np.concatenate([f.to_ndarray().reshape(-1) for p in packets for f in decoder.decode(p)]).astype(
            np.float32
        )
        / 32768
    )
    assert pcm.size == 40 * WEBRTC_FRAME_SAMPLES
    speech = pcm[: int(0.6 * WEBRTC_RATE)]
    assert dominant_frequency(speech[4800:], WEBRTC_RATE) == pytest.approx(440, abs=10)
    assert np.sqrt(np.mean(speech[4800:] ** 2)) > 0.2  # the tone's level (0.5 peak) survives the codec
    assert np.sqrt(np.mean(pcm[int(0.75 * WEBRTC_RATE) :] ** 2)) < 0.01  # then silence


async def test_an_encoding_track_goes_silent_at_once_after_a_flush() -> None:
    """Barge-in cuts loud speech: what the caller decodes is silent from the second frame after the cut (the
    encoder starts afresh; CELT would otherwise fade the cut speech out over ~150 ms)."""
    rng = np.random.default_rng(0)
    track = SpeechTrack(input_rate=24000, encode=True)
    track.push((0.3 * rng.standard_normal(24000 * 2)).astype(np.float32), turn=0)
    decoder = av.CodecContext.create("libopus", "r")
    decoder.sample_rate, decoder.layout, decoder.format = WEBRTC_RATE, "mono", "s16"

    def decode(packets: list) -> list[float]:  # noqa: ANN001
        return [float(np.abs(f.to_ndarray()).max()) / 32768 for p in packets for f in decoder.decode(p)]

    before = decode(await pull(track, 25))
    assert min(before[5:]) > 0.3
    track.flush(1)
    after = decode(await pull(track, 12))
    assert max(after[2:]) == 0.0, after


def opus_decode(packets: list[av.Packet]) -> np.ndarray:
    decoder = av.CodecContext.create("libopus", "r")
    decoder.sample_rate, decoder.layout, decoder.format = WEBRTC_RATE, "mono", "s16"
    return np.concatenate([f.to_ndarray().reshape(-1) for p in packets for f in decoder.decode(p)])


async def test_an_encoding_track_codes_at_its_compression_level() -> None:
    """The track's packets are libopus's at the level given (`rtc.opus_compression_level`), not the default's."""
    rng = np.random.default_rng(1)
    speech = (0.2 * rng.standard_normal(24000)).astype(np.float32) + tone(300, 1.0)

    async def packets_at(level: int | None) -> list[bytes]:
        track = (
            SpeechTrack(input_rate=24000, encode=True)
            if level is None
            else SpeechTrack(input_rate=24000, encode=True, compression_level=level)
        )
        track.push(speech, turn=0, end_of_turn=True)
        track._start = time.monotonic() - 10  # every frame is due: no waiting
        return [bytes(p) for p in await pull(track, 40)]

    at_0, at_10, default = await packets_at(0), await packets_at(10), await packets_at(None)
    assert at_0 != at_10  # the level reaches libopus
    assert default == await packets_at(DEFAULT_COMPRESSION_LEVEL) != at_10
    assert SpeechTrack(encode=True, compression_level=3)._encoder.compression_level == 3  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        OpusFrameEncoder(compression_level=11)


async def test_an_encoding_track_repeats_the_silence_packet_instead_of_encoding_silence() -> None:
    """After speech, libopus codes the decaying tail, then settles on one silence packet; from then on silent
    frames reuse it without running the encoder, and speech that comes later is coded as before."""
    track = SpeechTrack(input_rate=24000, encode=True, reanchor_after_s=1e9)
    encoder = track._encoder
    assert encoder is not None
    track.push(tone(440, 0.4), turn=0, end_of_turn=True)
    track._start = time.monotonic() - 100  # every frame is due: no waiting
    packets = await pull(track, 60)  # 20 frames of tone, then 40 of silence
    assert encoder.repeated_silence >= 20  # the tail (~15 frames) and the settling frames ran through libopus
    assert encoder.encoded_frames + encoder.repeated_silence == 60
    assert len(set(bytes(p) for p in packets[-20:])) == 1 and len(bytes(packets[-1])) <= 3
    assert [p.pts for p in packets] == [i * WEBRTC_FRAME_SAMPLES for i in range(60)]
    encoded = encoder.encoded_frames
    track.push(tone(300, 0.4), turn=0, end_of_turn=True)
    packets += await pull(track, 30)
    assert encoder.encoded_frames > encoded + 20  # sound is encoded again
    pcm = opus_decode(packets).astype(np.float32) / 32768
    silence = pcm[
        30 * WEBRTC_FRAME_SAMPLES : 60 * WEBRTC_FRAME_SAMPLES
    ]  # the tone's decaying tail, then zeros
    assert np.abs(silence).max() < 1e-3
    second = pcm[62 * WEBRTC_FRAME_SAMPLES : 78 * WEBRTC_FRAME_SAMPLES]
    assert dominant_frequency(second, WEBRTC_RATE) == pytest.approx(300, abs=10)
    assert np.sqrt(np.mean(second**2)) > 0.3  # the tone's level (0.5 peak) after the skipped silence


async def test_tracks_started_at_any_time_share_a_few_wake_up_phases() -> None:
    """A process's outbound tracks wake on `WAKE_PHASES` shared phases of one 20 ms grid (one pass of the event
    loop serves all tracks of a phase), not each on its own; frames still come every 20 ms."""
    tracks = [SpeechTrack() for _ in range(2 * WAKE_PHASES)]
    for track in tracks:
        await track.recv()
        await asyncio.sleep(0.0037)  # starts spread over the grid
    phases = {round((track._start / FRAME_S) % 1 * WAKE_PHASES, 3) % WAKE_PHASES for track in tracks}  # type: ignore[operator]
    assert phases <= set(range(WAKE_PHASES)) and len(phases) == WAKE_PHASES, phases
    track = SpeechTrack()
    await track.recv()
    begin = time.monotonic()
    await pull(track, 10)
    assert 0.18 <= time.monotonic() - begin <= 0.3
    assert track.pacing.max_lateness_s < 0.05


@pytest.mark.parametrize("packet_ms", [40, 60])
async def test_longer_packets_carry_packet_ms_of_speech_each_with_the_rtp_clock_stepping_as_much(
    packet_ms: int,
) -> None:
    """`rtc.outbound_packet_ms`: one Opus packet of `packet_ms` per `recv()`, whose pts (aiortc's RTP timestamp)
    steps by the packet's samples; decoded, they are the speech, then silence (the repeated silence packet)."""
    n = WEBRTC_RATE * packet_ms // 1000
    track = SpeechTrack(input_rate=24000, encode=True, packet_ms=packet_ms, reanchor_after_s=1e9)
    taps: list[int] = []
    track.tap = lambda pcm: taps.append(pcm.size)
    assert track.push(tone(440, 0.6), turn=0, end_of_turn=True)
    track._start = time.monotonic() - 100  # every packet is due: no waiting
    count = 3000 // packet_ms  # 3 s
    packets = await pull(track, count)
    assert [p.pts for p in packets] == [i * n for i in range(count)]
    decoder = av.CodecContext.create("libopus", "r")
    decoder.sample_rate, decoder.layout, decoder.format = WEBRTC_RATE, "mono", "s16"
    frames = [list(decoder.decode(p)) for p in packets]
    assert all(len(f) == 1 and f[0].samples == n for f in frames)  # one frame of packet_ms per packet
    pcm = np.concatenate([f[0].to_ndarray().reshape(-1) for f in frames]).astype(np.float32) / 32768
    speech = pcm[4800 : int(0.6 * WEBRTC_RATE)]
    assert dominant_frequency(speech, WEBRTC_RATE) == pytest.approx(440, abs=10)
    assert np.sqrt(np.mean(speech**2)) > 0.2
    assert np.abs(pcm[int(1.5 * WEBRTC_RATE) :]).max() < 1e-3  # silence after the tone's tail
    encoder = track._encoder
    assert encoder is not None and encoder.frame_ms == packet_ms and encoder.repeated_silence > 0
    assert len(set(bytes(p) for p in packets[-5:])) == 1  # the repeated silence packet
    assert taps == [n] * count  # the recording tap sees every packet's samples
    assert track.packets_out == count and track.frames_out == count * packet_ms // 20
    assert track.played_samples == int(0.6 * WEBRTC_RATE)
    assert track.speech_frames_out == -(-int(0.6 * WEBRTC_RATE) // n) * packet_ms // 20


async def test_longer_packets_are_paced_on_their_own_grid() -> None:
    """60 ms packets: 17 take about a second (one wake-up per packet), on phases of a 60 ms grid."""
    track = SpeechTrack(input_rate=24000, encode=True, packet_ms=60)
    track.push(tone(500, 0.5), turn=0)
    start = time.monotonic()
    await pull(track, 17)  # the first is due at most 60 ms after start, the 17th 0.96 s after it
    elapsed = time.monotonic() - start
    assert 0.9 <= elapsed <= 1.5
    assert track.pacing.frames == 17 and track.pacing.reanchors == 0
    offset = (track._start % 0.06) / (0.06 / WAKE_PHASES)  # type: ignore[operator]
    assert min(offset % 1, 1 - offset % 1) < 1e-3  # on one of the 60 ms grid's phases


async def test_packet_ms_is_checked() -> None:
    with pytest.raises(ValueError, match="packet_ms"):
        SpeechTrack(encode=True, packet_ms=30)
    with pytest.raises(ValueError, match="encode=True"):
        SpeechTrack(packet_ms=60)  # aiortc would cut raw 60 ms frames into 20 ms packets of one timestamp
    with pytest.raises(ValueError, match="packet_ms"):
        OpusFrameEncoder(frame_ms=25)
    track = SpeechTrack(encode=True, packet_ms=40)
    track.flush(1)
    assert track._encoder is not None and track._encoder.frame_ms == 40  # a flush keeps the packet size
