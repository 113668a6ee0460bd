"""Voice activity detection for turn-based chat: Silero VAD's ONNX model (shipped in the `silero-vad`
package) run with onnxruntime, and a small turn detector on top of its per-window speech probabilities.

The model takes 512-sample windows at 16 kHz, each preceded by the last 64 samples of the previous window
(its context), plus a recurrent state `[2, 1, 128]`; it returns the speech probability of the window.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np
import onnxruntime as ort

from inference.options import ModeOptions
from MiniCPMO45.audio.rates import MODEL_INPUT_RATE

WINDOW = 512  # samples per probability (32 ms)
CONTEXT = 64


def silero_model_path() -> str:
    return str(resources.files("silero_vad") / "data" / "silero_vad.onnx")


_SESSION: ort.InferenceSession | None = None


def _session() -> ort.InferenceSession:
    global _SESSION
    if _SESSION is None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        _SESSION = ort.InferenceSession(silero_model_path(), opts, providers=["CPUExecutionProvider"])
    return _SESSION


class SileroVad:
    """Streaming speech probabilities for one audio stream (its own recurrent state and context)."""

    def __init__(self) -> None:
        self.session = _session()
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)

    @property
    def pending_samples(self) -> int:
        """Samples pushed that no window has taken yet (the next push's first window starts with them)."""
        return int(self._pending.size)

    def push(self, pcm: np.ndarray) -> list[float]:
        """Append 16 kHz float32 samples; returns the probability of every complete 512-sample window."""
        return push_many([self], [pcm])[0]


def push_many(vads: Sequence[SileroVad], pcms: Sequence[np.ndarray]) -> list[list[float]]:
    """`SileroVad.push` for several streams at once: the streams' n-th windows run as one batched model call
    (their rows are independent), so the streams of a tick cost one call per 32 ms window instead of one per
    stream and window: half the CPU at 48 streams, and one release of the GIL per call."""
    windows: list[list[np.ndarray]] = []
    for vad, pcm in zip(vads, pcms, strict=True):
        audio = np.concatenate([vad._pending, np.asarray(pcm, dtype=np.float32).reshape(-1)])
        n = audio.size // WINDOW
        windows.append([audio[i * WINDOW : (i + 1) * WINDOW] for i in range(n)])
        vad._pending = audio[n * WINDOW :]
    probs: list[list[float]] = [[] for _ in vads]
    session = _session()
    for step in range(max((len(w) for w in windows), default=0)):
        rows = [k for k, w in enumerate(windows) if step < len(w)]
        x = np.stack([np.concatenate([vads[k]._context, windows[k][step]]) for k in rows])
        state = np.concatenate([vads[k]._state for k in rows], axis=1)
        out, state = session.run(
            None, {"input": x, "state": state, "sr": np.array(MODEL_INPUT_RATE, dtype=np.int64)}
        )
        for j, k in enumerate(rows):
            vads[k]._state = state[:, j : j + 1]
            vads[k]._context = windows[k][step][-CONTEXT:]
            probs[k].append(float(out[j, 0]))
    return probs


@dataclass
class VadEvent:
    kind: str  # "start" (speech began) | "end" (enough silence after speech)
    window: int  # index of the window where it happened (0 = the stream's first window)
    fast: bool = False  # an end decided by the confident rule (shorter than `min_silence_ms`)


def _windows(ms: float) -> int:
    return max(1, round(ms * MODEL_INPUT_RATE / 1000 / WINDOW))


class TurnDetector:
    """Speech start/end from window probabilities.

    Speech starts after `min_speech_ms` of windows at or above `threshold`. It ends after `min_silence_ms`
    of windows below `threshold - 0.15` (hysteresis, as Silero's own iterator does): the fixed rule, always
    on.

    The confident rule (on when `fast_silence_ms` > 0) ends it sooner, after `fast_silence_ms` of silence,
    when the VAD is sure:
    - the speech so far had at least `confident_speech_ms` of windows at or above `confident_prob`;
    - the trailing silence is a clean fall: every window since the probability dropped below the
      hysteresis floor is under `quiet_prob` or lower than the window before it (falling). A window that
      rises to `quiet_prob` or above (noise, breath, a soft syllable) restarts the count, so in doubtful
      audio the turn ends by the fixed rule only.
    - Per speaker (`learn_pauses`): every pause inside a turn (silence of at least `MIN_PAUSE_MS` and
      shorter than `min_silence_ms` that speech followed) is remembered. The confident window is the longest
      of the last `PAUSE_MEMORY` such pauses plus `PAUSE_MARGIN_MS`, at least `fast_silence_ms` and at most
      `min_silence_ms`. A confident end that speech follows within `min_silence_ms` was false (the caller
      had only paused): it is remembered as a pause of the full `min_silence_ms`, so the confident rule
      stays off until `PAUSE_MEMORY` later pauses push it out. A caller who pauses long inside sentences
      gets the long window after the first cut; one who doesn't keeps the short one.

    Decisions are per 32 ms window; a caller that feeds 320 ms units sees them when the unit arrives.
    """

    PAUSE_MEMORY = 16  # in-turn pauses remembered per stream
    PAUSE_MARGIN_MS = 96  # the confident window stays this much above the longest remembered pause
    MIN_PAUSE_MS = 160  # shorter gaps (between words) are not remembered as pauses

    def __init__(
        self,
        threshold: float = 0.5,
        min_silence_ms: int = 800,
        min_speech_ms: int = 64,
        *,
        fast_silence_ms: int = 0,
        confident_speech_ms: int = 320,
        confident_prob: float = 0.9,
        quiet_prob: float = 0.15,
        learn_pauses: bool = True,
    ) -> None:
        self.threshold = threshold
        self.low = max(threshold - 0.15, 0.01)
        self.silence_windows = _windows(min_silence_ms)
        self.speech_windows = _windows(min_speech_ms)
        self.fast_windows = min(_windows(fast_silence_ms), self.silence_windows) if fast_silence_ms > 0 else 0
        self.confident_windows = _windows(confident_speech_ms)
        self.confident_prob = max(confident_prob, threshold)
        self.quiet_prob = min(quiet_prob, self.low)
        self.learn_pauses = learn_pauses
        self.margin_windows = _windows(self.PAUSE_MARGIN_MS)
        self.min_pause_windows = _windows(self.MIN_PAUSE_MS)
        self.pauses: deque[int] = deque(maxlen=self.PAUSE_MEMORY)  # in-turn pauses, in windows
        self.vad = SileroVad()
        self.in_speech = False
        self.window = 0
        self._run = 0  # consecutive windows counting toward the next change
        self._reset_turn()

    @classmethod
    def from_options(cls, options: ModeOptions) -> TurnDetector:
        """The detector a chat session's options ask for."""
        return cls(
            options.vad_threshold,
            options.min_silence_ms,
            fast_silence_ms=options.fast_silence_ms,
            learn_pauses=options.learn_pauses,
        )

    def _reset_turn(self) -> None:
        self._confident = 0  # confident speech windows in this turn
        self._clean = 0  # trailing silence windows since the fall last restarted
        self._prev = 1.0  # the previous window's probability
        self._gap = -1  # after a confident end: silence windows since the speech; -1 when not counting

    def reset(self) -> None:
        """Forget the audio (VAD state, the turn in progress); the caller's remembered pauses stay."""
        self.vad.reset()
        self.in_speech = False
        self._run = 0
        self._reset_turn()

    @property
    def confident_silence_windows(self) -> int:
        """The confident rule's current window count (0: the rule is off)."""
        if not self.fast_windows:
            return 0
        longest = max(self.pauses) + self.margin_windows if self.pauses else 0
        return min(max(self.fast_windows, longest), self.silence_windows)

    def _remember_pause(self, windows: int) -> None:
        if self.learn_pauses and self.min_pause_windows <= windows < self.silence_windows:
            self.pauses.append(windows)

    def ends_within(self, windows: int) -> bool:
        """Whether the turn in progress ends within `windows` more windows if the caller stays silent: the
        trailing silence is that close to the fixed rule's count, or (with the confident rule on and its speech
        condition met) to the confident count from a clean fall. False outside speech or mid-word."""
        if not self.in_speech or self._run == 0:
            return False
        if self._run + windows >= self.silence_windows:
            return True
        fast = self.confident_silence_windows
        confident = bool(fast) and self._confident >= self.confident_windows
        return confident and self._clean > 0 and self._clean + windows >= fast

    def push(self, pcm: np.ndarray) -> list[VadEvent]:
        return self.feed(self.vad.push(pcm))

    def feed(self, probs: list[float]) -> list[VadEvent]:
        """The decisions for window probabilities (what `push` does after the VAD)."""
        events = []
        for prob in probs:
            if not self.in_speech:
                if self._gap >= 0:
                    self._gap += 1
                    if self._gap >= self.silence_windows:
                        self._gap = -1  # the pause would have ended the turn anyway: not a pause
                self._run = self._run + 1 if prob >= self.threshold else 0
                if self._run >= self.speech_windows:
                    if self._gap >= 0 and self.learn_pauses:
                        # speech resumed soon after a confident end: the end was false, back off to the fixed
                        # window until this falls out of the memory
                        self.pauses.append(self.silence_windows)
                    self.in_speech, self._run = True, 0
                    self._reset_turn()
                    events.append(VadEvent("start", self.window))
            else:
                if prob >= self.confident_prob:
                    self._confident += 1
                if prob < self.low:
                    self._run += 1
                    rising = prob >= self.quiet_prob and prob > self._prev
                    self._clean = 0 if rising else self._clean + 1
                else:
                    if self._run and prob >= self.threshold:
                        self._remember_pause(self._run)
                    self._run = self._clean = 0
                self._prev = prob
                fast = self.confident_silence_windows
                confident_end = (
                    bool(fast) and self._confident >= self.confident_windows and self._clean >= fast
                )
                if self._run >= self.silence_windows or confident_end:
                    quick = self._run < self.silence_windows
                    self.in_speech = False
                    self._gap = self._run if quick else -1
                    self._run = 0
                    events.append(VadEvent("end", self.window, fast=quick))
            self.window += 1
        return events
