"""The outbound Opus encoder's CPU and quality at each libopus compression level (not a test).

    python bench/opus_levels.py [--runs 5] [--levels 0,1,...,10] [--bit-rate 48000]

Speech: espeak-ng sentences (three voices) at 24 kHz, the model's speech rate, resampled to 48 kHz as the
outbound track does, cut into 20 ms frames of s16 mono. Each level encodes the whole signal with the track's
own encoder (`media_tracks.speech_track.OpusFrameEncoder`: CELT `lowdelay`, constrained VBR), `--runs` times;
the CPU per frame is the fastest run's (process time / frames). Quality: the packets are decoded with libopus and
aligned with the input (codec delay found by cross-correlation); then

- waveform SNR (dB) over the whole signal;
- segmental SNR (dB): the mean of per-20 ms-frame SNRs, each clipped to [-10, 35], over the voiced frames
  (within 40 dB of the loudest frame);
- log-spectral distance (dB, voiced frames): RMS over 24 mel-spaced bands (100 Hz - 11 kHz) of the decoded
  against the input band energies, each frame floored at 50 dB under its loudest band; and the same per FFT bin
  (23 Hz), which also sees holes and spikes inside a band (CELT codes each band's energy, not its fine structure).

Prints a Markdown table and the same as JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from media_tracks.speech_track import TIME_BASE, OpusFrameEncoder  # noqa: E402
from MiniCPMO45.audio.rates import SPEECH_RATE, WEBRTC_FRAME_SAMPLES, WEBRTC_RATE  # noqa: E402
from MiniCPMO45.audio.resample import resample  # noqa: E402

ESPEAK = "/usr/bin/espeak-ng"
TEXTS = (
    "Hello, this is a microphone test, one two three. The quick brown fox jumps over the lazy dog.",
    "Could you tell me the weather in Paris tomorrow? I would like to go for a walk along the river.",
    "Sure. It will be sunny in the morning, with some clouds and a light breeze in the afternoon.",
)
VOICES = ("en", "en-us+f3", "en+m3")


def espeak_speech() -> np.ndarray:
    """~25 s of espeak-ng speech, 48 kHz float32 mono, through the model's 24 kHz rate."""
    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (text, voice) in enumerate(zip(TEXTS, VOICES, strict=True)):
            path = Path(tmp) / f"{i}.wav"
            subprocess.run(
                [ESPEAK, "-v", voice, "-s", "160", "-w", str(path), text], check=True, capture_output=True
            )
            with wave.open(str(path)) as w:
                rate = w.getframerate()
                pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
            parts += [resample(pcm, rate, SPEECH_RATE), np.zeros(SPEECH_RATE // 2, np.float32)]
    speech = np.concatenate(parts)
    speech *= 0.7 / np.abs(speech).max()
    return resample(speech, SPEECH_RATE, WEBRTC_RATE)


def frames_of(pcm: np.ndarray) -> list[av.AudioFrame]:
    n = pcm.size // WEBRTC_FRAME_SAMPLES
    s16 = np.clip(np.round(pcm[: n * WEBRTC_FRAME_SAMPLES] * 32767), -32768, 32767).astype(np.int16)
    frames = []
    for i in range(n):
        frame = av.AudioFrame.from_ndarray(
            s16[i * WEBRTC_FRAME_SAMPLES : (i + 1) * WEBRTC_FRAME_SAMPLES].reshape(1, -1),
            format="s16",
            layout="mono",
        )
        frame.sample_rate, frame.time_base, frame.pts = WEBRTC_RATE, TIME_BASE, i * WEBRTC_FRAME_SAMPLES
        frames.append(frame)
    return frames


def encode_all(
    frames: list[av.AudioFrame], silent: list[bool], level: int, bit_rate: int, repeat: bool
) -> tuple[float, list[bytes]]:
    """CPU per frame and the packets; with `repeat`, all-zero frames go as the track sends them (the repeated
    silence packet once libopus has settled on it; the check for zeros is left out of the time)."""
    encoder = OpusFrameEncoder(bit_rate=bit_rate, compression_level=level)
    packets = []
    start = time.process_time()
    for frame, zero in zip(frames, silent, strict=True):
        packet = encoder.repeat_silence(frame.pts) if repeat and zero else None
        packets.append(bytes(packet if packet is not None else encoder.encode(frame, silent=zero)))
    return (time.process_time() - start) / len(frames), packets


def decode_all(packets: list[bytes]) -> np.ndarray:
    decoder = av.CodecContext.create("libopus", "r")
    decoder.sample_rate = WEBRTC_RATE
    decoder.layout = "mono"
    out = []
    for data in packets:
        for frame in decoder.decode(av.Packet(data)):
            pcm = frame.to_ndarray().reshape(-1)
            out.append(pcm.astype(np.float32) / 32768 if pcm.dtype == np.int16 else pcm.astype(np.float32))
    return np.concatenate(out)


def align(ref: np.ndarray, dec: np.ndarray, max_lag: int = 2400) -> tuple[np.ndarray, np.ndarray, int]:
    n = ref.size - max_lag
    best = max(range(max_lag), key=lambda lag: float(np.dot(ref[:n], dec[lag : lag + n])))
    m = min(ref.size, dec.size - best)
    return ref[:m], dec[best : best + m], best


def quality(ref: np.ndarray, dec: np.ndarray) -> dict[str, float]:
    ref, dec, lag = align(ref, dec)
    err = ref - dec
    snr = 10 * np.log10(np.sum(ref**2) / np.sum(err**2))
    n = ref.size // WEBRTC_FRAME_SAMPLES
    r = ref[: n * WEBRTC_FRAME_SAMPLES].reshape(n, -1)
    d = dec[: n * WEBRTC_FRAME_SAMPLES].reshape(n, -1)
    energy = np.sum(r**2, axis=1) + 1e-12
    voiced = energy > energy.max() * 1e-4
    seg = 10 * np.log10(energy / (np.sum((r - d) ** 2, axis=1) + 1e-12))
    window = np.hanning(WEBRTC_FRAME_SAMPLES)
    hz = np.fft.rfftfreq(WEBRTC_FRAME_SAMPLES, 1 / WEBRTC_RATE)
    spec_r = np.abs(np.fft.rfft(r * window, axis=1)) ** 2
    spec_d = np.abs(np.fft.rfft(d * window, axis=1)) ** 2
    # band energies on a mel-like scale (24 bands, 100 Hz - 11 kHz: espeak-ng's band), each frame floored at
    # 50 dB under its loudest band so that inaudible bands do not dominate
    edges = 700 * (10 ** (np.linspace(np.log10(1 + 100 / 700), np.log10(1 + 11000 / 700), 25)) - 1)
    bands = np.digitize(hz, edges) - 1
    inside = (bands >= 0) & (bands < 24)
    band_r = np.stack([spec_r[:, inside & (bands == b)].sum(axis=1) for b in range(24)], axis=1)
    band_d = np.stack([spec_d[:, inside & (bands == b)].sum(axis=1) for b in range(24)], axis=1)
    floor = band_r.max(axis=1, keepdims=True) * 1e-5 + 1e-12
    db_r = 10 * np.log10(np.maximum(band_r, floor))
    db_d = 10 * np.log10(np.maximum(band_d, floor))
    lsd = np.sqrt(np.mean((db_r - db_d) ** 2, axis=1))
    # the same per FFT bin (23.4 Hz, 100 Hz - 11 kHz): sees holes and spikes inside a band (CELT codes each band's
    # energy exactly, not its fine structure)
    fine_r, fine_d = spec_r[:, inside], spec_d[:, inside]
    fine_floor = fine_r.max(axis=1, keepdims=True) * 1e-5 + 1e-12
    fine = (10 * np.log10(np.maximum(fine_r, fine_floor) / np.maximum(fine_d, fine_floor))) ** 2
    lsd_fine = np.sqrt(np.mean(fine, axis=1))
    return {
        "snr_db": float(snr),
        "segsnr_db": float(np.mean(np.clip(seg[voiced], -10, 35))),
        "lsd_db": float(np.mean(lsd[voiced])),
        "lsd_fine_db": float(np.mean(lsd_fine[voiced])),
        "delay_samples": lag,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--levels", default=",".join(str(i) for i in range(11)))
    ap.add_argument("--bit-rate", type=int, default=48000)
    ap.add_argument(
        "--repeat-levels", default="5,10", help="levels also run with the silence packet repeated"
    )
    args = ap.parse_args()
    pcm = espeak_speech()
    frames = frames_of(pcm)
    ref = np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.float32) / 32768
    silent = [not f.to_ndarray().any() for f in frames]
    runs = [(int(x), False) for x in args.levels.split(",")]
    runs += [(int(x), True) for x in args.repeat_levels.split(",") if x]
    times: dict[tuple[int, bool], list[float]] = {run: [] for run in runs}
    packets: dict[tuple[int, bool], list[bytes]] = {}
    for _ in range(args.runs):  # levels interleaved, so a busy moment of the shared VM hits them all alike
        for level, repeat in runs:
            per_frame, packets[level, repeat] = encode_all(frames, silent, level, args.bit_rate, repeat)
            times[level, repeat].append(per_frame)
    rows = []
    for run in runs:
        kbps = (
            sum(len(p) for p in packets[run]) * 8 / (len(frames) * WEBRTC_FRAME_SAMPLES / WEBRTC_RATE) / 1000
        )
        ts = sorted(times[run])
        rows.append(
            {
                "level": f"{run[0]} + silence repeated" if run[1] else str(run[0]),
                "us_per_frame_min": ts[0] * 1e6,
                "us_per_frame_median": ts[len(ts) // 2] * 1e6,
                "kbps": kbps,
                **quality(ref, decode_all(packets[run])),
            }
        )
    print(f"{sum(silent)} of the frames are all zeros")
    print(
        f"{len(frames)} frames ({len(frames) / 50:.1f} s of espeak-ng speech), {args.runs} runs, {args.bit_rate} b/s"
    )
    print("| level | µs/frame min | median | kbit/s | SNR dB | segSNR dB | LSD bands dB | LSD bins dB |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['level']} | {r['us_per_frame_min']:.0f} | {r['us_per_frame_median']:.0f} | {r['kbps']:.1f} | "
            f"{r['snr_db']:.2f} | {r['segsnr_db']:.2f} | {r['lsd_db']:.2f} | {r['lsd_fine_db']:.2f} |"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
