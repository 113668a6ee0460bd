"""Chat capacity (issue 16): how many turn-based chat sessions one worker holds, through the code the server runs.

The worker's own objects, in process (no WebRTC, no IPC): an `EngineHost` on a checkpoint folder (a real-size
random-weight one on a GPU, `bench/e2e.py --build-realsize`; the embedded tiny model on the CPU), warmed up as a
worker warms up, and N `ChatMode` sessions (spread over the tick phases as the worker spreads them: each keeps its
phase's KV slots and half of the vocoder's store) whose 320 ms units go through `ChatMode.on_units` in real time: one
tick per unit of audio, each tick holding every session's unit, the next tick starting 320 ms after the last one
started (or at once when a tick overran; its units then carry the backlog a worker would see). Each session speaks a turn every `--turn-every` seconds (session i
shifted by i/N of that): `--speech` (a 16 kHz WAV, e.g. espeak-ng; the VAD ends the turn, as in a call) and
silence otherwise; replies run to `--reply-tokens` tokens (`force: speak`; random weights never draw the TTS's
end, so every 10-token text chunk is 4.8 s of speech: 20 tokens give ~9.6 s).

Per N: ticks (time p50/p95/max, share over 320 ms); server-side turn end -> first PCM (from the start of the tick
in which the VAD ended the turn to the end of the tick that produced its first speech) p50/p95; underrun: per
reply, the largest amount by which the wall time since its first PCM exceeded the speech produced so far (0: the
caller never waits); speech produced per second of wall time per replying session; tokens/s at batch 1 (one
session alone, decode steps only). The largest N that `fits` goes to OUT/chat_capacity_table.json (a GPU run):
the `chat` row of a capacity table. `--mixed N,..`: levels of N chat sessions and N audio-duplex sessions (force speak) ticking once per
second in the same loop, before the chat sessions of that tick as in the worker; their unit time p50/p95/max.

    python bench/chat_capacity.py --model-dir DIR --device cuda --sessions 1,8,16,32,48,64 --mixed 8,16 --out OUT
    python bench/chat_capacity.py --tiny --sessions 1,2 --seconds 6 --out OUT     (CPU, embedded model)

`--profile N`: after level N's measured window, 8 more ticks of that level run under `torch.profiler` (CPU and
CUDA), with the tick's stages marked (`prefill`, `decode`, `tts`, `vocoder`): OUT/profile-N.txt holds, per stage
and for the rest of the tick, its wall time and the GPU's busy time inside it (where the tick waits for the host
and where for the GPU), and the top operators; OUT/profile-N.json.gz the trace.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.tick_profile import Mark, profile_ticks  # noqa: E402
from inference import protocol as p  # noqa: E402
from inference.engine_host import get_host  # noqa: E402
from inference.modes import create_mode  # noqa: E402
from inference.modes.base import ModeUnit, SessionOptions  # noqa: E402
from inference.modes.chat import ChatMode  # noqa: E402
from inference.modes.duplex import DuplexMode  # noqa: E402
from inference.settings import ModelSettings, WorkerSettings  # noqa: E402
from inference.ticker import prepare_parts  # noqa: E402
from MiniCPMO45.audio.rates import CHAT_UNIT_SAMPLES, MODEL_INPUT_RATE, SPEECH_RATE  # noqa: E402
from MiniCPMO45.audio.resample import resample  # noqa: E402
from MiniCPMO45.audio.wav import read_mono  # noqa: E402
from MiniCPMO45.engine import half_duplex as hd  # noqa: E402
from MiniCPMO45.engine.capacity import CapacityTable, ModeCapacity  # noqa: E402
from MiniCPMO45.engine.generation import decode_step, start_row  # noqa: E402

UNIT_S = CHAT_UNIT_SAMPLES / MODEL_INPUT_RATE
STAGES = ("prefill_ms", "decide_ms", "tts_ms", "vocoder_ms")


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def read_speech(path: str | None) -> np.ndarray:
    """16 kHz mono float32 speech: the WAV given, or espeak-ng's if it is installed."""
    if path is None:
        out = Path(tempfile.mkdtemp()) / "turn.wav"
        text = "Could you tell me what the weather will be like tomorrow in the mountains?"
        subprocess.run(["espeak-ng", "-w", str(out), "-s", "160", text], check=True, capture_output=True)
        path = str(out)
    pcm, rate = read_mono(path)
    return resample(pcm, rate, MODEL_INPUT_RATE)  # espeak-ng writes 22.05 kHz


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch1_tokens_per_s(host, tokens: int) -> float:  # noqa: ANN001
    """Decode steps of one session alone (greedy is not needed: the sampler runs as in a call)."""
    engine = host.engine
    mode = create_mode("chat", host.settings)
    mode.open(SessionOptions("tok-s", extra={"force": "speak", "max_new_tokens": tokens + 16}))
    try:
        assert isinstance(mode, ChatMode) and mode.session is not None
        s = mode.session
        # the user turn and the assistant prefix in one feed, as `ChatMode` starts a reply
        user = hd.user_turn_embeddings(engine, s, text="Tell me a long story about the sea.")
        hd.start_reply_state(s)
        prefix = engine.model.embed_ids(hd.assistant_prefix(engine, use_tts_template=True))
        _, logits = engine.feed_for_logits([s], [torch.cat([user, prefix.to(user.dtype)])])
        sp = engine.special
        row = start_row(
            engine, s, logits[0], mode.sampling, tokens + 8, [sp.tts_eos, sp.im_end, engine.eos_s]
        )
        for _ in range(4):
            decode_step(engine, [row])
        sync(host.device)
        t0 = time.perf_counter()
        for _ in range(tokens):
            decode_step(engine, [row])
        sync(host.device)
        return tokens / (time.perf_counter() - t0)
    finally:
        mode.close()


def chat_units(
    chats: list[ChatMode], k: int, turn_units: int, speech: np.ndarray, behind: int
) -> list[tuple[ChatMode, ModeUnit, None]]:
    """Tick k's unit of every session: session i is i/N of a turn cycle ahead, speaking in the cycle's start."""
    batch = []
    for i, mode in enumerate(chats):
        at = (k + i * turn_units // max(len(chats), 1)) % turn_units  # where in its turn cycle this unit is
        lo = at * CHAT_UNIT_SAMPLES
        pcm = np.zeros(CHAT_UNIT_SAMPLES, dtype=np.float32)
        piece = speech[lo : lo + CHAT_UNIT_SAMPLES]
        pcm[: piece.size] = piece
        batch.append((mode, ModeUnit(k, pcm, 0.0, queued_units=behind), None))
    return batch


def prepare(preparer: ThreadPoolExecutor, threads: int, units: list[tuple[ChatMode, ModeUnit, None]]) -> None:
    """The tick's `prepare_units` (the VAD) on the preparing threads, split as the worker's ticker splits it before
    the tick runs (`workers.prepare_threads` threads)."""
    pairs = [(mode, unit) for mode, unit, _ in units]
    parts = prepare_parts(len(pairs), threads)
    for done in [preparer.submit(ChatMode.prepare_units, pairs[k::parts]) for k in range(parts)]:
        done.result()


def profile_level(  # noqa: PLR0913
    host,  # noqa: ANN001
    preparer: ThreadPoolExecutor,
    chats: list[ChatMode],
    first: int,
    speech: np.ndarray,
    turn_units: int,
    dest: Path,
) -> None:
    """`--profile N`: 8 more ticks of the level under `torch.profiler`, on the level's 320 ms clock."""
    import inference.speech as speech_module

    marks = [
        Mark(ChatMode, "start_replies", "prefill"),
        Mark(ChatMode, "_decode", "decode"),
        Mark(speech_module, "next_pieces", "tts"),
        Mark(host.vocoder, "push_codes_batch", "vocoder"),
    ]

    units: list[tuple[ChatMode, ModeUnit, None]] = []

    def arrive(j: int) -> None:  # the units and their VAD, before the tick as in the worker
        units[:] = chat_units(chats, first + j, turn_units, speech, 0)
        prepare(preparer, host.settings.prepare_threads, units)

    def tick(j: int) -> None:
        ChatMode.on_units(units)
        sync(host.device)

    title = f"{len(chats)} chat sessions, 8 ticks"
    print(profile_ticks(tick, 8, marks, dest, title, period_s=UNIT_S, before=arrive), flush=True)


def run_level(  # noqa: PLR0913
    host,  # noqa: ANN001
    n: int,
    seconds: float,
    with_duplex: bool,
    args: argparse.Namespace,
    speech: np.ndarray,
) -> dict[str, object]:
    options = {"force": "speak", "max_new_tokens": args.reply_tokens, "seed": 1}
    chats: list[ChatMode] = []
    duplex: list[DuplexMode] = []
    preparer = ThreadPoolExecutor(host.settings.prepare_threads, thread_name_prefix="prepare")
    try:
        for i in range(n):
            mode = create_mode("chat", host.settings)
            # the worker spreads its sessions over the tick phases (`UnitTicker.join`): a chat session keeps its
            # phase's KV slots and half of the vocoder's store, though every chat session ticks on one grid
            phase = i % host.settings.tick_phases
            mode.open(SessionOptions(f"chat-{i}", extra=options, tick_phase=phase))
            assert isinstance(mode, ChatMode)
            chats.append(mode)
        for i in range(n if with_duplex else 0):
            mode = create_mode("audio_duplex", host.settings)
            mode.open(SessionOptions(f"duplex-{i}", extra={"force": "speak", "seed": 1}))
            assert isinstance(mode, DuplexMode)
            duplex.append(mode)
        ticks = int(seconds / UNIT_S)
        turn_units = max(1, int(args.turn_every / UNIT_S))
        tick_ms: list[float] = []
        stages: list[dict[str, float]] = []  # per tick: each stage's time (the tick's batched work)
        duplex_ms: list[float] = []
        turn_start: dict[
            tuple[int, int], float
        ] = {}  # (session, turn) -> start of the tick its turn ended in
        first_pcm_ms: list[float] = []
        # (session, turn) -> when the unit in which the VAD ended the turn was complete (its real-time end)
        turn_due: dict[tuple[int, int], float] = {}
        unit_first_pcm_ms: list[float] = []
        prepare_ms: list[float] = []
        produced: dict[tuple[int, int], float] = {}  # speech seconds per reply
        first_at: dict[tuple[int, int], float] = {}
        underrun: dict[tuple[int, int], float] = {}
        active: dict[tuple[int, int], float] = {}
        turns = 0
        rng = np.random.default_rng(0)
        start = time.perf_counter()
        for k in range(ticks):
            due = start + k * UNIT_S
            if (wait := due - time.perf_counter()) > 0:
                time.sleep(wait)
            # units a worker would hold behind this one: those of the time this tick starts late
            behind = max(0, int((time.perf_counter() - due) / UNIT_S))
            units = chat_units(chats, k, turn_units, speech, behind)
            prepared = time.perf_counter()
            prepare(preparer, host.settings.prepare_threads, units)
            t0 = time.perf_counter()
            prepare_ms.append((t0 - prepared) * 1000)
            if duplex and k % round(1.0 / UNIT_S) == 0:
                # a unit a second, before the chat sessions of the tick, as the worker orders them
                noise = (0.05 * rng.standard_normal(MODEL_INPUT_RATE)).astype(np.float32)
                DuplexMode.on_units([(m, ModeUnit(k, noise, 0.0), None) for m in duplex])
                sync(host.device)
                duplex_ms.append((time.perf_counter() - t0) * 1000)
            outs = ChatMode.on_units(units)
            sync(host.device)
            t1 = time.perf_counter()
            tick_ms.append((t1 - t0) * 1000)
            split: dict[str, float] = {}
            stages.append(split)
            for i, out in enumerate(outs):
                for o in out:
                    if isinstance(o, p.UnitMetrics):
                        for name in STAGES:
                            split[name] = max(split.get(name, 0.0), float(getattr(o, name) or 0.0))
                    if isinstance(o, p.UserTurnOut):
                        turn_start[i, o.turn] = t0
                        turn_due[i, o.turn] = due
                        turns += 1
                    elif isinstance(o, p.AudioOut):
                        key = (i, o.turn)
                        if key not in first_at:
                            first_at[key] = t1
                            if key in turn_start:
                                first_pcm_ms.append((t1 - turn_start[key]) * 1000)
                                unit_first_pcm_ms.append((t1 - turn_due[key]) * 1000)
                        produced[key] = produced.get(key, 0.0) + o.pcm.size / SPEECH_RATE
            for key, t_first in first_at.items():
                reply = chats[key[0]].reply
                if reply is None or reply.turn != key[1]:
                    continue  # spoken to its end or cut: nobody waits for more of it
                short = (t1 - t_first) - produced.get(key, 0.0)
                underrun[key] = max(underrun.get(key, 0.0), short)
                active[key] = t1 - t_first
        wall = time.perf_counter() - start
        if args.profile == n and not with_duplex:
            dest = Path(args.out) / f"profile-{n}"
            profile_level(host, preparer, chats, ticks, speech, turn_units, dest)
        # speech made per second of a reply's life (first PCM to its last tick in progress), replies that ran 2 s+
        rates = [produced[key] / t for key, t in active.items() if t >= 2.0]
        return {
            "sessions": n,
            "mixed_duplex": len(duplex),
            "ticks": len(tick_ms),
            "tick_ms_p50": pct(tick_ms, 50),
            "tick_ms_p95": pct(tick_ms, 95),
            "tick_ms_max": max(tick_ms) if tick_ms else None,
            "ticks_over_unit": float(np.mean([t > UNIT_S * 1000 for t in tick_ms])) if tick_ms else None,
            **{
                f"{name}_p50/p95": [pct(busy, 50), pct(busy, 95)]
                for name in STAGES
                if (busy := [st[name] for st in stages if st.get(name)])
            },
            "turns": turns,
            "replies_started_speaking": len(first_at),
            "turn_to_first_pcm_ms_p50": pct(first_pcm_ms, 50),
            "turn_to_first_pcm_ms_p95": pct(first_pcm_ms, 95),
            "unit_to_first_pcm_ms_p50": pct(unit_first_pcm_ms, 50),
            "unit_to_first_pcm_ms_p95": pct(unit_first_pcm_ms, 95),
            "prepare_ms_p50": pct(prepare_ms, 50),
            "prepare_ms_p95": pct(prepare_ms, 95),
            "underrun_ms_max": max(underrun.values()) * 1000 if underrun else None,
            "underrun_ms_p95": pct([v * 1000 for v in underrun.values()], 95),
            "speech_s_per_wall_s_min": min(rates) if rates else None,
            "duplex_unit_ms_p50": pct(duplex_ms, 50),
            "duplex_unit_ms_p95": pct(duplex_ms, 95),
            "duplex_unit_ms_max": max(duplex_ms) if duplex_ms else None,
            "wall_s": wall,
        }
    finally:
        preparer.shutdown()
        for m in [*chats, *duplex]:
            m.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", help="checkpoint folder (default: the embedded tiny model)")
    ap.add_argument("--tiny", action="store_true", help="the embedded model on the CPU")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sessions", default="1,8,16,32,48,64")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured time per N")
    ap.add_argument("--turn-every", type=float, default=10.0)
    ap.add_argument("--reply-tokens", type=int, default=20)
    ap.add_argument("--speech", help="16 kHz mono WAV spoken at each turn (default: espeak-ng)")
    ap.add_argument("--mixed", default="", help="N list of mixed levels: N chat + N audio-duplex sessions")
    ap.add_argument("--tok-s-tokens", type=int, default=64)
    ap.add_argument("--max-kv-tokens", type=int, default=4096, help="KV positions per session (GPU)")
    ap.add_argument(
        "--profile", type=int, help="N: profile 8 ticks of level N after its window (torch.profiler)"
    )
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    levels = [int(x) for x in args.sessions.split(",") if x]
    mixed = [int(x) for x in args.mixed.split(",") if x]
    model = ModelSettings(
        path=args.model_dir if args.model_dir and not args.tiny else "",
        max_kv_tokens=512 if args.tiny else args.max_kv_tokens,  # 512: the least `model.max_kv_tokens`
    )
    settings = WorkerSettings(
        model=model,
        device="cpu" if args.tiny else args.device,
        max_sessions=max([*levels, *(2 * n for n in mixed)]) + 1,
    )
    t0 = time.perf_counter()
    host = get_host(settings)
    host.duplex_batcher()  # the worker's warm-up: static steps and their graphs
    results: dict[str, object] = {
        "device": torch.cuda.get_device_name(host.device) if host.device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "slots": host.max_sessions,
        "setup_s": time.perf_counter() - t0,
        "reply_tokens": args.reply_tokens,
        "turn_every_s": args.turn_every,
    }
    speech = read_speech(args.speech)
    results["speech_s"] = speech.size / MODEL_INPUT_RATE
    warm = run_level(host, 1, 4.0, False, args, speech)
    results["warmup_level"] = warm
    results["batch1_tokens_per_s"] = batch1_tokens_per_s(host, args.tok_s_tokens)
    print(json.dumps({k: v for k, v in results.items() if k != "warmup_level"}), flush=True)
    rows = []
    for n, with_duplex in [*((n, False) for n in levels), *((n, True) for n in mixed)]:
        if n * (2 if with_duplex else 1) > host.max_sessions:
            rows.append({"sessions": n, "skipped": f"the worker holds {host.max_sessions} sessions"})
            continue
        row = run_level(host, n, args.seconds, with_duplex, args, speech)
        print(json.dumps(row), flush=True)
        rows.append(row)
        results["rows"] = rows
        (out / "chat_capacity.json").write_text(json.dumps(results, indent=1))
    results["rows"] = rows
    held = [int(r["sessions"]) for r in rows if not r.get("mixed_duplex") and fits(r)]  # type: ignore[call-overload]
    results["chat_sessions"] = max(held, default=0)
    (out / "chat_capacity.json").write_text(json.dumps(results, indent=1))
    if held and host.device.type == "cuda":
        table = CapacityTable(
            card=str(results["device"]),
            context=int(host.max_kv_tokens),
            modes={"chat": ModeCapacity(sessions=max(held))},
        )
        (out / "chat_capacity_table.json").write_text(table.model_dump_json(indent=1))
    print(f"chat sessions held: {results['chat_sessions']}", flush=True)
    return 0


def fits(row: dict[str, object]) -> bool:
    """A level the worker holds: every reply streams faster than real time, no caller waits for speech more
    than 100 ms, and the ticks keep up with the 320 ms units (p50)."""
    if "skipped" in row:
        return False
    rate, under, tick = row.get("speech_s_per_wall_s_min"), row.get("underrun_ms_max"), row.get("tick_ms_p50")
    return (
        (rate is None or float(rate) >= 1.0)  # type: ignore[arg-type]
        and (under is None or float(under) <= 100.0)  # type: ignore[arg-type]
        and tick is not None
        and float(tick) <= UNIT_S * 1000  # type: ignore[arg-type]
    )


if __name__ == "__main__":
    sys.exit(main())
