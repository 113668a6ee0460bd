"""Capacity benchmark (issue 7): how many real-time duplex sessions one GPU holds with the batched engine.

Real-size random weights (bf16, built on the GPU), the duplex batcher (static LLM/TTS steps as CUDA graphs,
batched encoders, vectorized decisions), the vocoder included. For each N in the list and each mode
(audio-duplex, omni-duplex with one 448x448 frame per unit), N synthetic sessions run ticks of one unit each,
spread over the worker's tick phases as a worker spreads them (`--phases`, default 2: sessions i % 2 on the
whole seconds and on the half seconds, each phase's sessions in lockstep): fixed random audio (and frame), the speak decision forced on half of the units (turns of two
speaking units, then two listening ones; session i is shifted by i units), each session's KV pre-filled with
random keys/values to ~`--context` positions and held there (every tick starts at the same length: the steady
state of the sliding context window), so attention costs what a long call costs.

Per N and mode: unit latency p50/p95/p99 (arrival of the unit's audio to its last PCM, or to `</unit>` when
listening; each phase's tick is due when its units arrive, once per second of audio, and a late tick delays
the next, so overload shows as growing latency), share of units within the 1 s deadline, speaking-unit latency, decision-to-first-PCM,
VRAM peak, busy share (tick time per second of audio). Writes OUT/capacity.json, OUT/capacity.md and
OUT/capacity_table.json (the per-mode capacity a worker reports, see MiniCPMO45/engine/capacity.py).

    python bench/capacity.py --config CONFIG.json --tokenizer DIR --out OUT [--quick]
    python bench/capacity.py --tiny --config TINY/config.json --tokenizer TINY --out OUT --sessions 1,2

`--quick`: N = 1, 16, 64 with fewer units (about 2 minutes). `--tiny`: CPU, float32, small context (tests).
`--count-syncs`: also count, per tick, where the host waited for the GPU (CUDA sync debug mode; `host_syncs.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.host_syncs import SyncSites  # noqa: E402
from bench.realsize import build_random_model, make_model_dir  # noqa: E402
from bench.tick_profile import Mark, profile_ticks  # noqa: E402
from MiniCPMO45.audio.mel_stream import StreamingMel  # noqa: E402
from MiniCPMO45.config import PreprocessorConfig  # noqa: E402
from MiniCPMO45.engine import batcher as batcher_module  # noqa: E402
from MiniCPMO45.engine.batcher import DuplexBatcher  # noqa: E402
from MiniCPMO45.engine.capacity import CapacityTable, ModeCapacity  # noqa: E402
from MiniCPMO45.engine.core import Engine  # noqa: E402
from MiniCPMO45.engine.duplex import DuplexConfig, DuplexState, UnitInput  # noqa: E402
from MiniCPMO45.engine.session import Mode, Session  # noqa: E402
from MiniCPMO45.engine.static_tts import TTS_WINDOW  # noqa: E402
from MiniCPMO45.modules.whisper_slots import WhisperSlotCache  # noqa: E402
from MiniCPMO45.token2wav import Token2Wav  # noqa: E402
from MiniCPMO45.token2wav.random_assets import write_random_assets  # noqa: E402
from MiniCPMO45.tokenizer import MiniCPMOTokenizer  # noqa: E402

REAL_PREPROCESSOR = {"max_slice_nums": 9, "scale_resolution": 448, "image_feature_size": 64}
FULL_SESSIONS = (1, 8, 16, 32, 48, 64, 80)
QUICK_SESSIONS = (1, 16, 64)
MODES = ("audio_duplex", "omni_duplex")
DEADLINE_MS = 1000.0
P95_TARGET_MS = 500.0
# positions one unit may add: omni = <unit> + 64 image rows + 2 + 10 audio + 8 decoded + 2 tail (terminator, </unit>)
# positions a unit may add to a context (room kept below the KV size)
UNIT_POSITIONS = {"audio_duplex": 32, "omni_duplex": 96}


@torch.no_grad()
def fill_empty_parameters(model: torch.nn.Module, seed: int = 0) -> int:
    """`build_random_model` leaves parameters made with `torch.empty` (the resampler's `proj` and attention
    `in_proj_weight`) uninitialized: garbage that can be NaN. Give them random values; returns how many."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    count = 0
    for name, param in model.named_parameters():
        if name.endswith(("resampler.proj", "in_proj_weight")):
            param.normal_(0.0, param.shape[-1] ** -0.5, generator=gen)
            count += 1
    return count


def gib(n: float) -> float:
    return n / 2**30


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values), q)) if values else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Workload:
    """Fixed inputs and scripted decisions: session i speaks in units u with (u + i) % 4 in (0, 1)."""

    def __init__(self, engine: Engine, omni: bool, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.first_audio = (0.1 * rng.standard_normal(16560)).astype(np.float32)
        self.audio = (0.1 * rng.standard_normal(16000)).astype(np.float32)
        side = 448
        self.frame = (
            Image.fromarray(rng.integers(0, 255, size=(side, side, 3), dtype=np.uint8)) if omni else None
        )
        sp = engine.special
        words = engine.tokenizer.encode(" one two three four five six seven")[:6]
        self.open_turn = [sp.speak, *words, sp.chunk_eos]
        self.close_turn = [*words, sp.turn_eos, sp.chunk_eos]
        self.listen = [sp.listen]

    def unit(self, u: int) -> UnitInput:
        audio = self.first_audio if u == 0 else self.audio
        return UnitInput(audio=audio, frames=[self.frame] if self.frame is not None else [])

    def script(self, i: int, u: int) -> list[int]:
        phase = (u + i) % 4
        return self.open_turn if phase == 0 else self.close_turn if phase == 1 else self.listen

    def tick_inputs(self, members: list[int], u: int) -> tuple[list[UnitInput], list[list[int]]]:
        """Unit u's inputs and scripted decisions of the sessions `members` (one phase's tick)."""
        return [self.unit(u) for _ in members], [self.script(i, u) for i in members]


def open_sessions(engine: Engine, n: int, base_len: int, phases: int = 1) -> list[Session]:
    """Session i on tick phase i % phases; as in a worker, the second phase's sessions take the top slots."""
    cfg = DuplexConfig(force_listen_count=0, max_unit_chars=100000, seed=0)
    sessions = []
    for i in range(n):
        s = engine.open_session(Mode.DUPLEX, top_slot=i % phases == 1)
        s.duplex = DuplexState(
            config=cfg, mel=StreamingMel(cfg.chunk_ms, cfg.first_chunk_ms, cfg.cnn_redundancy_ms)
        )
        s.duplex.system_length = base_len
        sessions.append(s)
    # the KV holds random keys/values (filled once at start-up): a call already `base_len` positions long
    engine.cache.lengths[[s.slot for s in sessions]] = base_len
    return sessions


def llm_step_ms(engine: Engine, batcher: DuplexBatcher, sessions: list[Session], base_len: int) -> float:
    """One bare decode step for the sessions (the static step alone, no decisions or host bookkeeping)."""
    slots = [s.slot for s in sessions]
    piece = engine.model.embed_ids([engine.special.listen])
    times = []
    for _ in range(12):
        engine.cache.lengths[slots] = base_len
        sync(engine.model.device)
        t0 = time.perf_counter()
        batcher.llm.feed(slots, [piece] * len(slots), lengths=[base_len] * len(slots))
        sync(engine.model.device)
        times.append((time.perf_counter() - t0) * 1000)
    engine.cache.lengths[slots] = base_len
    return float(np.median(times[2:]))


class TickClock:
    """The worker's timeline in virtual time (ms from the first measured unit's arrival): a phase's tick starts
    when its units arrive (`phase` / `phases` of a unit after the whole second) or, if the worker is still
    busy, when the tick before it ends."""

    def __init__(self, phases: int) -> None:
        self.phases = phases
        self.free_ms = 0.0

    def arrival_ms(self, unit: int, phase: int) -> float:
        return unit * DEADLINE_MS + phase * DEADLINE_MS / self.phases

    def run(self, unit: int, phase: int, tick_ms: float) -> float:
        """Schedule a tick of `tick_ms`; returns how long its units waited for the worker."""
        arrival = self.arrival_ms(unit, phase)
        start = max(arrival, self.free_ms)
        self.free_ms = start + tick_ms
        return start - arrival


def run_case(
    engine: Engine,
    batcher: DuplexBatcher,
    mode: str,
    n: int,
    units: int,
    warmup: int,
    base_len: int,
    phases: int = 1,
    count_syncs: bool = False,
    profile: Path | None = None,
) -> dict[str, object]:
    device = engine.model.device
    syncs = SyncSites()
    work = Workload(engine, omni=mode == "omni_duplex")
    if device.type == "cuda":
        torch.cuda.empty_cache()  # blocks cached by the previous N: less fragmentation for this one
    t_cap = time.perf_counter()
    batcher.warm_up(n, phases=phases)  # as a worker does
    sync(device)
    capture_s = time.perf_counter() - t_cap
    sessions = open_sessions(engine, n, base_len, phases)
    # the worker's tick phases: session i on grid i % phases, shifted by DEADLINE_MS / phases
    groups = [g for g in (list(range(p, n, phases)) for p in range(phases)) if g]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    latencies, speak_lat, listen_lat, first_pcm, ticks = [], [], [], [], []
    stages: dict[str, list[float]] = {}
    speaking_stages: dict[str, list[float]] = {}  # ticks where at least one session spoke
    within = total = 0
    clock = TickClock(phases)
    try:
        for u in range(warmup + units):
            for phase, members in enumerate(groups):
                inputs, scripts = work.tick_inputs(members, u)
                sync(device)
                t0 = time.perf_counter()
                watch = syncs.watching() if count_syncs and u >= warmup else contextlib.nullcontext()
                with watch:
                    outs = batcher.run_units([sessions[i] for i in members], inputs, scripts=scripts)
                sync(device)
                tick_ms = (time.perf_counter() - t0) * 1000
                engine.cache.lengths[[sessions[i].slot for i in members]] = base_len
                if u < warmup:
                    continue
                waited = clock.run(u - warmup, phase, tick_ms)
                ticks.append(tick_ms)
                spoke = any(out.speech is not None for out in outs)
                for name, ms in batcher.timings.items():
                    stages.setdefault(name, []).append(ms)
                    if spoke:
                        speaking_stages.setdefault(name, []).append(ms)
                for out in outs:
                    lat = waited + (out.done_s - t0) * 1000
                    latencies.append(lat)
                    total += 1
                    within += lat <= DEADLINE_MS
                    if out.speech is not None:
                        speak_lat.append(lat)
                        if out.speech.first_pcm_s is not None and out.decision_s is not None:
                            first_pcm.append((out.speech.first_pcm_s - out.decision_s) * 1000)
                    elif out.result.prefilled:
                        listen_lat.append(lat)
        if profile is not None:
            profile_case(batcher, work, sessions, groups, warmup + units, base_len, profile, f"{mode}, N={n}")
        step_ms = llm_step_ms(engine, batcher, sessions, base_len)
    finally:
        for s in sessions:
            s.duplex.end_speech()  # the vocoder turns go with their sessions
            engine.close_session(s)
    row: dict[str, object] = {
        "llm_step_ms": step_ms,
        "mode": mode,
        "sessions": n,
        "units_measured": total,
        "unit_p50_ms": pct(latencies, 50),
        "unit_p95_ms": pct(latencies, 95),
        "unit_p99_ms": pct(latencies, 99),
        "within_deadline": within / total if total else None,
        "speaking_p50_ms": pct(speak_lat, 50),
        "speaking_p95_ms": pct(speak_lat, 95),
        "listening_p50_ms": pct(listen_lat, 50),
        "decision_to_first_pcm_p50_ms": pct(first_pcm, 50),
        "decision_to_first_pcm_p95_ms": pct(first_pcm, 95),
        "tick_p50_ms": pct(ticks, 50),
        "busy_share": sum(ticks) / (units * DEADLINE_MS) if ticks else None,
        "phases": phases,
        "graph_capture_s": capture_s,
        **{f"stage_{name}_p50": pct(v, 50) for name, v in stages.items()},
        **{f"speaking_stage_{name}_p50": pct(v, 50) for name, v in speaking_stages.items()},
        "context_positions": base_len,
    }
    if count_syncs:
        row["host_syncs_per_tick"] = syncs.total / len(ticks) if ticks else None
        row["host_sync_sites_per_tick"] = syncs.per(len(ticks))
    if device.type == "cuda":
        row["vram_peak_gib"] = gib(torch.cuda.max_memory_allocated(device))
        row["vram_reserved_gib"] = gib(torch.cuda.memory_reserved(device))
    return row


def profile_case(  # noqa: PLR0913
    batcher: DuplexBatcher,
    work: Workload,
    sessions: list[Session],
    groups: list[list[int]],
    first_unit: int,
    base_len: int,
    dest: Path,
    title: str,
) -> None:
    """`--profile N`: two more units of every phase under `torch.profiler`, back to back, with the tick's
    stages (prefill, generate, speak) and their parts (mel, audio encoder, vision tower, LLM steps, vocoder)
    marked (`bench/tick_profile.py`)."""
    engine = batcher.engine
    marks = [
        Mark(batcher, "prefill", "prefill"),
        Mark(batcher, "generate", "generate"),
        Mark(batcher, "speak", "speak"),
        Mark(batcher_module, "push_many", "mel", top=False),
        Mark(batcher.audio, "encode_sessions", "audio encoder", top=False),
        Mark(batcher.llm, "feed", "LLM step", top=False),
    ]
    if batcher.vision is not None:
        marks.append(Mark(batcher.vision, "embeds", "vision tower", top=False))
    if batcher.speech.vocoder is not None:
        marks.append(Mark(batcher.speech.vocoder, "push_codes_batch", "vocoder", top=False))

    def tick(j: int) -> None:
        unit, members = first_unit + j // len(groups), groups[j % len(groups)]
        inputs, scripts = work.tick_inputs(members, unit)
        batcher.run_units([sessions[i] for i in members], inputs, scripts=scripts)
        sync(engine.model.device)
        engine.cache.lengths[[sessions[i].slot for i in members]] = base_len

    print(profile_ticks(tick, 2 * len(groups), marks, dest, f"{title}, {2 * len(groups)} ticks"), flush=True)


def fits(row: dict[str, object]) -> bool:
    p95, share = row.get("unit_p95_ms"), row.get("within_deadline")
    return p95 is not None and share is not None and p95 <= P95_TARGET_MS and share >= 1.0  # type: ignore[operator]


def fmt(v: object, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown(results: dict[str, object]) -> str:
    head = (
        "| mode | N | unit p50 | p95 | p99 | within 1 s | speaking p50 | decision→PCM p50 | p95 | tick p50 "
        "| busy | VRAM peak GiB |"
    )
    lines = [
        f"Card: {results.get('gpu', results['device'])}; torch {results['torch']}; context ~{results['context']} "
        f"positions; {results['units']} measured units per N (+{results['warmup']} warm-up); "
        f"{results.get('phases', 1)} tick phase(s); TTS window {results.get('tts_window', '-')}. Times in ms.",
        "",
        head,
        "|" + " --- |" * 12,
    ]
    for r in results["rows"]:  # type: ignore[union-attr]
        if "skipped" in r:
            lines.append(f"| {r['mode']} | {r['sessions']} | skipped: {r['skipped']} |" + " |" * 10)
            continue
        cells = [
            r["mode"],
            r["sessions"],
            fmt(r["unit_p50_ms"]),
            fmt(r["unit_p95_ms"]),
            fmt(r["unit_p99_ms"]),
            fmt(r["within_deadline"], 3),
            fmt(r["speaking_p50_ms"]),
            fmt(r["decision_to_first_pcm_p50_ms"]),
            fmt(r["decision_to_first_pcm_p95_ms"]),
            fmt(r["tick_p50_ms"]),
            fmt(r["busy_share"], 2),
            fmt(r.get("vram_peak_gib"), 2),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    # no finalize stage: a unit's tail is fed by the next tick's prefill
    stage_names = ("prefill_ms", "generate_ms", "speak_ms", "tts_ms", "vocoder_ms", "llm_step_ms")
    captions = (
        "Tick stages, p50 ms (speak = TTS + vocoder of all speaking sessions; vocoder: Token2Wav.push_codes_batch;"
        " llm_step_ms: one bare static decode step of the N sessions, for comparison with generate):",
        "The same for the ticks in which at least one session spoke:",
    )
    for caption, prefix in zip(captions, ("stage_", "speaking_stage_"), strict=True):
        lines += ["", caption, "", "| mode | N | " + " | ".join(stage_names) + " |"]
        lines.append("|" + " --- |" * (2 + len(stage_names)))
        for r in results["rows"]:  # type: ignore[union-attr]
            if "skipped" not in r:
                cells = [fmt(r.get(f"{prefix}{s}_p50", r.get(s))) for s in stage_names]
                lines.append(f"| {r['mode']} | {r['sessions']} | " + " | ".join(cells) + " |")
    cap = results["capacity"]
    lines += ["", f"Capacity (p95 ≤ {P95_TARGET_MS:.0f} ms, every unit within 1 s): {json.dumps(cap)}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="full-size (or, with --tiny, tiny) config.json")
    ap.add_argument("--tokenizer", required=True, help="folder with the tokenizer files")
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="N = 1, 16, 64, fewer units (~2 min)")
    ap.add_argument("--tiny", action="store_true", help="CPU, float32, small context (tests)")
    ap.add_argument("--sessions", help="comma-separated N list (overrides the default)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--units", type=int, help="measured units per N (default 8, quick 4)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--context", type=int, help="KV positions per session (default 4096, tiny 64)")
    ap.add_argument("--device", help="default cuda (cpu with --tiny)")
    ap.add_argument("--no-graphs", action="store_true", help="eager static steps (comparison)")
    ap.add_argument("--vocoder-graphs", action="store_true", help="token2wav windows as CUDA graphs")
    ap.add_argument(
        "--vocoder-graph-gib",
        type=float,
        default=1.0,
        help="memory budget of those graphs (a worker: 1, model.vocoder_graph_gib)",
    )
    ap.add_argument("--vocoder-dtype", default="float16", choices=("float32", "float16"), help="flow dtype")
    ap.add_argument(
        "--reserve-gib", type=float, default=6.0, help="GPU memory kept free when sizing the KV cache"
    )
    ap.add_argument(
        "--budget-s", type=float, default=480.0, help="skip the remaining N after this many seconds"
    )
    ap.add_argument("--no-vocoder", action="store_true", help="stop at the TTS codes (vocoder cost apart)")
    ap.add_argument("--no-fused", action="store_true", help="eager element-wise work in the static steps")
    ap.add_argument(
        "--tts-window",
        type=int,
        default=TTS_WINDOW,
        help="TTS positions per session (the worker's model.tts_window)",
    )
    ap.add_argument(
        "--phases", type=int, default=2, help="tick phases, as the worker's workers.tick_phases (default 2)"
    )
    ap.add_argument(
        "--vocoder-turns",
        type=int,
        help="vocoder turns reserved up front (default: the largest N; the workload has at most half speaking)",
    )
    ap.add_argument(
        "--count-syncs",
        action="store_true",
        help="count the host's waits for the GPU per tick, by call site (CUDA sync debug mode; slows ticks)",
    )
    ap.add_argument(
        "--profile",
        type=int,
        help="N: after level N of each mode, two units of every phase under torch.profiler (OUT/profile-MODE-N.*)",
    )
    args = ap.parse_args(argv)
    if args.phases < 1:
        raise SystemExit("--phases must be at least 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if args.count_syncs and device.type != "cuda":
        raise SystemExit("--count-syncs needs a CUDA device (it counts CUDA synchronizations)")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    sessions_list = (
        [int(x) for x in args.sessions.split(",")]
        if args.sessions
        else list(QUICK_SESSIONS if args.quick else FULL_SESSIONS)
    )
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r} (choose from {MODES})")
    units = args.units or (4 if args.quick else 8)
    context = args.context or (64 if args.tiny else 4096)
    results: dict[str, object] = {
        "device": str(device),
        "torch": torch.__version__,
        "context": context,
        "units": units,
        "warmup": args.warmup,
        "graphs": not args.no_graphs and device.type == "cuda",
        "vocoder": not args.no_vocoder,
        "vocoder_dtype": args.vocoder_dtype,
        "fused_layers": not args.no_fused and device.type == "cuda",
        "phases": args.phases,
        "tts_window": args.tts_window,
        "count_syncs": args.count_syncs,
    }
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)

    scratch = Path(tempfile.mkdtemp(prefix="capacity-"))  # model folder and vocoder assets stay out of OUT
    model_dir = make_model_dir(args.config, args.tokenizer, scratch / "model-dir")
    if not args.tiny:
        pre_path = model_dir / "preprocessor_config.json"
        pre = json.loads(pre_path.read_text()) if pre_path.is_file() else {}
        pre.update(REAL_PREPROCESSOR)
        pre_path.write_text(json.dumps(pre))
    t0 = time.perf_counter()
    model = build_random_model(model_dir / "config.json", device=device, dtype=dtype)
    results["filled_empty_parameters"] = fill_empty_parameters(model)
    sync(device)
    results["build_s"] = time.perf_counter() - t0

    assets = write_random_assets(
        scratch / "token2wav-assets", size="tiny" if args.tiny else "real", with_onnx=False
    )
    vocoder = Token2Wav.from_assets(
        assets,
        n_timesteps=5,
        device=device,
        use_graphs=args.vocoder_graphs and device.type == "cuda",
        flow_dtype=getattr(torch, args.vocoder_dtype) if device.type == "cuda" else torch.float32,
    )
    if vocoder.flow_graphs is not None:
        vocoder.flow_graphs.max_bytes = int(args.vocoder_graph_gib * 2**30)
    results["vocoder_graphs"] = vocoder.flow_graphs is not None
    rng = np.random.default_rng(0)
    voice = vocoder.prepare_prompt(
        rng.integers(0, 6561, size=150),
        rng.standard_normal((1, 300, 80)).astype(np.float32) * 0.5,
        rng.standard_normal((1, 192)).astype(np.float32),
    )
    # every session may speak at once: the vocoder's per-turn store for the largest N is taken before the
    # KV cache is sized from what is left (a worker does the same at start-up)
    want = max(sessions_list)
    if not args.no_vocoder:
        vocoder.reserve_turns(voice, args.vocoder_turns or want)
    if vocoder.flow_graphs is not None:
        results["vocoder_store_gib"] = gib(vocoder.flow_graphs.store.nbytes)
    # one KV cache for the largest N that fits: slots of `context` + two units' positions. Every tick starts
    # each session at `base_len` again (the sliding window's steady state: a long call's context stays at the
    # window; the cost of the window's occasional shift is not included)
    unit_room = max(UNIT_POSITIONS[m] for m in modes)
    max_len = -(-(context + 2 * unit_room) // 64) * 64
    base_len = max(context - unit_room, 1)
    cfg = model.config.llm
    per_slot = (
        2 * cfg.num_hidden_layers * cfg.num_key_value_heads * max_len * cfg.head_dim * model.dtype.itemsize
    )
    # per session besides the LLM KV: the TTS slot cache and the Whisper slot cache (the whole position table)
    tts_window = args.tts_window
    tcfg = model.config.tts
    tts_bytes = 2 * tcfg.num_hidden_layers * tcfg.hidden_size * tts_window * model.dtype.itemsize
    whisper_bytes = WhisperSlotCache.bytes_per_slot(model.config.audio, model.dtype)
    extra = tts_bytes + whisper_bytes
    slots = want
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # vocoder, graph pools, activations of the largest prefill; plus the vocoder graphs' own budget
        reserve = int((args.reserve_gib + (args.vocoder_graph_gib if args.vocoder_graphs else 0)) * 2**30)
        slots = max(1, min(want, int((free - reserve) // (per_slot + extra))))
    results.update(
        kv_slots=slots,
        kv_max_len=max_len,
        kv_gib_per_session=gib(per_slot),
        other_gib_per_session=gib(extra),
    )
    engine = Engine(
        model,
        MiniCPMOTokenizer.from_dir(model_dir),
        max_sessions=slots,
        max_len=max_len,
        preprocessor=PreprocessorConfig.from_file(model_dir),
    )
    gen = torch.Generator(device=device).manual_seed(0)
    for k, v in zip(engine.cache.keys, engine.cache.values, strict=True):
        k.normal_(generator=gen)
        v.normal_(generator=gen)

    batcher = DuplexBatcher(
        engine,
        None if args.no_vocoder else vocoder,
        voice,
        use_graphs=False if args.no_graphs else None,
        tts_window=tts_window,
        fused=not args.no_fused,
    )
    if device.type == "cuda":
        results["vram_after_setup_gib"] = gib(torch.cuda.memory_allocated(device))
    results["setup_s"] = time.perf_counter() - t_start
    print(f"setup {results['setup_s']:.1f} s, KV slots {slots} x {max_len} positions", flush=True)

    rows: list[dict[str, object]] = []
    for n in sessions_list:  # N outermost: a spent time budget still leaves both modes measured
        for mode in modes:
            if time.perf_counter() - t_start > args.budget_s:
                rows.append(
                    {"mode": mode, "sessions": n, "skipped": f"time budget of {args.budget_s:.0f} s spent"}
                )
                print(f"{mode} N={n}: skipped (time budget)", flush=True)
                continue
            if n > slots:
                rows.append({"mode": mode, "sessions": n, "skipped": f"KV memory holds {slots} sessions"})
                print(f"{mode} N={n}: skipped (KV memory holds {slots})", flush=True)
                continue
            try:
                dest = out / f"profile-{mode}-{n}" if args.profile == n else None
                row = run_case(
                    engine,
                    batcher,
                    mode,
                    n,
                    units,
                    args.warmup,
                    base_len,
                    args.phases,
                    args.count_syncs,
                    dest,
                )
            except torch.cuda.OutOfMemoryError as exc:
                torch.cuda.empty_cache()
                row = {
                    "mode": mode,
                    "sessions": n,
                    "skipped": f"out of memory: {str(exc).splitlines()[0][:120]}",
                }
            except Exception as exc:  # one failing N must not lose the others
                traceback.print_exc()
                row = {"mode": mode, "sessions": n, "skipped": f"{type(exc).__name__}: {exc}"[:200]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            results["rows"] = rows
            (out / "capacity.json").write_text(json.dumps(results, indent=1))
    results["rows"] = rows
    capacity = {}
    for mode in modes:
        ok = [int(r["sessions"]) for r in rows if r["mode"] == mode and "skipped" not in r and fits(r)]  # type: ignore[arg-type]
        capacity[mode] = max(ok) if ok else 0
    results["capacity"] = capacity
    results["total_s"] = time.perf_counter() - t_start
    table = CapacityTable(
        card=str(results.get("gpu", device)),
        context=context,
        modes={m: ModeCapacity(sessions=c) for m, c in capacity.items()},
    )
    (out / "capacity_table.json").write_text(table.model_dump_json(indent=1))
    (out / "capacity.json").write_text(json.dumps(results, indent=1))
    md = markdown(results)
    (out / "capacity.md").write_text(md)
    print()
    print(md, end="")
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"total {results['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
