"""Turn end in `chat` mode: how long after the caller's last word the turn detector ends the turn, and how
often it ends one inside a pause within a sentence.

Test speech: sentences spoken by espeak-ng, cut into phrases at the `|` marks, each phrase trimmed to its
own speech, then joined with mid-sentence pauses (250/400/600/800 ms by default) and followed by a real
end-of-turn silence of 2–3 s. The turns are shuffled and joined into one stream per speaker profile and
noise condition, as one call would send them (the VAD's recurrent state runs across turns, as in chat).

Silero VAD runs once per stream; every detector configuration then makes its decisions over the same window
probabilities (`TurnDetector.feed`, the same code `push` runs), so the configurations see identical VAD
output.

- latency: the caller's last speech sample -> the end event. `window`: the end of the 32 ms VAD window
  where the detector decided; `unit`: the end of the 320 ms unit that holds that window, i.e. when chat mode
  gets the unit and can act (the media shard sends whole units).
- false end: an end event inside a turn (before its last speech sample); per pause length it is the share
  of those pauses that got one; `turns cut` is the share of turns with at least one.
- early replies (chat's `early_reply`, `inference/modes/early_reply.py`): the decisions unit by unit, as chat
  makes them; a unit after which the turn would end within one more unit of silence
  (`TurnDetector.ends_within`) starts a reply. `early` is the share of turn ends (true or false) that came in
  the unit after such a start (answered a unit sooner); `dropped` counts the starts whose next unit did not end
  the turn (the caller spoke on: a reply's first chunk of GPU work wasted), per turn.

    python bench/turn_end.py [--voices 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.vad import WINDOW, SileroVad, TurnDetector  # noqa: E402
from MiniCPMO45.audio.rates import CHAT_UNIT_SAMPLES, MODEL_INPUT_RATE  # noqa: E402
from MiniCPMO45.audio.resample import resample  # noqa: E402
from MiniCPMO45.audio.wav import read_mono  # noqa: E402

ESPEAK = "/usr/bin/espeak-ng"
UNIT = CHAT_UNIT_SAMPLES

# "|" marks a pause inside the sentence
SENTENCES = [
    "I was thinking | that we could go to the park | and have lunch there",
    "Can you tell me | how long it takes | to fly from Paris to Tokyo",
    "My sister bought a new car last week | but she has not driven it yet",
    "The meeting is on Tuesday | at three in the afternoon | in the small room",
    "Please remind me | to call the dentist tomorrow morning",
    "What would you recommend | for a quick dinner | with only rice and eggs",
    "I think the answer is seven | or maybe eight | I am not really sure",
    "We need to buy milk | bread | and some fresh vegetables",
    "Could you explain | how a rainbow is formed",
    "The train was late again | so I missed the first part of the talk",
    "If it rains tomorrow | we will stay at home | and watch a movie",
    "Tell me a short story | about a dragon who is afraid of the dark",
    "How many people live in Canada | and what language do they speak",
    "I usually wake up at six | make some coffee | and read the news",
    "Is it better to learn piano | or guitar | for a complete beginner",
    "Last summer we travelled to Spain | and the weather was perfect",
    "Give me three ideas | for a birthday present | for my father",
    "The report is almost finished | I just need to check the numbers",
    "Why is the sky blue | during the day | but red at sunset",
    "Remember that the library closes early | on Sundays",
]

VOICES = [("en-us", 165), ("en-gb+f3", 150), ("en-us+m3", 185), ("en-gb-x-rp+f2", 175)]


@dataclass
class Turn:
    start: int  # first speech sample (in the stream)
    last: int  # last speech sample
    pauses: list[tuple[int, int, int]] = field(default_factory=list)  # (begin, end, length in ms)


@dataclass
class Stream:
    pcm: np.ndarray
    turns: list[Turn]


def speak(text: str, voice: str, speed: int, cache: Path) -> np.ndarray:
    """16 kHz float32 speech of `text`, trimmed to its first and last sample above 2% of its peak, peak 0.5."""
    path = cache / f"{abs(hash((text, voice, speed))) % 10**12}.wav"
    if not path.is_file():
        subprocess.run([ESPEAK, "-v", voice, "-s", str(speed), "-w", str(path), text], check=True)
    data, rate = read_mono(path)
    data = resample(data, rate, MODEL_INPUT_RATE)
    loud = np.nonzero(np.abs(data) > 0.02 * np.abs(data).max())[0]
    data = data[loud[0] : loud[-1] + 1]
    return (0.5 * data / np.abs(data).max()).astype(np.float32)


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    spectrum /= np.sqrt(np.maximum(np.arange(spectrum.size), 1))
    noise = np.fft.irfft(spectrum, n)
    return (noise / noise.std()).astype(np.float32)


def build_stream(
    pauses_ms: list[int], voices: int, snr_db: float | None, seed: int, cache: Path, repeat: int = 1
) -> Stream:
    """Every sentence in every voice (`repeat` times), its pauses drawn in turn from `pauses_ms`; shuffled;
    pink noise at `snr_db` below the speech (None: a -80 dBFS floor, as after the browser's noise
    suppression)."""
    rng = np.random.default_rng(seed)
    items = [(s, v) for _ in range(repeat) for s in SENTENCES for v in VOICES[:voices]]
    order = rng.permutation(len(items))
    pieces: list[np.ndarray] = [np.zeros(MODEL_INPUT_RATE, dtype=np.float32)]
    position = MODEL_INPUT_RATE
    turns: list[Turn] = []
    k = 0
    for i in order:
        sentence, (voice, speed) = items[i]
        phrases = [speak(p.strip(), voice, speed, cache) for p in sentence.split("|")]
        turn = Turn(start=position, last=0)
        for j, phrase in enumerate(phrases):
            if j:
                ms = pauses_ms[k % len(pauses_ms)]
                k += 1
                gap = ms * MODEL_INPUT_RATE // 1000
                turn.pauses.append((position, position + gap, ms))
                pieces.append(np.zeros(gap, dtype=np.float32))
                position += gap
            pieces.append(phrase)
            position += phrase.size
        turn.last = position - 1
        turns.append(turn)
        tail = int(rng.uniform(2.0, 3.0) * MODEL_INPUT_RATE)
        pieces.append(np.zeros(tail, dtype=np.float32))
        position += tail
    pcm = np.concatenate(pieces)
    if snr_db is None:
        pcm = pcm + 1e-4 * rng.standard_normal(pcm.size).astype(np.float32)
    else:
        speech = np.concatenate([pcm[t.start : t.last] for t in turns])
        level = np.sqrt(np.mean(speech[np.abs(speech) > 0.01] ** 2))
        pcm = pcm + pink_noise(pcm.size, rng) * level * 10 ** (-snr_db / 20)
    return Stream(pcm=pcm.astype(np.float32), turns=turns)


@dataclass
class Config:
    name: str
    min_silence_ms: int
    fast_silence_ms: int = 0
    learn_pauses: bool = False

    def detector(self, threshold: float) -> TurnDetector:
        return TurnDetector(
            threshold,
            self.min_silence_ms,
            fast_silence_ms=self.fast_silence_ms,
            learn_pauses=self.learn_pauses,
        )


@dataclass
class Score:
    window_ms: list[float] = field(default_factory=list)
    unit_ms: list[float] = field(default_factory=list)
    cut_pauses: dict[int, list[bool]] = field(default_factory=dict)  # pause length -> got a false end
    turns_cut: int = 0
    missed: int = 0
    turns: int = 0
    ends: int = 0  # end events, true or false
    early_ends: int = 0  # ... that came in the unit after an early start
    early_dropped: int = 0  # early starts whose next unit did not end the turn


def score(stream: Stream, probs: list[float], config: Config, threshold: float) -> Score:
    detector = config.detector(threshold)
    result = Score(turns=len(stream.turns))
    per_unit = UNIT // WINDOW
    ends: list[int] = []
    started = False  # an early reply started after the last unit
    for at in range(0, len(probs), per_unit):
        unit_ends = [e.window for e in detector.feed(probs[at : at + per_unit]) if e.kind == "end"]
        ends += unit_ends
        result.ends += len(unit_ends)
        if started:
            result.early_ends += bool(unit_ends)
            result.early_dropped += not unit_ends
        started = not unit_ends and detector.ends_within(per_unit)
    starts = [t.start for t in stream.turns[1:]] + [stream.pcm.size]
    for turn, next_start in zip(stream.turns, starts, strict=True):
        times = [(w + 1) * WINDOW for w in ends]
        inside = [t for t in times if turn.start < t <= turn.last]
        after = [t for t in times if turn.last < t <= next_start]
        for begin, end, ms in turn.pauses:
            hit = any(begin < t <= end + WINDOW * 3 for t in inside)
            result.cut_pauses.setdefault(ms, []).append(hit)
        result.turns_cut += bool(inside)
        if not after:
            result.missed += 1
            continue
        t = after[0]
        result.window_ms.append((t - turn.last) * 1000 / MODEL_INPUT_RATE)
        result.unit_ms.append((math.ceil(t / UNIT) * UNIT - turn.last) * 1000 / MODEL_INPUT_RATE)
    return result


CONFIGS = [
    Config("fixed 800 (old default)", 800),
    Config("fixed 600", 600),
    Config("fixed 500", 500),
    Config("fixed 400", 400),
    Config("fixed 300", 300),
    Config("confident 480 (no learning)", 800, 480),
    Config("confident 400 (no learning)", 800, 400),
    Config("confident 320 (no learning)", 800, 320),
    Config("confident 480 + learned pauses (new default)", 800, 480, True),
    Config("confident 400 + learned pauses", 800, 400, True),
    Config("confident 320 + learned pauses", 800, 320, True),
]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--voices", type=int, default=3, help="espeak-ng voices per sentence (1-4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threshold", type=float, default=0.5, help="the VAD threshold (options.vad_threshold)"
    )
    parser.add_argument("--pauses", default="250,400,600,800", help="mid-sentence pauses, ms")
    args = parser.parse_args()
    pauses = [int(p) for p in args.pauses.split(",")]
    profiles = {
        "mixed pauses": pauses,
        "fluent (250 ms pauses)": [250],
        "moderate (250-400 ms)": [250, 400],
        "hesitant (600-800 ms)": [600, 800],
    }
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next(
        (line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?"
    )
    print(f"CPU: {model}; VAD threshold {args.threshold}; {args.voices} voices; seed {args.seed}")
    conditions: dict[str, float | None] = {"quiet": None, "pink noise 10 dB SNR": 10.0}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        for condition, snr in conditions.items():
            for profile, profile_pauses in profiles.items():
                stream = build_stream(profile_pauses, args.voices, snr, args.seed, cache)
                began = time.perf_counter()
                probs = SileroVad().push(stream.pcm)
                vad_us = (time.perf_counter() - began) * 1e6 / len(probs)
                seconds = stream.pcm.size / MODEL_INPUT_RATE
                print(
                    f"\n### {condition}, {profile}: {len(stream.turns)} turns, {seconds:.0f} s of audio "
                    f"(VAD {vad_us:.0f} us per 32 ms window)\n"
                )
                lengths = sorted({ms for t in stream.turns for *_, ms in t.pauses})
                head = "| config | unit p50 | unit p95 | window p50 | window p95 | "
                head += " | ".join(f"cut {ms} ms" for ms in lengths) + " | turns cut | missed |"
                head += " early | early dropped per turn |"
                print(head)
                print("|" + " --- |" * (9 + len(lengths)))
                for config in CONFIGS:
                    s = score(stream, probs, config, args.threshold)
                    cuts = " | ".join(f"{100 * np.mean(s.cut_pauses[ms]):.0f}%" for ms in lengths)
                    print(
                        f"| {config.name} | {pct(s.unit_ms, 50):.0f} | {pct(s.unit_ms, 95):.0f} | "
                        f"{pct(s.window_ms, 50):.0f} | {pct(s.window_ms, 95):.0f} | {cuts} | "
                        f"{100 * s.turns_cut / s.turns:.0f}% | {s.missed} | "
                        f"{100 * s.early_ends / max(s.ends, 1):.0f}% | {s.early_dropped / s.turns:.2f} |"
                    )


if __name__ == "__main__":
    main()
