"""The worker side of the configuration, as pydantic models: one default per setting, validated once.

- `ModelSettings`, `LoopbackSettings`: sections of `config.toml` (`[model]`, `[loopback]`) that the worker
  uses as they are; `rtc_server.config.AppConfig` holds them.
- `SupervisorSettings`: how the server runs its worker processes (the `[workers]` keys the supervisor reads);
  `rtc_server.config.WorkersConfig` extends it with the keys the front uses itself.
- `TickSettings`: the duplex tick (`[workers]` too); the worker reads it through `WorkerSettings`.
- `WorkerSettings`: everything a worker process needs. The front builds it from the `AppConfig`
  (`rtc_server.app.worker_settings`), the supervisor sends it as JSON (`--settings`), and the worker parses it
  once at start (`inference.worker.main`); the modes and the engine host read its typed fields.

This module imports only pydantic: the front, the media shards and the worker all load it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

REPO_ROOT = Path(__file__).resolve().parent.parent


class StrictModel(BaseModel):
    """A settings model: unknown keys are an error that names the key (a typo never falls back to a default)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSettings(StrictModel):
    path: str = ""  # empty: the embedded default (tiny random-weight model on the CPU)
    # bench/capacity.py's capacity_table.json for this card: workers report it and admission uses it
    capacity_table: str = ""
    cache_dir: str = ".cache/embedded"  # where the embedded default model is built (relative: to the repo)
    max_kv_tokens: int = Field(4096, ge=512)  # KV positions per session; the context window slides past it
    default_voice: str = ""  # WAV file of the default reference voice; empty: a built-in synthetic voice
    # the vocoder's flow on a GPU: float16 halves its weights and per-turn caches (an official option too)
    vocoder_dtype: Literal["float32", "float16"] = "float16"
    # vocoder turns whose per-turn store (~150 MB each at the real size) a GPU worker takes at start-up;
    # 0: one per session. More turns at once grow the store (a copy) while memory lasts.
    vocoder_turns: int = Field(0, ge=0)
    # GPU memory of the vocoder's padded-flow static inputs (one set per conformer cache size, grown to the
    # largest batch seen; `token2wav/flow_graphs.py`): taken while calls run, so the budget counts it up front.
    # Shapes past it run the same padded code without graphs. `bench/capacity.py`'s H100 table ran with 1.
    vocoder_graph_gib: float = Field(1.0, ge=0)
    # on a GPU, the element-wise work around each layer's matmuls in the static LLM/TTS steps runs as kernels
    # fused by torch.compile (compiled once per worker at start-up; `engine/fused.py`)
    fused_layers: bool = True
    # TTS positions each duplex session keeps (~61 kB each at the real size): a spoken turn longer than this
    # (about 12 s of speech at 512) restarts its TTS context
    tts_window: int = Field(512, ge=128, le=4096)
    # GPU memory a worker keeps free for CUDA graphs and activations when it sizes its sessions' caches
    gpu_reserve_gib: float = Field(5.0, ge=0)
    # GPU memory that must still be free after the warm-up, for what live ticks allocate; less: fewer sessions
    gpu_runtime_reserve_gib: float = Field(2.0, ge=0)
    # GPU workers start with PyTorch's expandable segments (PYTORCH_CUDA_ALLOC_CONF, unless that is set already):
    # the allocator's free space is then not cut into pieces too small for a live tick's tensors. On an H100 with
    # 64 sessions' caches, omni ticks ran out of memory with 0.8 GiB free in such pieces; with expandable
    # segments 48 omni and 64 audio calls ran with none (docs/PERFORMANCE.md, twelfth session)
    expandable_segments: bool = True

    @property
    def cache_path(self) -> Path:
        """`cache_dir` as a path (a relative one is relative to the repository)."""
        return REPO_ROOT / self.cache_dir


class LoopbackSettings(StrictModel):
    delay_s: float = Field(1.0, ge=0)  # what the caller hears: its own voice this much later
    unit_ms: int = Field(100, ge=20, le=1000)  # loopback cuts short units so that small delays are possible
    # Known latency of the media path that the loopback delay compensates: the aiortc receive jitter
    # buffer on each side (~80 ms each, fixed prefetch of 4 packets), Opus framing and the outbound
    # track's 20 ms clock. Measured on 127.0.0.1 with aiortc callers (tests/test_rtc_loopback.py); a
    # browser's adaptive jitter buffer is usually a little shorter than aiortc's fixed 80 ms. See README.
    pipeline_latency_s: float = Field(0.2, ge=0)


class SupervisorSettings(StrictModel):
    """How the server runs its worker processes (`inference.supervisor.WorkerSupervisor`)."""

    gpus: list[int] = Field(default_factory=list)  # one worker process per GPU; empty: one CPU worker
    # concurrent sessions per GPU worker; 0: the worker finds its own (inference/capacity.py: a shipped table
    # for its card and context, else 1); either way clamped to what its memory holds
    capacity_per_gpu: int = Field(0, ge=0)
    cpu_capacity: int = Field(4, ge=1)  # concurrent sessions of the CPU worker (embedded default)
    heartbeat_interval_s: float = Field(1.0, gt=0)
    heartbeat_timeout_s: float = Field(5.0, gt=0)  # no pong for this long: the worker is killed and restarted
    start_timeout_s: float = Field(60.0, gt=0)  # a worker that does not say hello in time is restarted
    restart_delay_s: float = Field(0.5, ge=0)
    auth_timeout_s: float = Field(5.0, gt=0)  # a new connection must prove it is our worker within this


class TickSettings(StrictModel):
    """The worker's duplex tick (`inference.worker.UnitTicker`)."""

    # a duplex tick waits up to this long for the units of all sessions of the same (aligned) second (the
    # tests wait for every session's unit with a long gather)
    tick_gather_ms: float = Field(60.0, ge=0, le=60_000)
    # duplex calls are spread over this many grids, shifted by a unit / tick_phases: each tick runs about
    # 1/tick_phases of them, so their units finish sooner (with 2, each phase's tick must fit in half a second)
    tick_phases: int = Field(2, ge=1, le=2)
    # threads that compute the chat units' speech probabilities (Silero VAD, `ChatMode.prepare_units`) before the
    # units' tick runs: the tick's units are split among them (parts of at least 12 sessions, each one batched
    # Silero call per 32 ms window); onnxruntime lets go of the GIL, so the parts run side by side
    prepare_threads: int = Field(8, ge=1, le=64)


class WorkerSettings(TickSettings):
    """Everything a worker process is configured with (sent by the front as JSON, parsed once at start)."""

    model: ModelSettings = Field(default_factory=ModelSettings)
    loopback: LoopbackSettings = Field(default_factory=LoopbackSettings)
    # Sessions the worker serves at once. None: the worker finds its own (an explicit or shipped capacity
    # table, else 1; inference/capacity.py). The front sets `workers.cpu_capacity` (4) for the CPU worker and
    # `workers.capacity_per_gpu` (None when 0) for a GPU worker; a worker started without a number therefore
    # claims one session until it has measured its card. Either way clamped to what its memory holds.
    max_sessions: int | None = Field(None, ge=1)
    voices_dir: str = ""  # uploaded reference voices (`<id>.wav`); empty: only the default voice
    device: str = "cpu"  # torch device; the worker sets it from its `--device`
    # load the model at start; None: where a GPU is really there (`inference.worker.wants_preload`)
    preload_engine: bool | None = None
    # CPU tests of the memory budget: free device memory to assume (None on a GPU, where it is measured)
    device_memory_bytes: int | None = Field(None, ge=0)

    @property
    def tick_gather_s(self) -> float:
        return self.tick_gather_ms / 1000
