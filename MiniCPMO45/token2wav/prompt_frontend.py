"""Reference voice (a WAV file) -> the three inputs of `Token2Wav.prepare_prompt`.

* prompt tokens: the S3 speech tokenizer (`speech_tokenizer_v2_25hz.onnx`, run in onnxruntime with a
  [1, 128, T] log-mel and its length) on the first channel at 16 kHz;
* speaker embedding: CAM++ (`campplus.onnx`, [1, T, 80] fbank -> [1, 192]) on the mean-subtracted Kaldi
  fbank of the same 16 kHz audio;
* prompt mel: the 24 kHz flow mel of the channel average, padded (last frame repeated) or trimmed to
  2 frames per prompt token.

Results are cached per reference by the SHA-256 of the file's bytes. The ONNX sessions run on the CPU with
one intra-op thread, as the official package runs CAM++.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ..audio.rates import MODEL_INPUT_RATE, SPEECH_RATE
from ..audio.resample import resample
from ..audio.wav import read_wav
from .assets import AssetLayout
from .features import flow_prompt_mel, kaldi_fbank, s3_log_mel
from .model import fit_prompt_mel

TOKEN_RATE_UP = 2  # mel frames per speech token


@dataclass(frozen=True)
class PromptFeatures:
    tokens: np.ndarray  # (n,) int64
    prompt_mel: np.ndarray  # (1, 2n, 80) float32
    spk_embedding: np.ndarray  # (1, 192) float32


def _session(path: Path) -> ort.InferenceSession:
    if not Path(path).is_file():
        raise FileNotFoundError(f"ONNX model {path} not found")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


class SpeechTokenizer:
    """S3 tokenizer v2 (25 Hz) in onnxruntime: (128, T) log-mel -> token ids."""

    def __init__(self, path: Path) -> None:
        self.session = _session(path)
        inputs = self.session.get_inputs()
        if len(inputs) != 2:
            raise ValueError(f"{path}: expected inputs (mel [1,128,T], length [1]), found {len(inputs)}")
        self.mel_name, self.length_name = inputs[0].name, inputs[1].name

    def __call__(self, log_mel: np.ndarray) -> np.ndarray:
        mel = np.ascontiguousarray(log_mel, dtype=np.float32)[None]
        out = self.session.run(
            None, {self.mel_name: mel, self.length_name: np.array([mel.shape[2]], np.int32)}
        )
        return np.asarray(out[0]).reshape(-1).astype(np.int64)


class SpeakerEncoder:
    """CAM++ in onnxruntime: (T, 80) mean-subtracted fbank -> (1, 192)."""

    def __init__(self, path: Path) -> None:
        self.session = _session(path)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, fbank: np.ndarray) -> np.ndarray:
        feats = np.ascontiguousarray(fbank, dtype=np.float32)[None]
        return np.asarray(self.session.run(None, {self.input_name: feats})[0], dtype=np.float32).reshape(
            1, -1
        )


class PromptFrontend:
    def __init__(self, tokenizer_onnx: str | Path, speaker_onnx: str | Path, cache_size: int = 16) -> None:
        self.tokenizer = SpeechTokenizer(Path(tokenizer_onnx))
        self.speaker = SpeakerEncoder(Path(speaker_onnx))
        self.cache_size = cache_size
        self._cache: OrderedDict[str, PromptFeatures] = OrderedDict()

    @classmethod
    def from_layout(cls, layout: AssetLayout, cache_size: int = 16) -> PromptFrontend:
        if layout.tokenizer_onnx is None or layout.speaker_onnx is None:
            raise FileNotFoundError(
                f"{layout.folder} lacks speech_tokenizer_v2_25hz.onnx and/or campplus.onnx, "
                "which a new reference voice needs"
            )
        return cls(layout.tokenizer_onnx, layout.speaker_onnx, cache_size)

    def features(self, channels: np.ndarray, sample_rate: int) -> PromptFeatures:
        """(channels, n) float32 audio -> prompt features (no caching)."""
        if channels.ndim != 2 or channels.shape[1] == 0:
            raise ValueError("reference audio must be a non-empty (channels, samples) array")
        channels = np.ascontiguousarray(channels, dtype=np.float32)
        first_16k = torch.from_numpy(resample(channels[0], sample_rate, MODEL_INPUT_RATE))
        tokens = self.tokenizer(s3_log_mel(first_16k).numpy())
        if tokens.size == 0:
            raise ValueError("reference audio is too short to yield any speech token")
        fbank = kaldi_fbank(first_16k)
        spk = self.speaker((fbank - fbank.mean(dim=0, keepdim=True)).numpy())
        mean_24k = torch.from_numpy(resample(channels.mean(axis=0), sample_rate, SPEECH_RATE))
        mel = fit_prompt_mel(flow_prompt_mel(mean_24k), tokens.size * TOKEN_RATE_UP)
        return PromptFeatures(tokens, mel.numpy(), spk)

    def prepare(self, wav: str | Path | bytes) -> PromptFeatures:
        """A WAV file (path or bytes) -> prompt features, cached by the content hash."""
        data = Path(wav).read_bytes() if isinstance(wav, str | Path) else bytes(wav)
        key = hashlib.sha256(data).hexdigest()
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        channels, rate = read_wav(data)
        result = self.features(channels, rate)
        self._cache[key] = result
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return result
