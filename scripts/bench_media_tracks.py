"""Benchmark of the media tracks: per-call costs and SpeechTrack pacing with many tracks on one loop.

    python scripts/bench_media_tracks.py --tracks 32 --seconds 10

Each track is pulled like aiortc's RTP sender does (recv, then Opus-encode in the default executor),
while speech is pushed in 1 s chunks at real time. Prints JSON: microsecond costs of push/recv/inbound
frame handling and the pacing lateness (p50/p99/max over all tracks), re-anchors and CPU use.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import resource
import sys
import time
from pathlib import Path

import av
import numpy as np
from aiortc.codecs.opus import OpusEncoder

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from media_tracks import SpeechTrack, UnitCutter  # noqa: E402
from media_tracks.audio_in import _MonoResampler  # noqa: E402


def micro_costs() -> dict[str, float]:
    speech = (0.3 * np.sin(np.arange(24000) * 0.1)).astype(np.float32)
    track = SpeechTrack(max_buffer_s=200, reanchor_after_s=1e9)
    start = time.perf_counter()
    for _ in range(100):
        track.push(speech, turn=0)
    push_us = (time.perf_counter() - start) / 100 * 1e6

    async def pull() -> float:
        track._start = time.monotonic() - 1e6  # every frame is overdue: measures recv without sleeping
        begin = time.perf_counter()
        for _ in range(5000):
            await track.recv()
        return (time.perf_counter() - begin) / 5000 * 1e6

    recv_us = asyncio.run(pull())

    frames = []
    for i in range(1000):
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1920), np.int16), format="s16", layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = 48000, i * 960, fractions.Fraction(1, 48000)
        frames.append(frame)
    resampler, cutter = _MonoResampler(), UnitCutter()
    start = time.perf_counter()
    for frame in frames:
        cutter.push(resampler.resample(frame), 0.0)
    inbound_us = (time.perf_counter() - start) / len(frames) * 1e6
    return {"push_1s_us": push_us, "recv_us": recv_us, "inbound_frame_us": inbound_us}


async def pacing(n_tracks: int, seconds: float) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    tracks = [SpeechTrack() for _ in range(n_tracks)]
    speech = (0.3 * np.sin(np.arange(24000) * 0.1)).astype(np.float32)
    stop_at = time.monotonic() + seconds

    async def sender(track: SpeechTrack) -> None:
        encoder = OpusEncoder()
        while time.monotonic() < stop_at:
            frame = await track.recv()
            await loop.run_in_executor(None, encoder.encode, frame, False)

    async def producer() -> None:
        while time.monotonic() < stop_at:
            for track in tracks:
                if track.buffered_s < 0.5:
                    track.push(speech, turn=0)
            await asyncio.sleep(0.25)

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.gather(producer(), *(sender(t) for t in tracks))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    lateness = np.concatenate([np.fromiter(t.pacing.recent, dtype=np.float64) for t in tracks])
    return {
        "tracks": n_tracks,
        "lateness_p50_ms": float(np.percentile(lateness, 50) * 1e3),
        "lateness_p99_ms": float(np.percentile(lateness, 99) * 1e3),
        "lateness_max_ms": float(lateness.max() * 1e3),
        "late_frames_over_5ms": sum(t.pacing.late_frames for t in tracks),
        "reanchors": sum(t.pacing.reanchors for t in tracks),
        "frames": sum(t.frames_out for t in tracks),
        "cpu_percent_of_core_per_track": cpu / seconds / n_tracks * 100,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracks", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    result = {"micro": micro_costs(), "pacing": asyncio.run(pacing(args.tracks, args.seconds))}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
