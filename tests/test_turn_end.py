"""Chat's turn end (`inference.vad.TurnDetector`): the confident rule ends a turn sooner than the fixed
window on a clean sentence end, it does not end inside the pauses it claims to tolerate, it backs off after a
false end, and the options validate. Real Silero VAD over real espeak-ng speech, fed in chat's 320 ms units."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from bench.turn_end import speak
from inference.options import ModeOptions
from inference.vad import WINDOW, SileroVad, TurnDetector, VadEvent, push_many
from MiniCPMO45.audio.rates import MODEL_INPUT_RATE

UNIT = 5120  # chat's 320 ms unit


@pytest.fixture(scope="module")
def voice(tmp_path_factory: pytest.TempPathFactory):
    cache: Path = tmp_path_factory.mktemp("espeak")
    return lambda text: speak(text, "en-us", 165, cache)


def silence(ms: int) -> np.ndarray:
    return np.zeros(ms * MODEL_INPUT_RATE // 1000, dtype=np.float32)


def run(detector: TurnDetector, parts: list[np.ndarray]) -> tuple[list[VadEvent], np.ndarray]:
    """Push the joined parts (with a -80 dBFS noise floor) in 320 ms units; the events and the audio."""
    pcm = np.concatenate(parts)
    pcm = pcm + 1e-4 * np.random.default_rng(0).standard_normal(pcm.size).astype(np.float32)
    events: list[VadEvent] = []
    for i in range(0, pcm.size - UNIT + 1, UNIT):
        events += detector.push(pcm[i : i + UNIT])
    return events, pcm


def end_ms(event: VadEvent, last_sample: int) -> float:
    """Last speech sample -> the end of the window where the detector decided."""
    return ((event.window + 1) * WINDOW - last_sample) * 1000 / MODEL_INPUT_RATE


def test_confident_rule_ends_a_clean_sentence_sooner(voice) -> None:
    sentence = voice("Please remind me to call the dentist tomorrow morning")
    parts = [silence(500), sentence, silence(1500)]
    last = 500 * MODEL_INPUT_RATE // 1000 + sentence.size
    latency = {}
    for name, detector in {
        "fixed": TurnDetector(0.5, 800, fast_silence_ms=0),
        "confident": TurnDetector.from_options(ModeOptions()),
    }.items():
        events, _ = run(detector, parts)
        assert [e.kind for e in events] == ["start", "end"], (name, events)
        latency[name] = end_ms(events[1], last)
        assert events[1].fast == (name == "confident")
    assert 800 <= latency["fixed"] <= 1000, latency
    assert latency["confident"] <= 640, latency
    assert latency["fixed"] - latency["confident"] >= 250, latency


def test_ends_within_foresees_the_end_by_exactly_its_windows(voice) -> None:
    """`ends_within(k)` (chat's early replies): false while the caller speaks, first true k windows before the fixed
    rule's end in a silence that goes on, and no more than k windows before the confident rule's end."""
    sentence = voice("Please remind me to call the dentist tomorrow morning")
    pcm = np.concatenate([silence(500), sentence, silence(1500)])
    pcm = pcm + 1e-4 * np.random.default_rng(0).standard_normal(pcm.size).astype(np.float32)
    probs = SileroVad().push(pcm)
    for name, detector in {
        "fixed": TurnDetector(0.5, 800, fast_silence_ms=0),
        "confident": TurnDetector.from_options(ModeOptions()),
    }.items():
        foreseen = end = None
        for w, prob in enumerate(probs):
            ended = any(e.kind == "end" for e in detector.feed([prob]))
            if ended:
                end = w
                break
            if foreseen is None and detector.ends_within(10):
                foreseen = w
            if prob >= 0.5:
                assert not detector.ends_within(10), (name, w)  # never while speech goes on
        assert foreseen is not None and end is not None, name
        if name == "fixed":
            assert end - foreseen == 10
        else:
            assert 0 < end - foreseen <= 10, (foreseen, end)
        assert not detector.ends_within(10)  # after the end: no turn in progress


def test_no_end_inside_a_short_pause(voice) -> None:
    """A new caller's pauses up to 400 ms inside a sentence do not end the turn (the default 480 ms rule)."""
    first, second = voice("I was thinking"), voice("that we could go to the park")
    for pause in (250, 400):
        detector = TurnDetector.from_options(ModeOptions())
        events, _ = run(detector, [silence(400), first, silence(pause), second, silence(1500)])
        assert [e.kind for e in events] == ["start", "end"], (pause, events)


def test_a_false_end_backs_off_to_the_fixed_window(voice) -> None:
    """A 600 ms pause ends the turn by the confident rule once; the caller goes on speaking, so the next
    600 ms pause inside a sentence no longer ends it. Without learning it ends there every time."""
    first, second = voice("My sister bought a new car"), voice("but she has not driven it yet")
    sentence = [first, silence(600), second, silence(1500)]
    learned = TurnDetector(0.5, 800, fast_silence_ms=400, learn_pauses=True)
    fixed = TurnDetector(0.5, 800, fast_silence_ms=400, learn_pauses=False)
    for detector, second_end_fast in ((learned, False), (fixed, True)):
        events, _ = run(detector, [silence(300), *sentence])
        # the pause is cut (a false end); the learned detector ends the real turn by the fixed window
        assert [(e.kind, e.fast) for e in events] == [
            ("start", False),
            ("end", True),
            ("start", False),
            ("end", second_end_fast),
        ], events
    assert learned.confident_silence_windows == learned.silence_windows
    events, _ = run(learned, sentence)
    assert [e.kind for e in events] == ["start", "end"], events
    assert not events[1].fast
    events, _ = run(fixed, sentence)
    assert [e.kind for e in events] == ["start", "end", "start", "end"], events


def test_pauses_seen_inside_turns_lengthen_the_window(voice) -> None:
    """A 350 ms pause that speech followed raises the confident window above it (plus the margin)."""
    first, second = voice("Can you tell me"), voice("how long it takes to fly to Tokyo")
    detector = TurnDetector(0.5, 800, fast_silence_ms=320)
    assert detector.confident_silence_windows == 10
    events, _ = run(detector, [silence(300), first, silence(350), second, silence(1500)])
    assert [e.kind for e in events] == ["start", "end"], events
    assert 11 < detector.confident_silence_windows < detector.silence_windows, detector.pauses


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"fast_silence_ms": 50}, "must be 0 (off) or at least 100"),
        ({"fast_silence_ms": 900}, "must not be above min_silence_ms (800)"),
        ({"min_silence_ms": 300, "fast_silence_ms": 400}, "must not be above min_silence_ms (300)"),
        ({"fast_silence_ms": -1}, "greater than or equal to 0"),
        ({"learn_pauses": "maybe"}, "valid boolean"),
    ],
)
def test_bad_turn_end_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ModeOptions.model_validate(options)
    (error,) = caught.value.errors()
    assert error["loc"] == (next(iter(options)) if len(options) == 1 else "fast_silence_ms",)
    assert message in error["msg"]


def test_turn_end_options_build_the_detector() -> None:
    defaults = TurnDetector.from_options(ModeOptions())
    assert (defaults.silence_windows, defaults.fast_windows, defaults.learn_pauses) == (25, 15, True)
    # a default fast window above a caller's shorter min_silence_ms is lowered to it
    short = TurnDetector.from_options(ModeOptions(min_silence_ms=300))
    assert short.confident_silence_windows == short.silence_windows == 9
    off = TurnDetector.from_options(ModeOptions(fast_silence_ms=0, learn_pauses=False))
    assert off.confident_silence_windows == 0


def test_streams_pushed_together_get_what_each_gets_alone(voice) -> None:
    """`push_many` (the streams' windows as one batched call): every stream gets the probabilities that pushing it
    alone gives, over pushes of uneven lengths that leave samples pending between them."""
    speech = voice("Is it going to rain this afternoon?")
    streams = [np.roll(speech, k * 1777) for k in range(5)]
    alone = [SileroVad() for _ in streams]
    together = [SileroVad() for _ in streams]
    got_alone: list[list[float]] = [[] for _ in streams]
    got_together: list[list[float]] = [[] for _ in streams]
    start = [0] * len(streams)
    for step in range(6):
        sizes = [300 + 2113 * ((step + k) % 4) for k in range(len(streams))]  # some below one window
        pieces = [s[a : a + n] for s, a, n in zip(streams, start, sizes, strict=True)]
        start = [a + n for a, n in zip(start, sizes, strict=True)]
        for k, pcm in enumerate(pieces):
            got_alone[k] += alone[k].push(pcm)
        for k, probs in enumerate(push_many(together, pieces)):
            got_together[k] += probs
    assert [len(x) for x in got_together] == [len(x) for x in got_alone]
    assert min(len(x) for x in got_alone) > 20 and max(max(x) for x in got_alone) > 0.5  # it heard speech
    np.testing.assert_allclose(np.concatenate(got_together), np.concatenate(got_alone), atol=1e-5)
    assert [v.pending_samples for v in together] == [v.pending_samples for v in alone]
