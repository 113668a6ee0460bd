"""Media-path benchmark: N concurrent loopback calls against one server (one media process).

    python bench/media.py [--calls 1,8,16,32] [--seconds 10] [--client-procs 4] [--no-write]
        [--set rtc.outbound_packet_ms=60 ...]

The server runs in this process (the media process: aiohttp + aiortc, one CPU worker process beside it);
the callers are aiortc clients in separate processes. For each N it reports, over a steady window:
server CPU per call (this process, from /proc), worker CPU, outbound pacing (deviation of each packet, 20 ms
unless `rtc.outbound_packet_ms` says otherwise, from its schedule, p50/p99, over all calls), and the unit hand-off delay (last sample of a unit
arrived -> unit decoded in the worker, p50/p99). The table goes to docs/PERFORMANCE.md ("Media path").
Not a test: numbers depend on the machine, and the clients share its CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from rtc_server.app import start_server  # noqa: E402
from rtc_server.config import build_config  # noqa: E402

BEGIN = "<!-- bench/media.py:begin -->"
END = "<!-- bench/media.py:end -->"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# ---- callers (separate processes) ----


def caller_process(
    url: str, calls: int, ready: mp.Event, stop: mp.Event, failed: mp.Value, cpus: set[int] | None
) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    asyncio.run(_callers(url, calls, ready, stop, failed))


async def _callers(url: str, calls: int, ready: mp.Event, stop: mp.Event, failed: mp.Value) -> None:
    from tests.rtc_client import RATE, Call

    t = np.arange(RATE * 120) / RATE
    tone = (0.2 * np.sin(2 * np.pi * 300 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * t))).astype(np.float32)
    active: list[Call] = []
    try:
        for _ in range(calls):
            call = Call(url, tone)
            call.recorder.keep = False
            await call.start_whip("loopback")
            active.append(call)
        await asyncio.gather(*(c.wait_connected(60) for c in active))
    except Exception as exc:
        print(f"caller failed: {exc}", file=sys.stderr)
        with failed.get_lock():
            failed.value += 1
    ready.set()
    while not stop.is_set():
        await asyncio.sleep(0.1)
    for call in active:
        try:
            await call.hang_up()
        except Exception:
            pass
        await call.close()


# ---- measurement ----


@dataclass
class Row:
    calls: int
    server_cpu_pct: float  # % of one core, whole media process
    per_call_pct: float
    worker_cpu_pct: float
    pacing_p50_ms: float
    pacing_p99_ms: float
    late_frac: float  # frames more than 5 ms late
    handoff_p50_ms: float
    handoff_p99_ms: float
    frames_out_per_s: float
    load_avg: float  # 1-minute load average at the end of the window (other processes on the machine)


async def measure(
    n: int,
    seconds: float,
    client_procs: int,
    caller_cpus: set[int] | None,
    overrides: list[str] | None = None,
) -> Row:
    values: dict = {
        "server": {"host": "127.0.0.1", "port": 0, "http": True},
        "workers": {"cpu_capacity": max(n, 1)},
        "queue": {"max_length": 0},
        # every caller comes from 127.0.0.1: lift the per-client limits (rtc_server/client_limits.py)
        "rtc": {"max_pending_per_client": max(n, 1), "offers_per_minute": 60 * max(n, 1)},
    }
    for item in overrides or []:  # --set SECTION.KEY=VALUE (a TOML value)
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        values.setdefault(section, {})[name] = tomllib.loads(f"v = {value}")["v"]
    config = build_config(values)
    server = await start_server(config)
    ctx = mp.get_context("spawn")
    procs, readies = [], []
    stop, failed = ctx.Event(), ctx.Value("i", 0)
    shares = [n // client_procs + (1 if i < n % client_procs else 0) for i in range(min(client_procs, n))]
    try:
        for share in shares:
            ready = ctx.Event()
            proc = ctx.Process(
                target=caller_process, args=(server.url, share, ready, stop, failed, caller_cpus), daemon=True
            )
            proc.start()
            procs.append(proc)
            readies.append(ready)
        deadline = time.monotonic() + 120
        while not all(r.is_set() for r in readies):
            if time.monotonic() > deadline:
                raise TimeoutError("callers did not connect")
            if any(not p.is_alive() for p, r in zip(procs, readies, strict=True) if not r.is_set()):
                raise RuntimeError("a caller process died before connecting")
            await asyncio.sleep(0.2)
        if failed.value:
            raise RuntimeError(f"{failed.value} caller process(es) failed")
        await asyncio.sleep(3.0)  # warm-up: jitter buffers filled, loopback playing
        sessions = list(server.manager.sessions.values())
        assert len(sessions) == n, f"{len(sessions)} sessions, expected {n}"
        for s in sessions:
            s.speech.pacing.recent.clear()
        server.manager.stats.recent_handoff_ms.clear()
        worker_pid = server.supervisor.workers[0].pid
        assert worker_pid is not None
        frames0 = sum(s.speech.frames_out for s in sessions)
        cpu0, wcpu0, t0 = cpu_seconds(os.getpid()), cpu_seconds(worker_pid), time.monotonic()
        await asyncio.sleep(seconds)
        cpu1, wcpu1, t1 = cpu_seconds(os.getpid()), cpu_seconds(worker_pid), time.monotonic()
        frames1 = sum(s.speech.frames_out for s in sessions)
        lateness = (
            np.concatenate([np.fromiter(s.speech.pacing.recent, dtype=np.float64) for s in sessions]) * 1000
        )
        handoff = np.fromiter(server.manager.stats.recent_handoff_ms, dtype=np.float64)
        server_pct = (cpu1 - cpu0) / (t1 - t0) * 100
        return Row(
            calls=n,
            server_cpu_pct=server_pct,
            per_call_pct=server_pct / n,
            worker_cpu_pct=(wcpu1 - wcpu0) / (t1 - t0) * 100,
            pacing_p50_ms=float(np.percentile(lateness, 50)),
            pacing_p99_ms=float(np.percentile(lateness, 99)),
            late_frac=float(np.mean(lateness > 5.0)),
            handoff_p50_ms=float(np.percentile(handoff, 50)) if handoff.size else float("nan"),
            handoff_p99_ms=float(np.percentile(handoff, 99)) if handoff.size else float("nan"),
            frames_out_per_s=(frames1 - frames0) / (t1 - t0),
            load_avg=float(Path("/proc/loadavg").read_text().split()[0]),
        )
    finally:
        stop.set()
        for proc in procs:  # joined off the loop: the callers' DELETEs need the server to keep running
            await asyncio.to_thread(proc.join, 30)
            if proc.is_alive():
                proc.kill()
                await asyncio.to_thread(proc.join)
        await server.stop()


def table(rows: list[Row], seconds: float, client_procs: int, pinned: bool) -> str:
    placement = (
        "media process and worker pinned to CPU 0, callers to the other CPUs"
        if pinned
        else f"server, worker and {client_procs} caller processes share these CPUs"
    )
    lines = [
        f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs), Python {platform.python_version()}; "
        f"{placement}; {seconds:.0f} s steady window after a 3 s warm-up; loopback calls (100 ms units).",
        "",
        "| calls | media process CPU (% of a core) | per call | worker CPU | pacing p50 | pacing p99 "
        "| frames > 5 ms late | unit hand-off p50 | hand-off p99 | frames out/s | load avg |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.calls} | {r.server_cpu_pct:.0f} % | {r.per_call_pct:.1f} % | {r.worker_cpu_pct:.0f} % "
            f"| {r.pacing_p50_ms:.2f} ms | {r.pacing_p99_ms:.2f} ms | {r.late_frac * 100:.1f} % "
            f"| {r.handoff_p50_ms:.2f} ms | {r.handoff_p99_ms:.2f} ms | {r.frames_out_per_s:.0f} | {r.load_avg:.1f} |"
        )
    return "\n".join(lines)


def write_doc(text: str) -> Path:
    path = REPO_ROOT / "docs" / "PERFORMANCE.md"
    block = f"{BEGIN}\n{text}\n{END}"
    if path.is_file() and BEGIN in (doc := path.read_text()):
        doc = doc[: doc.index(BEGIN)] + block + doc[doc.index(END) + len(END) :]
    else:
        doc = "# Performance\n\n## Media path\n\nMeasured with `python bench/media.py`.\n\n" + block + "\n"
    path.parent.mkdir(exist_ok=True)
    path.write_text(doc)
    return path


async def main_async(args: argparse.Namespace) -> None:
    rows = []
    for n in args.calls:
        row = await measure(n, args.seconds, args.client_procs, args.caller_cpus, args.set)
        print(row, flush=True)
        rows.append(row)
    text = table(rows, args.seconds, args.client_procs, args.caller_cpus is not None)
    print(text)
    if not args.no_write:
        print(f"written to {write_doc(text)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", default="1,8,16,32", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--client-procs", type=int, default=4)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="pin the media process (and its worker) to CPU 0 and the callers to the other CPUs",
    )
    parser.add_argument("--profile", help="write a cProfile of the media process to this file")
    parser.add_argument(
        "--set", action="append", default=[], help="SECTION.KEY=VALUE (TOML), e.g. rtc.outbound_packet_ms=60"
    )
    args = parser.parse_args()
    args.caller_cpus = None
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            parser.error("--pin needs at least 2 CPUs")
        os.sched_setaffinity(0, {cpus[0]})  # the worker process inherits this
        args.caller_cpus = set(cpus[1:])
    if args.profile:
        import cProfile

        cProfile.runctx(
            "asyncio.run(main_async(args))", globals(), {"args": args, "main_async": main_async}, args.profile
        )
    else:
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
