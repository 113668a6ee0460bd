"""The model a worker process serves: one loaded engine shared by all its sessions and modes.

`get_host(settings)` creates it lazily, the first time a model mode opens (a GPU worker preloads it, with the
duplex graphs, right after hello: `inference.worker.preload_engine`), and returns the same object to every later
session (mode switches reuse it, so switching loads nothing). It holds:

- `engine`: `MiniCPMO45.engine.core.Engine` (LLM, vision, audio encoders, one slot KV cache for every
  session of the worker);
- `tts`: the speech-token LM (its per-session cache slots live in the batcher's `StaticTTS`, `tts_window`
  positions each, at the session's KV slot);
- `vocoder`: `Token2Wav` (25 Hz codes -> 24 kHz PCM), shared read-only;
- `duplex_batcher()`: the `DuplexBatcher` that runs one unit of every duplex session per tick (static-shape
  LLM/TTS steps, CUDA graphs on a GPU), made on first use;
- `frontend`: the reference-voice front end (ONNX speech tokenizer + speaker encoder), if the asset folder
  has its networks;
- voices: `voice(voice_id)` -> `Voice` (the 16 kHz audio for the LLM and the vocoder's prompt cache),
  cached per id; ids are content hashes, so one cache entry per distinct recording.

Embedded default (no `model_path`): `MiniCPMO45.tiny_builder.ensure_tiny_model` builds a tiny random-weight
checkpoint into `cache_dir`, with tiny random token2wav assets (`token2wav/random_assets.py`, including the
tiny ONNX front-end networks) under `assets/token2wav`, and everything loads through the same loaders as a
real checkpoint. The default voice is a synthetic 3 s signal (or `default_voice` from the settings).

All methods run in the worker's mode thread (inference/README.md): no locking is needed.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from inference.capacity import GIB, WorkerCapacity, limit_to_count, limit_to_memory, planned_capacity
from inference.settings import WorkerSettings
from MiniCPMO45.audio.rates import MODEL_INPUT_RATE
from MiniCPMO45.audio.wav import pcm16_wav
from MiniCPMO45.config import PreprocessorConfig
from MiniCPMO45.engine.batcher import DuplexBatcher
from MiniCPMO45.engine.core import Engine
from MiniCPMO45.model import MiniCPMO
from MiniCPMO45.modules.tts import MiniCPMTTS
from MiniCPMO45.modules.whisper_slots import WhisperSlotCache
from MiniCPMO45.tiny_builder import ensure_tiny_model
from MiniCPMO45.token2wav import PromptCache, Token2Wav, detect_layout
from MiniCPMO45.token2wav.prompt_frontend import PromptFrontend
from MiniCPMO45.token2wav.random_assets import write_random_assets
from MiniCPMO45.tokenizer import MiniCPMOTokenizer

log = logging.getLogger("inference.engine_host")
TOKEN2WAV_SUBDIR = Path("assets") / "token2wav"
DEFAULT_VOICE_ID = "default"


@dataclass
class Voice:
    """A reference voice: 16 kHz mono audio for the LLM, and the vocoder's prompt cache."""

    voice_id: str
    audio_16k: np.ndarray
    prompt: PromptCache


def synthetic_voice(seconds: float = 3.0, rate: int = MODEL_INPUT_RATE) -> np.ndarray:
    """A deterministic voice-like signal (a 140 Hz harmonic series with a slow syllable envelope)."""
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140.0 * (1.0 + 0.05 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    wave = sum(np.sin(k * phase) / k for k in range(1, 9))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t) ** 2
    return (0.3 * wave * envelope / np.abs(wave).max()).astype(np.float32)


def _token2wav_step(dest: Path, seed: int) -> None:
    write_random_assets(dest / TOKEN2WAV_SUBDIR, size="tiny", seed=seed)


def embedded_model_dir(cache_dir: str | Path) -> Path:
    """The embedded default checkpoint (tiny random LLM/TTS + tiny random token2wav), built on first use."""
    return ensure_tiny_model(cache_dir, extra_steps=[_token2wav_step], extra_key="token2wav-tiny-1")


GPU_HOST_THREADS = 2  # torch's CPU threads in a GPU worker


class EngineHost:
    def __init__(self, settings: WorkerSettings) -> None:
        started = time.perf_counter()
        self.settings = settings
        model_settings = settings.model
        device = settings.device
        self.device = torch.device(
            device if device.startswith("cuda") and torch.cuda.is_available() else "cpu"
        )
        if self.device.type == "cpu":
            # Leave a core to the worker's IPC loop (heartbeats) and the server on small machines.
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
        else:
            # A GPU worker's host work is small tensors and index lists: a pool of every core only spins
            # (measured on a 16-core H100 host: the mode thread's pool took 1.2 cores beside it at 42 calls),
            # and several workers share the host with the media shards.
            torch.set_num_threads(GPU_HOST_THREADS)
        self.embedded = not model_settings.path
        if self.embedded:
            self.model_dir = embedded_model_dir(model_settings.cache_path)
        else:
            self.model_dir = Path(model_settings.path)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.max_kv_tokens = model_settings.max_kv_tokens
        model = MiniCPMO.from_pretrained(self.model_dir, dtype=dtype, device=self.device)
        if model.tts is None:
            raise RuntimeError(f"{self.model_dir}: the checkpoint has no TTS (init_tts is false)")
        layout = detect_layout(self.model_dir / TOKEN2WAV_SUBDIR)
        # On a GPU the vocoder windows replay as CUDA graphs, one padded batch per round, and the flow runs
        # in `vocoder_dtype` (float16 by default there); the CPU keeps float32.
        cuda = self.device.type == "cuda"
        flow_dtype = getattr(torch, model_settings.vocoder_dtype) if cuda else torch.float32
        self.vocoder = Token2Wav.from_layout(
            layout, device=self.device, use_graphs=cuda, flow_dtype=flow_dtype
        )
        if self.vocoder.flow_graphs is not None:
            self.vocoder.flow_graphs.max_bytes = int(model_settings.vocoder_graph_gib * GIB)
        try:
            self.frontend: PromptFrontend | None = PromptFrontend.from_layout(layout)
        except FileNotFoundError as exc:
            log.warning("no reference-voice front end: %s", exc)
            self.frontend = None
        self.voices_dir = Path(settings.voices_dir) if settings.voices_dir else None
        self._voices: dict[str, Voice] = {}
        self.default_voice = self._load_default_voice()
        # The sessions' caches are sized last, from what the memory left after the weights holds.
        self.capacity = self._budget(model, settings)
        self.max_sessions = self.capacity.slots
        self.engine = Engine(
            model,
            MiniCPMOTokenizer.from_dir(self.model_dir),
            max_sessions=self.max_sessions,
            max_len=self.max_kv_tokens,
            preprocessor=PreprocessorConfig.from_file(self.model_dir),
        )
        self.tts: MiniCPMTTS = model.tts
        # the vocoder's per-turn store is taken now, not mid-call: one turn per session unless `vocoder_turns`
        # says fewer (a card whose memory holds the sessions' KV but not every session speaking at once), in one
        # half of the store per tick phase
        self.vocoder.reserve_turns(
            self.default_voice.prompt, self._vocoder_turns(), phases=self.settings.tick_phases
        )
        self._batcher: DuplexBatcher | None = None
        self.load_s = time.perf_counter() - started
        log.info("engine host: %s on %s in %.1f s", self.model_dir, self.device, self.load_s)

    def _vocoder_turns(self, sessions: int | None = None) -> int:
        sessions = sessions or self.max_sessions
        return min(self.settings.model.vocoder_turns or sessions, sessions)

    def _budget(self, model: MiniCPMO, settings: WorkerSettings) -> WorkerCapacity:
        """The sessions this worker claims (inference/capacity.py), clamped to what its memory holds."""
        from inference.modes import mode_names as served_modes  # the modes import this module

        cuda = self.device.type == "cuda"
        plan = planned_capacity(
            explicit_table=settings.model.capacity_table,
            configured=settings.max_sessions,
            card=torch.cuda.get_device_name(self.device) if cuda else None,
            context=self.max_kv_tokens,
            modes=served_modes(),
        )
        free = self._free_device_bytes(settings)
        if free is None:
            return plan
        per_session = self._session_bytes(model)
        turn = self._vocoder_turn_bytes()
        turns = settings.model.vocoder_turns
        # fixed vocoder turns are paid once; otherwise each session brings its own turn. The vocoder's graph
        # inputs grow while calls run, up to their budget: counted now.
        flow = self.vocoder.flow_graphs
        fixed = (turns * turn if turns else 0) + (flow.max_bytes if flow is not None and flow.graphs else 0)
        capacity = limit_to_memory(
            plan,
            free - fixed,
            per_session + (0 if turns else turn),
            int(settings.model.gpu_reserve_gib * GIB),
        )
        log.info(
            "capacity: %d sessions (%s); %.0f MiB per session, %.1f GiB free after the weights",
            capacity.slots,
            capacity.source,
            (per_session + (0 if turns else turn)) / (1 << 20),
            free / GIB,
        )
        return capacity

    def _free_device_bytes(self, settings: WorkerSettings) -> int | None:
        """Device memory free now; on the CPU only the `device_memory_bytes` setting (the budget's CPU test)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            return int(torch.cuda.mem_get_info(self.device)[0])
        return settings.device_memory_bytes or None

    def _session_bytes(self, model: MiniCPMO) -> int:
        """Memory of one session's caches, from caches built for one session: LLM KV at `max_kv_tokens`, the
        TTS slot at `tts_window` positions (the only TTS cache: `StaticTTS`'s), and the streaming audio
        encoder's slot."""
        llm = model.llm.new_cache(1, self.max_kv_tokens)
        assert model.tts is not None
        tts = model.tts.new_cache(1, self.settings.model.tts_window)
        tensors = [*llm.keys, *llm.values, *tts.keys, *tts.values]
        whisper = WhisperSlotCache.bytes_per_slot(model.config.audio, model.dtype)
        return sum(t.numel() * t.element_size() for t in tensors) + whisper

    def _vocoder_turn_bytes(self) -> int:
        """Memory one reserved vocoder turn takes (the CUDA-graph path's store; nothing on the CPU)."""
        if self.device.type != "cuda":
            return 0
        before = torch.cuda.memory_allocated(self.device)
        self.vocoder.reserve_turns(self.default_voice.prompt, 1)
        return max(torch.cuda.memory_allocated(self.device) - before, 0)

    def duplex_batcher(self) -> DuplexBatcher:
        """The batcher of the duplex sessions; on a GPU its graphs for up to `max_sessions` rows are
        captured here, once (seconds), so the first ticks don't pay for them. If the card runs out of memory
        doing so, the sessions' caches shrink by an eighth and the capture starts again: the worker claims
        only what it could allocate."""
        while self._batcher is None:
            try:
                batcher: DuplexBatcher | None = self._warm_batcher()
            except torch.OutOfMemoryError:
                if self.device.type != "cuda" or self.max_sessions <= 1:
                    raise
                batcher = None
            if batcher is None:
                # out of the handler first: its traceback holds the failed capture's tensors, which the
                # smaller caches need (on the H100 the retry itself ran out of memory while they lived)
                self._shrink(max(1, self.max_sessions * 7 // 8), "out of memory warming up")
                continue
            short = self._runtime_shortfall()
            if short > 0 and self.max_sessions > 1:
                # live ticks allocate beyond the warm-up's graphs: keep room for them, or calls fail mid-way
                per_session = (self.capacity.per_session_mib or 1024) * (1 << 20)
                del batcher
                self._shrink(
                    max(1, self.max_sessions - 1 - int(short // per_session)),
                    f"{short / GIB:.1f} GiB short of the runtime reserve after warming up",
                )
                continue
            self._batcher = batcher
        return self._batcher

    def _runtime_shortfall(self) -> int:
        """Bytes missing, after the warm-up, from the memory live ticks need (`gpu_runtime_reserve_gib`): free on
        the card once the allocator's ordinary cache is returned. Memory held in the graphs' private pools does
        not count: live ticks' eager tensors cannot use it (on an H100 a worker that counted it ran 48 omni calls
        out of memory with 4 GiB "held" and 0.2 GiB free)."""
        if self.device.type != "cuda":
            return 0
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info(self.device)[0]
        want = int(self.settings.model.gpu_runtime_reserve_gib * GIB)
        return max(want - free, 0)

    def _warm_batcher(self) -> DuplexBatcher:
        cuda = self.device.type == "cuda"
        batcher = DuplexBatcher(
            self.engine,
            self.vocoder,
            self.default_voice.prompt,
            use_graphs=cuda,
            fused=self.settings.model.fused_layers,
            tts_window=self.settings.model.tts_window,
        )
        if cuda:
            started = time.perf_counter()
            batcher.warm_up(self.max_sessions, phases=self.settings.tick_phases)
            log.info(
                "duplex graphs captured in %.1f s; %s", time.perf_counter() - started, self.memory_report()
            )
        return batcher

    def memory_report(self) -> str:
        """One line on the GPU's memory (allocated now and at peak, held by the allocator, free on the card) and
        the vocoder's graph inputs; empty on the CPU. Only reads counters: safe from another thread."""
        if self.device.type != "cuda":
            return ""
        mib = 1 << 20
        flow = self.vocoder.flow_graphs
        vocoder = (
            f"; vocoder graphs {len(flow.chunks)}, inputs {flow.bytes_used / mib:.0f} MiB" if flow else ""
        )
        return (
            f"GPU memory: allocated {torch.cuda.memory_allocated(self.device) / mib:.0f} MiB "
            f"(peak {torch.cuda.max_memory_allocated(self.device) / mib:.0f}), "
            f"held {torch.cuda.memory_reserved(self.device) / mib:.0f} MiB, "
            f"free on the card {torch.cuda.mem_get_info(self.device)[0] / mib:.0f} MiB{vocoder}"
        )

    def _shrink(self, sessions: int, why: str) -> None:
        """Rebuild the sessions' caches for fewer sessions (at start-up, before any session opened)."""
        log.warning("%s %d sessions; trying %d", why, self.max_sessions, sessions)
        model, tokenizer, preprocessor = (
            self.engine.model,
            self.engine.tokenizer,
            self.engine.processor.config,
        )
        if model.tts is not None:  # the dropped warm-up's TTS steps (a cache per slot, graphs): free them now
            model.tts.static = None
        del self.engine
        if self.vocoder.flow_graphs is not None:
            self.vocoder.flow_graphs.release()  # what the failed warm-up captured and grew
        gc.collect()
        torch.cuda.empty_cache()
        self.capacity = limit_to_count(self.capacity, sessions)
        self.max_sessions = self.capacity.slots
        self.engine = Engine(model, tokenizer, self.max_sessions, self.max_kv_tokens, preprocessor)

    # ---- voices ---------------------------------------------------------------------------------------------
    def _load_default_voice(self) -> Voice:
        path = self.settings.model.default_voice
        if path:
            wav = Path(path).read_bytes()
        else:
            wav = pcm16_wav(synthetic_voice())
        return self._make_voice(DEFAULT_VOICE_ID, wav)

    def _make_voice(self, voice_id: str, wav: bytes) -> Voice:
        from MiniCPMO45.audio.resample import resample
        from MiniCPMO45.audio.wav import read_mono

        mono, rate = read_mono(wav)
        audio = resample(mono, rate, MODEL_INPUT_RATE)
        if self.frontend is None:
            raise RuntimeError("this checkpoint's token2wav folder has no front-end ONNX networks")
        feats = self.frontend.prepare(wav)
        prompt = self.vocoder.prepare_prompt(feats.tokens, feats.prompt_mel, feats.spk_embedding)
        return Voice(voice_id, audio, prompt)

    def voice(self, voice_id: str | None) -> Voice:
        """The voice with this id (a file `<voices_dir>/<id>.wav` written by the server), or the default."""
        if not voice_id or voice_id == DEFAULT_VOICE_ID:
            return self.default_voice
        hit = self._voices.get(voice_id)
        if hit is not None:
            return hit
        if self.voices_dir is None or not voice_id.isalnum():
            raise KeyError(f"unknown voice {voice_id!r}")
        path = self.voices_dir / f"{voice_id}.wav"
        if not path.is_file():
            raise KeyError(f"unknown voice {voice_id!r}")
        voice = self._make_voice(voice_id, path.read_bytes())
        self._voices[voice_id] = voice
        return voice


_HOST: EngineHost | None = None


def get_host(settings: WorkerSettings) -> EngineHost:
    """The worker's engine host, created on first use (one model per worker process)."""
    global _HOST
    if _HOST is None:
        _HOST = EngineHost(settings)
    return _HOST
