"""End-to-end load benchmark: the server (`run.py`, as a subprocess) under N real WebRTC callers.

    python bench/e2e.py --mode audio_duplex|omni_duplex|chat|loopback|mixed [--calls 1,8,16,32,48,64]
        [--seconds 30] [--warmup 5] [--client-procs 4] [--gpus 0] [--model-dir DIR | --build-realsize DIR]
        [--capacity N] [--max-kv-tokens K] [--vocoder-turns T] [--capacity-table FILE] [--out DIR] [--write-doc]

For each N, N aiortc callers (spread over --client-procs spawned processes) call the server on 127.0.0.1 with
speech (espeak-ng, looped; a synthetic speech-like signal without espeak-ng), plus a 640x480 moving pattern in
`omni_duplex`; duplex calls use `{"force": "speak"}`, chat calls type a turn every --turn-interval seconds;
`mixed`: half of the calls chat, the others audio_duplex, on the same server (a row per mode and level).
Once every call runs (first `metrics` event) and after the warm-up, a steady window of --seconds is measured:
the `metrics` events (lag, round trip), `error` events, the received audio frames' arrival gaps and missing
share, the server's CPU (media processes vs workers, from /proc) and the GPU (nvidia-smi). Callers hang up
between levels. Writes OUT/e2e-<mode>.json and the server's log; prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import fractions
import json
import multiprocessing as mp
import os
import platform
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, VideoStreamTrack

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.realsize import build_realsize  # noqa: E402
from bench.units_report import TICK_STAGES  # noqa: E402
from tests.rtc_client import ESPEAK, FRAME, RATE, Call, PacedAudioTrack, speech_signal  # noqa: E402

MODES = ("audio_duplex", "omni_duplex", "chat", "loopback")
MIXED = ("chat", "audio_duplex")  # `--mode mixed`: half of the calls each
FRAME_S = 0.020
VOICED_PEAK = 300  # s16 peak above which a received frame counts as sound
WORKER_MARK = "inference.worker"  # in a worker process's command line
CLK_TCK = os.sysconf("SC_CLK_TCK")
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 only, never a proxy


# ---- results and their aggregation (pure functions) ----


@dataclass
class CallResult:
    """One caller's view of the window (built in the caller process)."""

    admitted: bool = False
    failure: str = ""
    lag_ms: list[float] = field(default_factory=list)
    roundtrip_ms: list[float] = field(default_factory=list)
    batch_sessions: list[float] = field(default_factory=list)  # calls that shared the tick of each unit
    compute_ms: list[float] = field(default_factory=list)  # the worker's time for each unit
    # the mode's split of compute_ms and the worker's waits (`STAGES`; `merged_units` a count), for the units
    # that have each
    stage_ms: dict[str, list[float]] = field(default_factory=dict)
    # chat: the same for the units whose tick sent a reply's first speech (they carry `turn_to_speech_ms`)
    turn_stage_ms: dict[str, list[float]] = field(default_factory=dict)
    early_replies: int = 0  # chat: turns answered by a reply started a unit before their end
    early_dropped: int = 0  # ... and replies started early, then dropped (the caller spoke on)
    error_codes: list[str] = field(default_factory=list)
    gaps_ms: list[float] = field(default_factory=list)
    late_ms: list[float] = field(default_factory=list)  # per frame: after the previous frame's audio ran out
    frames: int = 0  # audio frames received in the window
    missing_share: float = 1.0
    voiced_share: float = 0.0
    turns_sent: int = 0
    text_after_turn_ms: list[float] = field(default_factory=list)
    audio_after_turn_ms: list[float] = field(default_factory=list)
    mode: str = ""
    # the window's `metrics` events as they came, each with `received_at` (the caller's monotonic clock, which
    # is the server's on one host): written out per level for a look at single ticks (`units-*.jsonl`)
    unit_events: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Row:
    mode: str
    asked: int
    admitted: int
    window_s: float
    units: int  # metrics events received in the window, all calls
    lag_ms: dict[str, float | None]  # p50, p95, max over all units of all calls
    roundtrip_ms: dict[str, float | None]
    errors: int
    error_codes: dict[str, int]
    failures: dict[str, int]  # callers that did not get going, by the step that failed
    failure_examples: dict[str, str]
    frames_received: int
    gap_p99_ms: float | None
    gap_max_ms: float | None
    late_p99_ms: float | None  # frames that came after the previous frame's audio ran out (`late_ms`)
    missing_pct: float | None  # mean over admitted calls
    voiced_pct: float | None
    turns_sent: int
    text_after_turn_p50_ms: float | None
    audio_after_turn_p50_ms: float | None
    # graph captures and compiles the server logged while the calls joined, and inside the window (0: no live
    # tick stalled on one)
    stalls_joining: int
    stalls_window: int
    media_cpu_pct: float  # % of one core: the server tree without its workers
    media_cpu_per_call_pct: float | None
    worker_cpu_pct: float
    gpu_busy_pct: float | None
    gpu_mem_mib: float | None
    # the ticks: calls sharing a unit's tick, and the worker's time per unit (p50, p95, max)
    batch_sessions: dict[str, float | None] = field(default_factory=dict)
    compute_ms: dict[str, float | None] = field(default_factory=dict)
    stage_ms: dict[str, dict[str, float | None]] = field(default_factory=dict)  # per stage, p50/p95/max
    turn_stage_ms: dict[str, dict[str, float | None]] = field(default_factory=dict)  # chat: the turns' units
    early_replies: int = 0
    early_dropped: int = 0
    # % of one core by thread name ("worker:mode", "worker:ipc", "media:media-loop"...)
    thread_cpu_pct: dict[str, float] = field(default_factory=dict)


# `UnitMetrics` fields: the mode's stages, then where a unit waited in the worker (before its tick, behind the
# session's earlier units) and its tick's whole run
STAGES = (
    *TICK_STAGES,
    "vad_ms",
    "turn_to_speech_ms",
    "handoff_ms",
    "queue_ms",
    "prepare_ms",
    "merged_units",
    "tick_wait_ms",
    "tick_ms",
    "grid_ms",
)


def stage_values(metrics: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """Each stage's values over the `metrics` events that have it."""
    return {name: [m[name] for m in metrics if m.get(name) is not None] for name in STAGES}


def stage_stats(per_call: Sequence[dict[str, list[float]]]) -> dict[str, dict[str, float | None]]:
    """p50/p95/max of each stage over the calls' values (`stage_values`), for the stages that have any."""
    return {
        name: stat3(values)
        for name in STAGES
        if (values := [x for stages in per_call for x in stages.get(name, [])])
    }


def pctl(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


def stat3(values: Sequence[float]) -> dict[str, float | None]:
    return {"p50": pctl(values, 50), "p95": pctl(values, 95), "max": max(values, default=None)}


def frame_gaps_ms(arrivals: Sequence[float], t0: float, t1: float) -> list[float]:
    """Times without a frame inside [t0, t1]: gaps between consecutive arrivals, the window's edges included
    (a window without any frame is one gap of its whole length)."""
    inside = [t for t in arrivals if t0 <= t <= t1]
    return (np.diff(np.array([t0, *inside, t1])) * 1000).tolist()


def late_ms(arrivals: Sequence[float], durations_s: Sequence[float], t0: float, t1: float) -> list[float]:
    """How long after the previous frame's audio ran out each frame inside [t0, t1] arrived (0: in time): the
    jitter a caller's buffer must cover, whatever the packet length (40 ms packets arrive 40 ms apart, and are
    not late for it, though their inter-arrival gap is 40 ms)."""
    out = []
    for i in range(1, len(arrivals)):
        if t0 <= arrivals[i] <= t1 and arrivals[i - 1] >= t0:
            out.append(max(0.0, (arrivals[i] - arrivals[i - 1] - durations_s[i - 1]) * 1000))
    return out


def missing_share(durations_s: Sequence[float], window_s: float) -> float:
    """Share of the window's 20 ms frames that never came (audio received, in 20 ms frames, vs window / 20 ms)."""
    expected = window_s / FRAME_S
    return min(1.0, max(0.0, 1.0 - sum(durations_s) / FRAME_S / expected))


def text_latency(timed: list[tuple[float, dict[str, Any]]], sent: float) -> float | None:
    """ms from a typed turn to the first `text` of a turn newer than any seen before it."""
    before = [e["turn"] for at, e in timed if at < sent and e.get("type") == "text"]
    for at, e in timed:
        if at >= sent and e.get("type") == "text" and e["turn"] > max(before, default=-1):
            return (at - sent) * 1000
    return None


def audio_onset(arrivals: Sequence[float], voiced: Sequence[bool], sent: float) -> float | None:
    """ms from a typed turn to the first sounding frame after a silent one (both after the turn)."""
    silent_seen = False
    for at, v in zip(arrivals, voiced, strict=True):
        if at < sent:
            continue
        if v and silent_seen:
            return (at - sent) * 1000
        silent_seen = silent_seen or not v
    return None


def failure_key(failure: str) -> str:
    """ "connect: TimeoutError: not connected ..." -> "connect: TimeoutError"."""
    return ": ".join(failure.split(": ")[:2])


def summarize(
    mode: str,
    asked: int,
    calls: list[CallResult],
    window_s: float,
    cpu: dict[str, float],
    stalls: tuple[int, int] = (0, 0),
    all_admitted: int | None = None,
) -> Row:
    """One row of a level. `all_admitted`: the calls sharing the server's CPU (a mixed level's other mode's too),
    for the media CPU per call; default: this row's."""
    ok = [c for c in calls if c.admitted]
    sharing = len(ok) if all_admitted is None else all_admitted
    lag = [x for c in ok for x in c.lag_ms]
    rt = [x for c in ok for x in c.roundtrip_ms]
    gaps = [x for c in ok for x in c.gaps_ms]
    errors = Counter(code for c in calls for code in c.error_codes)
    failures = Counter(failure_key(c.failure) for c in calls if c.failure)
    failures["caller process lost"] += asked - len(calls)
    examples = {failure_key(c.failure): c.failure for c in calls if c.failure}
    return Row(
        mode=mode,
        asked=asked,
        admitted=len(ok),
        window_s=window_s,
        units=len(lag),
        lag_ms=stat3(lag),
        roundtrip_ms=stat3(rt),
        errors=sum(errors.values()),
        error_codes=dict(errors),
        failures={k: v for k, v in failures.items() if v},
        failure_examples=examples,
        frames_received=sum(c.frames for c in ok),
        gap_p99_ms=pctl(gaps, 99),
        gap_max_ms=max(gaps, default=None),
        late_p99_ms=pctl([x for c in ok for x in c.late_ms], 99),
        missing_pct=100 * float(np.mean([c.missing_share for c in ok])) if ok else None,
        voiced_pct=100 * float(np.mean([c.voiced_share for c in ok])) if ok else None,
        turns_sent=sum(c.turns_sent for c in ok),
        text_after_turn_p50_ms=pctl([x for c in ok for x in c.text_after_turn_ms], 50),
        audio_after_turn_p50_ms=pctl([x for c in ok for x in c.audio_after_turn_ms], 50),
        stalls_joining=stalls[0],
        stalls_window=stalls[1],
        media_cpu_pct=cpu["media"],
        media_cpu_per_call_pct=cpu["media"] / sharing if sharing else None,
        worker_cpu_pct=cpu["worker"],
        gpu_busy_pct=cpu.get("gpu_busy"),
        gpu_mem_mib=cpu.get("gpu_mem"),
        thread_cpu_pct=cpu.get("threads", {}),
        batch_sessions=stat3([x for c in ok for x in c.batch_sessions]),
        compute_ms=stat3([x for c in ok for x in c.compute_ms]),
        stage_ms=stage_stats([c.stage_ms for c in ok]),
        turn_stage_ms=stage_stats([c.turn_stage_ms for c in ok]),
        early_replies=sum(c.early_replies for c in ok),
        early_dropped=sum(c.early_dropped for c in ok),
    )


# ---- the callers (spawned processes) ----


class LoopingAudioTrack(PacedAudioTrack):
    """PacedAudioTrack that repeats its signal for as long as the call lasts."""

    def chunk(self, index: int) -> np.ndarray:
        start = (index * FRAME) % (self.signal.size - FRAME)
        return self.signal[start : start + FRAME]


class PatternVideoTrack(VideoStreamTrack):
    """A 640x480 camera at `fps`: a bright bar sweeping over a colour gradient (images shared by all calls)."""

    images: list[np.ndarray] = []

    def __init__(self, fps: float) -> None:
        super().__init__()
        self.fps, self._start, self._index = fps, None, 0
        if not PatternVideoTrack.images:
            ramp = np.tile(np.linspace(0, 200, 640, dtype=np.uint8), (480, 1))
            base = np.stack([ramp, ramp[:, ::-1], np.full_like(ramp, 90)], -1)
            for i in range(16):
                img = base.copy()
                img[:, i * 40 : i * 40 + 60] = 255
                PatternVideoTrack.images.append(img)

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        self._start = self._start or time.monotonic()
        wait = self._start + self._index / self.fps - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        frame = av.VideoFrame.from_ndarray(self.images[self._index % len(self.images)], format="rgb24")
        frame.pts, frame.time_base = int(self._index * 90000 / self.fps), fractions.Fraction(1, 90000)
        self._index += 1
        return frame


@dataclass
class FrameClock:
    """Takes the Recorder's place: when each received audio frame arrived, its length, whether it sounded."""

    arrivals: list[float] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)
    voiced: list[bool] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def start(self, track: Any) -> None:
        self.task = asyncio.ensure_future(self._run(track))

    async def _run(self, track: Any) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                self.arrivals.append(time.monotonic())
                self.durations.append(frame.samples / frame.sample_rate)
                self.voiced.append(bool(np.abs(frame.to_ndarray()).max() > VOICED_PEAK))

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


@dataclass
class CallerJob:
    url: str
    mode: str
    calls: int
    signal: np.ndarray
    ready_timeout: float
    turn_interval: float
    video_fps: float
    chat_turns: str = "typed"  # chat: "typed" (text every turn_interval) or "spoken" (the signal's speech)
    # added to every call's `options` (`--runs` levels with KEY=VALUE)
    session_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Caller:
    call: Call
    clock: FrameClock
    timed: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    failure: str = ""
    connected: bool = False
    turns: list[float] = field(default_factory=list)

    @property
    def admitted(self) -> bool:
        """Connected, and told by a `session` event that it is active."""
        active = any(e.get("type") == "session" and e.get("phase") == "active" for _, e in self.timed)
        return self.connected and active

    def result(self, t0: float, t1: float, mode: str = "") -> CallResult:
        window = [e for at, e in self.timed if t0 <= at <= t1]
        metrics = [e for e in window if e.get("type") == "metrics"]
        c = self.clock
        inside = [i for i, at in enumerate(c.arrivals) if t0 <= at <= t1]
        turns = [ts for ts in self.turns if t0 <= ts <= t1]
        text = [text_latency(self.timed, ts) for ts in turns]
        audio = [audio_onset(c.arrivals, c.voiced, ts) for ts in turns]
        return CallResult(
            mode=mode,
            admitted=self.admitted,
            failure=self.failure,
            lag_ms=[m["lag_ms"] for m in metrics],
            roundtrip_ms=[m["roundtrip_ms"] for m in metrics],
            batch_sessions=[m["batch_sessions"] for m in metrics if m.get("batch_sessions") is not None],
            compute_ms=[m["compute_ms"] for m in metrics if m.get("compute_ms") is not None],
            stage_ms=stage_values(metrics),
            turn_stage_ms=stage_values([m for m in metrics if m.get("turn_to_speech_ms") is not None]),
            early_replies=sum(1 for m in metrics if m.get("early_reply")),
            early_dropped=sum(1 for m in metrics if m.get("early_dropped")),
            error_codes=[e.get("code", "?") for _, e in self.timed if e.get("type") == "error"],
            gaps_ms=frame_gaps_ms(c.arrivals, t0, t1),
            late_ms=late_ms(c.arrivals, c.durations, t0, t1),
            frames=len(inside),
            missing_share=missing_share([c.durations[i] for i in inside], t1 - t0),
            voiced_share=float(np.mean([c.voiced[i] for i in inside])) if inside else 0.0,
            turns_sent=len(turns),
            unit_events=[
                {**e, "received_at": at}
                for at, e in self.timed
                if t0 <= at <= t1 and e.get("type") == "metrics"
            ],
            text_after_turn_ms=[x for x in text if x is not None],
            audio_after_turn_ms=[x for x in audio if x is not None],
        )


async def open_call(job: CallerJob, index: int = 0) -> Caller:
    clock = FrameClock()
    call = Call(job.url, job.signal, recorder=clock)  # type: ignore[arg-type]  # duck-typed Recorder
    caller = Caller(call, clock)
    signal = job.signal
    if job.mode == "chat" and job.chat_turns == "spoken":  # the calls' turns staggered over the period
        signal = np.roll(signal, -int(signal.size * index / max(job.calls, 1)))
    call.track = LoopingAudioTrack(signal)
    call.pc.getSenders()[0].replaceTrack(call.track)
    if job.mode == "omni_duplex":
        call.pc.addTrack(PatternVideoTrack(job.video_fps))
    call.channel.on("message", lambda data: caller.timed.append((time.monotonic(), json.loads(data))))
    options = {"force": "speak"} if job.mode.endswith("duplex") else None
    if job.mode == "chat":
        options = {"force": "speak", "max_new_tokens": 48}
    if job.session_options:
        options = {**(options or {}), **job.session_options}
    step = "offer"
    try:
        await asyncio.wait_for(call.start_json(job.mode, **({"options": options} if options else {})), 120)
        step = "connect"
        await call.wait_connected(60)
        caller.connected = True
        step = "admission"
        await wait_admitted(call, job.ready_timeout)
        step = "first metrics"  # the mode runs (on a GPU: the engine is loaded)
        await call.wait_event("metrics", timeout=job.ready_timeout)
    except Exception as exc:
        caller.failure = f"{step}: {type(exc).__name__}: {str(exc)[:160]}"
    return caller


async def wait_admitted(call: Call, timeout: float) -> None:
    """Until the call is told it is active; a refusal (an `error` event, e.g. `queue_full`) fails at once
    instead of after the whole timeout, so a level larger than the server's capacity reports its admitted calls."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in call.events:
            if event.get("type") == "session" and event.get("phase") == "active":
                return
            if event.get("type") == "error":
                raise RuntimeError(f"refused ({event.get('code')})")
        await asyncio.sleep(0.05)
    raise TimeoutError("no session active event")


async def run_callers(job: CallerJob, index: int, ready: Any, go: Any, window: Any, results: Any) -> None:
    callers = await asyncio.gather(*(open_call(job, i) for i in range(job.calls)))
    ready.put(index)
    while not go.is_set():
        await asyncio.sleep(0.05)
    t0, t1 = window[0], window[1]
    if job.mode == "chat" and job.chat_turns == "typed":  # typed turns, staggered over the calls
        step = job.turn_interval / max(job.calls, 1)
        next_turn = [time.monotonic() + 0.5 + i * step for i in range(job.calls)]
        while time.monotonic() < t1:
            for i, c in enumerate(callers):
                if not c.failure and time.monotonic() >= next_turn[i]:
                    c.turns.append(time.monotonic())
                    c.call.send({"type": "text", "text": "Tell me something about the weather today."})
                    next_turn[i] += job.turn_interval
            await asyncio.sleep(0.02)
    await asyncio.sleep(max(0.0, t1 - time.monotonic()) + 0.2)
    results.put([asdict(c.result(t0, t1, job.mode)) for c in callers])
    for c in callers:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(c.call.hang_up(), 10)
    await asyncio.gather(*(c.call.close() for c in callers), return_exceptions=True)


def caller_process(job: CallerJob, index: int, ready: Any, go: Any, window: Any, results: Any) -> None:
    asyncio.run(run_callers(job, index, ready, go, window, results))


def synthetic_speech(seconds: float = 3.0) -> np.ndarray:
    """A voiced, gliding harmonic signal in ~4 syllables a second (when espeak-ng is missing)."""
    t = np.arange(int(RATE * seconds)) / RATE
    phase = 2 * np.pi * np.cumsum(140 + 30 * np.sin(2 * np.pi * 0.7 * t)) / RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 12))
    x = voice * np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 2
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def caller_signal(
    mode: str, out: Path, chat_turns: str = "typed", period_s: float = 10.0, speech_file: str | None = None
) -> np.ndarray:
    """What each caller's microphone plays, looped: speech and a pause; for chat with typed turns silence (a
    quiet microphone keeps the VAD from barging in), with spoken turns one sentence every `period_s`."""
    if mode == "chat" and chat_turns == "typed":
        return np.zeros(RATE, np.float32)
    try:
        if speech_file:
            speech = speech_signal(Path(speech_file))
        else:
            speech = speech_signal(out / "speech.wav") if Path(ESPEAK).exists() else synthetic_speech()
    except (OSError, subprocess.CalledProcessError):
        speech = synthetic_speech()
    pause_s = max(2.0, period_s - speech.size / RATE) if mode == "chat" else 1.5  # between sentences
    return np.concatenate([speech, np.zeros(int(pause_s * RATE), np.float32)])


# ---- the server under load ----


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    config: dict[str, Any]
    config_dir: Path
    log: Path


# what the server logs when a live tick stalls on a CUDA graph capture, a torch.compile, the CUDA allocator or a
# garbage collection
STALL = re.compile(
    r"graph \d+ captured in|compiled \d+ graph|CUDA allocator retries|by \d+ garbage collection"
)


def stalls_logged(log: Path) -> int:
    """Graph captures and compiles the server has logged so far."""
    try:
        return sum(1 for line in log.read_text(errors="replace").splitlines() if STALL.search(line))
    except OSError:
        return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_text(config: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]  # JSON scalars/lists are valid TOML
    return "\n".join(lines) + "\n"


def server_config(args: argparse.Namespace, port: int) -> dict[str, dict[str, Any]]:
    from rtc_server.config import RtcSettings

    calls = max(args.calls)
    workers: dict[str, Any] = {"gpus": args.gpus, "cpu_capacity": args.capacity or calls}
    if args.capacity:  # else a GPU worker sizes itself (the product's default)
        workers["capacity_per_gpu"] = args.capacity
    model: dict[str, Any] = {"path": str(args.model_dir or "")}
    for key in ("max_kv_tokens", "vocoder_turns", "capacity_table"):
        if getattr(args, key) is not None:
            model[key] = getattr(args, key)
    # every caller comes from 127.0.0.1: lift the per-client-address limits where the server has them
    limits = {"max_pending_per_client": calls, "offers_per_minute": 60 * calls}
    config: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": port, "http": True},
        "workers": workers,
        "queue": {"max_length": 0},
        "model": model,
        "rtc": {k: v for k, v in limits.items() if k in RtcSettings.model_fields},
    }
    for item in args.set:  # --set section.key=value (value as JSON)
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        config.setdefault(section, {})[name] = json.loads(value)
    return config


def get_json(url: str, timeout: float = 5.0) -> Any:
    with HTTP.open(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def start_server(args: argparse.Namespace, out: Path, tag: str) -> Server:
    port = free_port()
    config = server_config(args, port)
    path = Path(tempfile.mkdtemp(prefix="e2e-")) / "server.toml"
    path.write_text(toml_text(config))
    with open(out / f"server-{tag}.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "run.py"), "--config", str(path)],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = Server(proc, f"http://127.0.0.1:{port}", config, path.parent, out / f"server-{tag}.log")
    started = time.monotonic()
    deadline = started + args.startup_timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"run.py exited with {proc.returncode}; see {out / f'server-{tag}.log'}")
        with contextlib.suppress(OSError, ValueError):
            get_json(f"{server.url}/api/info")
            workers = get_json(f"{server.url}/api/admin/status")["workers"]
            # up, and done loading the model and sizing its caches (a warming-up worker admits nobody)
            if workers and all(w["up"] and not w["warming_up"] for w in workers):
                capacity = [(w["capacity"], w["capacity_source"]) for w in workers]
                # the start-up time: the GPU worker's load, captures and compiles (one per step shape)
                print(f"server ready after {time.monotonic() - started:.0f} s:", capacity, flush=True)
                return server
        if time.monotonic() > deadline:
            stop_server(server)
            raise TimeoutError(f"server not up within {args.startup_timeout:.0f} s")
        time.sleep(0.5)


def stop_server(server: Server, grace: float = 30.0) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)  # its own session: run.py and its workers
            server.proc.wait(10)
    shutil.rmtree(server.config_dir, ignore_errors=True)


def wait_drained(server: Server, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError):
            if not get_json(f"{server.url}/api/admin/status")["sessions"]:
                return
        time.sleep(0.5)


# ---- CPU (/proc) and GPU (nvidia-smi) ----


def tree_cpu(root: int) -> dict[int, tuple[bool, float]]:
    """pid -> (is a worker, utime + stime in s) for `root` and all its descendants. A worker's own children (the
    GPU worker's Inductor compile processes) count as the worker's, not as the media side's."""
    stats: dict[int, tuple[int, float, bool]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
        stats[int(entry.name)] = (int(fields[1]), cpu, WORKER_MARK in cmd)
    worker_side = {root: root in stats and stats[root][2]}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        kids = [pid for pid, (ppid, _, _) in stats.items() if ppid == parent and pid not in worker_side]
        for pid in kids:
            worker_side[pid] = stats[pid][2] or worker_side[parent]
        frontier += kids
    return {pid: (worker, stats[pid][1]) for pid, worker in worker_side.items() if pid in stats}


def thread_cpu(pids: dict[int, tuple[bool, float]]) -> dict[str, float]:
    """CPU seconds by thread name, summed over the processes: "worker:mode", "worker:ipc", "media:media-loop"...
    (the server names its own threads; aiortc's and FFmpeg's keep theirs, usually "python")."""
    out: dict[str, float] = {}
    for pid, (worker, _) in pids.items():
        for task in Path(f"/proc/{pid}/task").glob("*") if Path(f"/proc/{pid}/task").is_dir() else []:
            try:
                name = (task / "comm").read_text().strip()
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            key = f"{'worker' if worker else 'media'}:{name}"
            out[key] = out.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def start_profilers(
    args: argparse.Namespace, pids: dict[int, tuple[bool, float]], n: int
) -> list[subprocess.Popen[bytes]]:
    """--profile DIR: py-spy samples every worker and the busiest media process through the window (raw
    collapsed stacks per thread, `DIR/<n>-worker-<pid>.txt`), when py-spy is on the PATH."""
    spy = shutil.which("py-spy")
    if not args.profile or spy is None:
        return []
    dest = Path(args.profile)
    dest.mkdir(parents=True, exist_ok=True)
    media = [pid for pid, (worker, _) in pids.items() if not worker]
    chosen = [(pid, "worker") for pid, (worker, _) in pids.items() if worker]
    chosen += [(max(media, key=lambda pid: pids[pid][1]), "media")] if media else []
    procs = []
    for pid, kind in chosen:
        out = dest / f"{n}-{kind}-{pid}.txt"
        cmd = [spy, "record", "-p", str(pid), "-d", str(int(args.seconds)), "-f", "raw", "-o", str(out)]
        cmd += ["--threads", "--idle"]  # idle too: the mode thread's waits for the GPU count
        if args.profile_native and kind == "worker":
            # C/C++ frames too (CUDA calls, the allocators); py-spy must pause the process for each sample
            cmd += ["--native", "-r", "50"]
        else:
            cmd += ["--nonblocking", "-r", "200"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def thread_split(before: dict[str, float], after: dict[str, float], s: float) -> dict[str, float]:
    """% of one core by thread name between two samples (threads that ended in between are not counted)."""
    used = {k: 100 * (v - before.get(k, 0.0)) / s for k, v in after.items()}
    return {k: round(v, 1) for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v >= 0.5}


def cpu_split(before: dict[int, tuple[bool, float]], after: dict[int, tuple[bool, float]], s: float) -> dict:
    """% of one core used by the media side (everything but workers) and by the workers between two samples."""
    used = {"media": 0.0, "worker": 0.0}
    for pid, (worker, cpu) in after.items():
        used["worker" if worker else "media"] += cpu - before.get(pid, (worker, 0.0))[1]
    return {k: 100 * v / s for k, v in used.items()}


class GpuSampler(threading.Thread):
    """nvidia-smi every second: (time, mean utilization %, max memory used MiB) of the listed GPUs."""

    def __init__(self, gpus: list[int]) -> None:
        super().__init__(daemon=True)
        self.cmd = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
        if gpus:
            self.cmd.append("--id=" + ",".join(map(str, gpus)))
        self.samples: list[tuple[float, float, float]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(1.0):
            try:
                text = subprocess.run(self.cmd, capture_output=True, text=True, timeout=5, check=True).stdout
                rows = [[float(x) for x in line.split(",")] for line in text.strip().splitlines()]
                self.samples.append(
                    (time.monotonic(), float(np.mean([r[0] for r in rows])), max(r[1] for r in rows))
                )
            except (OSError, subprocess.SubprocessError, ValueError):
                return  # no nvidia-smi (or no GPU): n/a

    def window(self, t0: float, t1: float) -> dict[str, float]:
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        return (
            {"gpu_busy": float(np.mean([s[1] for s in inside])), "gpu_mem": max(s[2] for s in inside)}
            if inside
            else {}
        )


def gpu_name() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        names = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.split("\n")
        if names[0].strip():
            return names[0].strip()
    code = "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        name = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
        return name.strip() or "none"
    return "none"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# ---- one level ----


def caller_jobs(mode: str, n: int, procs: int) -> list[tuple[str, int]]:
    """(mode, calls) of each caller process: n calls spread over `procs` processes; `mixed`: half of the calls
    (and of the processes) chat, the others audio_duplex."""
    if mode != "mixed":
        return [(mode, n // procs + (i < n % procs)) for i in range(min(procs, n))]
    half = n // 2
    first = max(1, procs // 2)
    return [
        job
        for m, k, p in ((MIXED[0], half, first), (MIXED[1], n - half, max(1, procs - first)))
        if k
        for job in caller_jobs(m, k, p)
    ]


def run_level(
    args: argparse.Namespace, server: Server, n: int, sigs: dict[str, np.ndarray], gpu: GpuSampler
) -> list[Row]:
    """One level: a row, or for `mixed` a row per mode (the server's CPU and GPU figures are the level's)."""
    ctx = mp.get_context("spawn")
    ready, results, go, window = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Array("d", 2)
    procs = []
    for i, (mode, share) in enumerate(caller_jobs(args.mode, n, args.client_procs)):
        job = CallerJob(
            server.url,
            mode,
            share,
            sigs[mode],
            args.ready_timeout,
            args.turn_interval,
            args.video_fps,
            args.chat_turns,
            getattr(args, "session_options", {}),
        )
        procs.append(
            ctx.Process(target=caller_process, args=(job, i, ready, go, window, results), daemon=True)
        )
        procs[-1].start()
    calls: list[CallResult] = []
    stalls_before = stalls_logged(server.log)
    try:
        deadline, waiting = time.monotonic() + args.ready_timeout + 240, len(procs)
        while waiting and time.monotonic() < deadline and any(p.is_alive() for p in procs):
            with contextlib.suppress(queue.Empty):
                ready.get(timeout=0.5)
                waiting -= 1
        t0 = time.monotonic() + args.warmup
        window[0], window[1] = t0, t0 + args.seconds
        go.set()
        time.sleep(max(0.0, t0 - time.monotonic()))
        stalls_at_t0 = stalls_logged(server.log)
        before = tree_cpu(server.proc.pid)
        threads_before = thread_cpu(before)
        profilers = start_profilers(args, before, n)
        time.sleep(args.seconds)
        for prof in profilers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                prof.wait(30)
        after = tree_cpu(server.proc.pid)
        stalls = (stalls_at_t0 - stalls_before, stalls_logged(server.log) - stalls_at_t0)
        cpu = cpu_split(before, after, args.seconds) | gpu.window(t0, t0 + args.seconds)
        cpu["threads"] = thread_split(threads_before, thread_cpu(after), args.seconds)
        deadline, pending = time.monotonic() + 120, len(procs)
        while pending and time.monotonic() < deadline:
            alive = any(p.is_alive() for p in procs)  # read before the queue: a proc puts, then exits
            try:
                calls += [CallResult(**r) for r in results.get(timeout=0.5 if alive else 2.0)]
                pending -= 1
            except queue.Empty:
                if not alive:
                    break
    finally:
        go.set()
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
                p.join(10)
    options = getattr(args, "session_options", {})
    tag = "".join(f"-{k}={json.dumps(v)}" for k, v in options.items())  # an A/B's levels keep their own files
    with open(Path(args.out) / f"units-{args.mode}{tag}-{n}.jsonl", "w") as f:
        for i, c in enumerate(calls):
            f.writelines(json.dumps({"call": i, "mode": c.mode, **e}) + "\n" for e in c.unit_events)
    wait_drained(server)
    if server.proc.poll() is not None:
        raise RuntimeError(f"the server exited ({server.proc.returncode}) during the {n}-call level")
    if args.mode != "mixed":
        return [summarize(args.mode, n, calls, args.seconds, cpu, stalls)]
    admitted = sum(c.admitted for c in calls)
    return [
        summarize(
            f"{mode} (mixed)",
            sum(k for m, k in caller_jobs(args.mode, n, args.client_procs) if m == mode),
            [c for c in calls if c.mode == mode],
            args.seconds,
            cpu,
            stalls,
            admitted,
        )
        for mode in MIXED
    ]


# ---- report ----


def fmt(x: float | None, digits: int = 0) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def header(meta: dict[str, Any]) -> str:
    return (
        f"`{meta['mode']}`"
        + (f" (session options {json.dumps(meta['options'])})" if meta.get("options") else "")
        + f", {meta['date']}: CPU {meta['cpu']} ({meta['logical_cpus']} logical CPUs), "
        f"GPU {meta['gpu']}; server `run.py` ({meta['workers']}), {meta['client_procs']} caller process(es) on "
        f"the same host; {meta['seconds']:.0f} s window after a {meta['warmup']:.0f} s warm-up"
        + (
            f"; chat turns {meta['chat_turns']}."
            if "chat_turns" in meta and meta["mode"] in ("chat", "mixed")
            else "."
        )
    )


def table(rows: list[Row], meta: dict[str, Any]) -> str:
    chat = meta["mode"] in ("chat", "mixed")
    mixed = meta["mode"] == "mixed"
    cols = (["mode"] if mixed else []) + [
        "calls (admitted/asked)",
        "lag p50/p95/max ms",
        "round trip p50/p95/max ms",
        "units",
        "errors",
    ]
    cols += ["gap p99/max (late p99) ms", "missing frames", "voiced"] + (
        ["turn→text / audio p50 ms", "turn end→speech (server) p50/p95 ms"] if chat else []
    )
    cols += [
        "stalls logged (captures, compiles, allocator, GC) joining / in window",
        "media CPU (per call)",
        "worker CPU",
        "GPU busy",
        "GPU mem MiB",
    ]
    lines = [header(meta), "", "| " + " | ".join(cols) + " |", "|" + " ---: |" * len(cols)]
    for r in rows:
        errors = f"{r.errors}" + (
            f" ({', '.join(f'{k}×{v}' for k, v in r.error_codes.items())})" if r.errors else ""
        )
        cells = ([r.mode] if mixed else []) + [
            f"{r.admitted}/{r.asked}",
            " / ".join(fmt(r.lag_ms[k]) for k in ("p50", "p95", "max")),
            " / ".join(fmt(r.roundtrip_ms[k]) for k in ("p50", "p95", "max")),
            str(r.units),
            errors,
            f"{fmt(r.gap_p99_ms)} / {fmt(r.gap_max_ms)} ({fmt(r.late_p99_ms)})",
            f"{fmt(r.missing_pct, 1)} %",
            f"{fmt(r.voiced_pct)} %",
        ]
        if chat:
            cells.append(
                f"{fmt(r.text_after_turn_p50_ms)} / {fmt(r.audio_after_turn_p50_ms)} ({r.turns_sent} turns)"
                if r.turns_sent
                else "–"
            )
            first = r.stage_ms.get("turn_to_speech_ms")
            early = (
                f" (early {r.early_replies}, dropped {r.early_dropped})"
                if r.early_replies or r.early_dropped
                else ""
            )
            cells.append(f"{fmt(first['p50'])} / {fmt(first['p95'])}{early}" if first else "–")
        cells += [
            f"{r.stalls_joining} / {r.stalls_window}",
            f"{r.media_cpu_pct:.0f} % ({fmt(r.media_cpu_per_call_pct, 1)} %)",
            f"{r.worker_cpu_pct:.0f} %",
            f"{fmt(r.gpu_busy_pct)} %" if r.gpu_busy_pct is not None else "n/a",
            fmt(r.gpu_mem_mib),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_doc(text: str, mode: str) -> Path:
    path = REPO_ROOT / "docs" / "PERFORMANCE.md"
    begin, end = f"<!-- bench/e2e.py:{mode}:begin -->", f"<!-- bench/e2e.py:{mode}:end -->"
    block = f"{begin}\n{text}\n{end}"
    doc = path.read_text() if path.is_file() else "# Performance\n"
    if begin in doc and end in doc:
        doc = doc[: doc.index(begin)] + block + doc[doc.index(end) + len(end) :]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(doc)
    return path


# ---- main ----


def existing_file(path: str) -> str:
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {path}")
    return path


@dataclass
class Level:
    """One `--runs` level: MODE:N, or MODE:N:KEY=VALUE,... with session options for its calls (an A/B of an
    option on one server start); `label` names its rows and JSON file."""

    mode: str
    calls: int
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return "-".join([self.mode, *(f"{k}={json.dumps(v)}" for k, v in self.options.items())])


def mode_level(text: str) -> Level:
    mode, _, rest = text.partition(":")
    calls, _, opts = rest.partition(":")
    if mode not in (*MODES, "mixed") or not calls.isdigit() or int(calls) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: want MODE:N[:KEY=VALUE,...], MODE one of {', '.join((*MODES, 'mixed'))}"
        )
    options: dict[str, Any] = {}
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise argparse.ArgumentTypeError(f"{text!r}: session options are KEY=VALUE (VALUE as JSON)")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return Level(mode, int(calls), options)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=(*MODES, "mixed"), default="audio_duplex")
    ap.add_argument("--calls", type=ints, default=[1, 8, 16, 32, 48, 64])
    ap.add_argument("--seconds", type=float, default=30.0, help="steady window per level")
    ap.add_argument("--warmup", type=float, default=5.0, help="after every call runs, before the window")
    ap.add_argument("--client-procs", type=int, default=4)
    ap.add_argument("--gpus", type=ints, default=[], help="workers.gpus (none: one CPU worker)")
    ap.add_argument("--model-dir", help="model.path (default: the embedded tiny model)")
    ap.add_argument(
        "--build-realsize", metavar="DIR", help="write a real-size random checkpoint to DIR, use it"
    )
    ap.add_argument(
        "--capacity",
        type=int,
        help="sessions per worker (default: CPU the largest --calls, GPU the worker sizes itself)",
    )
    ap.add_argument("--max-kv-tokens", type=int)
    ap.add_argument("--vocoder-turns", type=int)
    ap.add_argument("--capacity-table", type=lambda p: str(Path(p).resolve()), help="model.capacity_table")
    ap.add_argument(
        "--set", action="append", default=[], help="extra config, e.g. workers.heartbeat_timeout_s=30"
    )
    ap.add_argument("--startup-timeout", type=float, default=900.0, help="server up (GPU warm-up)")
    ap.add_argument("--ready-timeout", type=float, default=300.0, help="a call's first metrics event")
    ap.add_argument("--video-fps", type=float, default=5.0, help="omni_duplex: camera frames per second")
    ap.add_argument("--turn-interval", type=float, default=6.0, help="chat: seconds between turns")
    ap.add_argument(
        "--chat-turns",
        choices=("typed", "spoken"),
        default="typed",
        help="chat: typed text, or speech ended by the server's VAD (its turn end -> first speech: server side)",
    )
    ap.add_argument(
        "--speech",
        type=existing_file,
        help="a WAV of speech for the callers (default: espeak-ng, else a synthetic voice)",
    )
    ap.add_argument(
        "--runs",
        nargs="+",
        type=mode_level,
        metavar="MODE:N[:KEY=VALUE,...]",
        help="levels of several modes on one server, in order (one GPU warm-up for all; instead of --mode and "
        "--calls): a table and a JSON per level label; KEY=VALUE pairs are session options of that level's calls "
        "(e.g. chat:48:early_reply=false, an A/B on one server)",
    )
    ap.add_argument("--restart-per-level", action="store_true")
    ap.add_argument("--out", default="bench-e2e-out")
    ap.add_argument("--profile", help="py-spy (if installed) records the workers and a media process here")
    ap.add_argument("--profile-native", action="store_true", help="the workers' profiles with native frames")
    ap.add_argument(
        "--write-doc", action="store_true", help="update this mode's block in docs/PERFORMANCE.md"
    )
    args = ap.parse_args(argv)
    if args.runs:  # the server is sized for the largest level (`server_config`)
        args.calls = [level.calls for level in args.runs]
    return args


def write_json(out: Path, mode: str, meta: dict[str, Any], rows: list[Row]) -> None:
    (out / f"e2e-{mode}.json").write_text(
        json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1)
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.build_realsize:
        proc = mp.get_context("spawn").Process(
            target=build_realsize, args=(Path(args.build_realsize).resolve(), (args.gpus or [0])[0])
        )
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"building the real-size checkpoint failed ({proc.exitcode})")
        args.model_dir = str(Path(args.build_realsize).resolve())
    plan: list[Level] = args.runs or [Level(args.mode, n) for n in args.calls]
    meta = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "gpu": gpu_name() if args.gpus else "none (CPU worker)",
        "workers": f"GPUs {args.gpus}" if args.gpus else "one CPU worker",
        "model": args.model_dir or "embedded tiny model",
        "client_procs": args.client_procs,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "chat_turns": f"{args.chat_turns} every {args.turn_interval:g} s",
        "python": platform.python_version(),
    }
    sigs: dict[str, np.ndarray] = {}
    for mode in dict.fromkeys(level.mode for level in plan):
        for m in MIXED if mode == "mixed" else (mode,):
            if m not in sigs:
                sigs[m] = caller_signal(m, out, args.chat_turns, args.turn_interval, args.speech)
    gpu = GpuSampler(args.gpus)
    gpu.start()
    rows: dict[str, list[Row]] = {level.label: [] for level in plan}  # by label: a mode, with its options
    server: Server | None = None
    status = 0
    tag = "-".join(dict.fromkeys(level.mode for level in plan))
    try:
        for level in plan:
            mode, n, label = level.mode, level.calls, level.label
            if server is None or args.restart_per_level:
                if server is not None:
                    stop_server(server)
                server = start_server(args, out, f"{tag}-{n}" if args.restart_per_level else tag)
                meta["config"] = server.config
            level_args = argparse.Namespace(**{**vars(args), "mode": mode, "session_options": level.options})
            for row in run_level(level_args, server, n, sigs, gpu):
                rows[label].append(row)
                print(json.dumps(asdict(row)), flush=True)
            # each level's rows as it ends: a run cut short keeps what it measured
            write_json(out, label, {"mode": mode, "options": level.options, **meta}, rows[label])
    except (RuntimeError, TimeoutError) as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        status = 1
    finally:
        if server is not None:
            stop_server(server)
        gpu.halt.set()
    meta["load_avg"] = float(Path("/proc/loadavg").read_text().split()[0])
    levels = {level.label: level for level in plan}
    for label, mode_rows in rows.items():
        mode_meta = {"mode": levels[label].mode, "options": levels[label].options, **meta}
        write_json(out, label, mode_meta, mode_rows)
        text = table(mode_rows, mode_meta)
        print(text)
        if args.write_doc and mode_rows:
            print(f"written to {write_doc(text, label)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
