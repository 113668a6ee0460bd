"""Voice activity detection for turn-based chat: Silero VAD's ONNX model (shipped in the `silero-vad`
package) run with onnxruntime, and a small turn detector on top of its per-window speech probabilities.

The model takes 512-sample windows at 16 kHz, each preceded by the last 64 samples of the previous window
(its context), plus a recurrent state `[2, 1, 128]`; it returns the speech probability of the window.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import numpy as np
import onnxruntime as ort

RATE = 16000
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

    def push(self, pcm: np.ndarray) -> list[float]:
        """Append 16 kHz float32 samples; returns the probability of every complete 512-sample window."""
        audio = np.concatenate([self._pending, np.asarray(pcm, dtype=np.float32).reshape(-1)])
        probs = []
        n = audio.size // WINDOW
        for i in range(n):
            window = audio[i * WINDOW : (i + 1) * WINDOW]
            x = np.concatenate([self._context, window])[None]
            out, self._state = self.session.run(
                None, {"input": x, "state": self._state, "sr": np.array(RATE, dtype=np.int64)}
            )
            self._context = window[-CONTEXT:]
            probs.append(float(out[0, 0]))
        self._pending = audio[n * WINDOW :]
        return probs


@dataclass
class VadEvent:
    kind: str  # "start" (speech began) | "end" (enough silence after speech)
    window: int  # index of the window where it happened (0 = the stream's first window)


class TurnDetector:
    """Speech start/end from window probabilities.

    Speech starts after `min_speech_ms` of windows at or above `threshold`; it ends after `min_silence_ms`
    of windows below `threshold - 0.15` (hysteresis, as Silero's own iterator does).
    """

    def __init__(self, threshold: float = 0.5, min_silence_ms: int = 800, min_speech_ms: int = 64) -> None:
        self.threshold = threshold
        self.low = max(threshold - 0.15, 0.01)
        self.silence_windows = max(1, round(min_silence_ms * RATE / 1000 / WINDOW))
        self.speech_windows = max(1, round(min_speech_ms * RATE / 1000 / WINDOW))
        self.vad = SileroVad()
        self.in_speech = False
        self.window = 0
        self._run = 0  # consecutive windows counting toward the next change

    def reset(self) -> None:
        self.vad.reset()
        self.in_speech = False
        self._run = 0

    def push(self, pcm: np.ndarray) -> list[VadEvent]:
        events = []
        for prob in self.vad.push(pcm):
            if not self.in_speech:
                self._run = self._run + 1 if prob >= self.threshold else 0
                if self._run >= self.speech_windows:
                    self.in_speech, self._run = True, 0
                    events.append(VadEvent("start", self.window))
            else:
                self._run = self._run + 1 if prob < self.low else 0
                if self._run >= self.silence_windows:
                    self.in_speech, self._run = False, 0
                    events.append(VadEvent("end", self.window))
            self.window += 1
        return events
