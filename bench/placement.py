"""Placement and queue logic of cluster mode at scale, in simulation (issue 20): no Ray, no media.

The cluster's own `cluster.placement.Placer` (the code the registry actor runs) places every call of a
simulated cluster (default 100 nodes x 8 GPUs). Each simulated node behaves as `rtc_server.admission` does on
a real host: a call takes 1 / capacity_m of one worker (the worker with the most room), or waits in the
node's FIFO queue (at most `--queue` callers; more: refused), and a call that ends lets the queue's head in.
Nodes report their load to the placer every `--report-s` (staggered); between reports the placer counts what
it placed there itself. Arrivals are Poisson, session lengths log-normal, modes a mix of audio duplex, omni
duplex and turn-based chat with per-GPU capacities from `bench/capacity.py`'s H100 figures. The run starts
at the steady state (the calls under way are offered over the first 10 s) and measures after 40 s. Nodes fail at
random (their calls end and their queues drop), are noticed after `--detect-s` (an offer to a dead node is
retried elsewhere at once, as the front does), and rejoin after `--down-s`.

Measured: placement latency (one `choose` + `placed`, wall clock on this CPU), placement throughput with the
cluster at its steady state, concurrent calls, utilisation (used share of the up workers), queue waits and
FIFO fairness (the share of pairs of queued callers admitted in the opposite order of their arrival), calls
lost to node failures. Two scenarios by default: `steady` (100 x 8 at ~10k concurrent calls) and `overload`
(10 x 8 offered 1.2x what it holds, so that the queues fill).

    python bench/placement.py [--out bench-out/placement] [--minutes 15] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import heapq
import itertools
import json
import math
import random
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.placement import EPS, NodeLoad, Placer, WorkerLoad  # noqa: E402

# sessions per H100 worker by mode (bench/capacity.py's measured order of magnitude; docs/PERFORMANCE.md)
CAPACITY = {"audio_duplex": 64.0, "omni_duplex": 48.0, "chat": 64.0}
MIX = {"audio_duplex": 0.6, "omni_duplex": 0.25, "chat": 0.15}
PREFILL_S = 10.0


class Scenario(BaseModel):
    name: str
    nodes: int
    gpus: int
    concurrent: float  # offered load: arrival rate x mean session length
    mean_session_s: float = 120.0
    sigma: float = 1.0  # of the log-normal session length
    minutes: float = 15.0  # simulated time; the first third warms up
    report_s: float = 0.5
    detect_s: float = 1.0
    node_mtbf_min: float = 60.0  # per node: mean time between failures (100 nodes: one failure every 36 s)
    down_s: float = 120.0
    queue: int = 16
    seed: int = 1


@dataclass
class SimCall:
    id: int
    mode: str
    arrival: float
    length: float
    node: str = ""
    worker: int = -1
    admitted: float | None = None
    queued: bool = False
    ended: str = ""


@dataclass
class SimNode:
    name: str
    workers: list[float]  # load of each worker
    up: bool = True
    queue: deque[SimCall] = field(default_factory=deque)
    calls: dict[int, SimCall] = field(default_factory=dict)
    epoch: int = 0  # bumped on failure: departures of calls of an earlier life are ignored

    def share(self, mode: str) -> float:
        return 1.0 / CAPACITY[mode]

    def best_worker(self, mode: str) -> int | None:
        share = self.share(mode)
        best = min(range(len(self.workers)), key=lambda i: self.workers[i])
        return best if self.workers[best] + share <= 1.0 + EPS else None

    def load(self) -> NodeLoad:
        workers = [
            WorkerLoad(worker_id=i, capacity_by_mode=CAPACITY, capacity=min(CAPACITY.values()), load=load)
            for i, load in enumerate(self.workers)
        ]
        return NodeLoad(name=self.name, workers=workers, queued=len(self.queue), modes=list(CAPACITY))


class Simulation:
    def __init__(self, scenario: Scenario) -> None:
        self.s = scenario
        self.rng = random.Random(scenario.seed)
        self.placer = Placer()
        self.nodes = {f"n{i:03d}": SimNode(f"n{i:03d}", [0.0] * scenario.gpus) for i in range(scenario.nodes)}
        self.events: list[tuple[float, int, str, object]] = []
        self.seq = itertools.count()
        self.ids = itertools.count()
        self.calls: list[SimCall] = []
        self.place_s: list[float] = []
        self.samples: list[
            tuple[float, int, float, int]
        ] = []  # (t, admitted calls, used share / up share, queued)
        self.refused = 0
        self.retried = 0
        self.lost = 0
        self.failures = 0
        self.end = scenario.minutes * 60
        self.warm = PREFILL_S + 30.0

    def at(self, t: float, kind: str, what: object = None) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, what))

    def run(self) -> dict[str, object]:
        rate = self.s.concurrent / self.s.mean_session_s
        self.at(self.rng.expovariate(rate), "arrive")
        for i, node in enumerate(self.nodes.values()):
            self.at(self.s.report_s * i / len(self.nodes), "report", node.name)
            self.placer.report(node.load())
            self.at(self.rng.expovariate(1 / (self.s.node_mtbf_min * 60)), "fail", node.name)
        self.at(1.0, "sample")
        mu = math.log(self.s.mean_session_s) - self.s.sigma**2 / 2
        # the calls already under way in a cluster at its steady state, offered over the first seconds: the
        # rest of a length-biased session (log-normal with mu + sigma^2) each
        for _ in range(round(self.s.concurrent)):
            rest = self.rng.random() * self.rng.lognormvariate(mu + self.s.sigma**2, self.s.sigma)
            self.at(self.rng.uniform(0, PREFILL_S), "prefill", rest)
        while self.events:
            t, _, kind, what = heapq.heappop(self.events)
            if t > self.end:
                break
            if kind == "arrive":
                call = SimCall(next(self.ids), self._mode(), t, self.rng.lognormvariate(mu, self.s.sigma))
                self.calls.append(call)
                self._place(call, t)
                self.at(t + self.rng.expovariate(rate), "arrive")
            elif kind == "prefill":
                call = SimCall(next(self.ids), self._mode(), t, what)  # type: ignore[arg-type]
                self.calls.append(call)
                self._place(call, t)
            elif kind == "depart":
                self._depart(*what, t)  # type: ignore[misc]
            elif kind == "report":
                node = self.nodes[what]  # type: ignore[index]
                if node.up:
                    self.placer.report(node.load(), [k for k, _ in self.placer.pending.get(node.name, [])])
                self.at(t + self.s.report_s, "report", what)
            elif kind == "fail":
                self._fail(self.nodes[what], t)  # type: ignore[index]
            elif kind == "detect":
                if not self.nodes[what].up:  # type: ignore[index]
                    self.placer.node_down(what)  # type: ignore[arg-type]
            elif kind == "rejoin":
                node = self.nodes[what]  # type: ignore[index]
                node.up = True
                self.placer.report(node.load())
                self.at(t + self.rng.expovariate(1 / (self.s.node_mtbf_min * 60)), "fail", node.name)
            elif kind == "sample":
                self._sample(t)
                self.at(t + 1.0, "sample")
        return self.results()

    def _mode(self) -> str:
        return self.rng.choices(list(MIX), weights=list(MIX.values()))[0]

    def _place(self, call: SimCall, t: float) -> None:
        for _ in range(3):
            started = time.perf_counter()
            chosen = self.placer.choose(call.mode)
            if chosen is not None:
                self.placer.placed(chosen[0], f"c{call.id}", call.mode)
            if t >= self.warm:
                self.place_s.append(time.perf_counter() - started)
            if chosen is None:
                break
            node = self.nodes[chosen[0]]
            if not node.up:  # the offer fails: the front tells the registry and places the call again
                self.retried += 1
                self.placer.node_down(node.name)
                continue
            self._arrive_at(node, call, t)
            return
        call.ended = "refused"
        self.refused += 1

    def _arrive_at(self, node: SimNode, call: SimCall, t: float) -> None:
        call.node = node.name
        worker = node.best_worker(call.mode) if not node.queue else None
        if worker is not None:
            self._admit(node, call, worker, t)
        elif len(node.queue) < self.s.queue:
            call.queued = True
            node.queue.append(call)
        else:
            call.ended = "refused"
            self.refused += 1

    def _admit(self, node: SimNode, call: SimCall, worker: int, t: float) -> None:
        call.worker, call.admitted = worker, t
        node.workers[worker] += node.share(call.mode)
        node.calls[call.id] = call
        self.at(t + call.length, "depart", (node.name, call.id, node.epoch))

    def _depart(self, name: str, call_id: int, epoch: int, t: float) -> None:
        node = self.nodes[name]
        if epoch != node.epoch:
            return
        call = node.calls.pop(call_id)
        call.ended = "done"
        node.workers[call.worker] = max(node.workers[call.worker] - node.share(call.mode), 0.0)
        while node.queue:  # FIFO: the head first, as rtc_server.admission dispatches
            worker = node.best_worker(node.queue[0].mode)
            if worker is None:
                break
            self._admit(node, node.queue.popleft(), worker, t)

    def _fail(self, node: SimNode, t: float) -> None:
        if not node.up:
            return
        self.failures += 1
        node.up = False
        node.epoch += 1
        for call in [*node.calls.values(), *node.queue]:
            call.ended = "node_lost"
            self.lost += 1
        node.calls.clear()
        node.queue.clear()
        node.workers = [0.0] * len(node.workers)
        self.at(t + self.s.detect_s, "detect", node.name)
        self.at(t + self.s.down_s, "rejoin", node.name)

    def _sample(self, t: float) -> None:
        if t < self.warm:
            return
        up = [n for n in self.nodes.values() if n.up]
        used = sum(sum(n.workers) for n in up)
        total = sum(len(n.workers) for n in up) or 1
        self.samples.append((t, sum(len(n.calls) for n in up), used / total, sum(len(n.queue) for n in up)))

    def throughput(self, n: int = 5000, batch: int = 200) -> float:
        """Placements a second of one registry at the cluster's current state: choose + placed on a copy of the
        placer, which a fresh copy replaces every `batch` placements (the nodes' reports; not timed)."""
        modes = [self._mode() for _ in range(n)]
        elapsed = 0.0
        for first in range(0, n, batch):
            probe = copy.deepcopy(self.placer)
            started = time.perf_counter()
            for i in range(first, min(first + batch, n)):
                chosen = probe.choose(modes[i])
                if chosen is not None:
                    probe.placed(chosen[0], f"x{i}", modes[i])
            elapsed += time.perf_counter() - started
        return n / elapsed

    def results(self) -> dict[str, object]:
        measured = [c for c in self.calls if c.arrival >= self.warm and c.length > 0]
        queued = [c for c in measured if c.queued and c.admitted is not None]
        waits = sorted(c.admitted - c.arrival for c in queued)  # type: ignore[operator]
        lat = sorted(self.place_s)
        concurrent = [s[1] for s in self.samples]
        return {
            "scenario": self.s.model_dump(),
            "calls": len(measured),
            "concurrent_mean": round(statistics.fmean(concurrent), 1) if concurrent else 0,
            "concurrent_max": max(concurrent, default=0),
            "utilisation_mean": round(statistics.fmean(s[2] for s in self.samples), 4) if self.samples else 0,
            "queued_mean": round(statistics.fmean(s[3] for s in self.samples), 1) if self.samples else 0,
            "placement_us": {
                "p50": round(_pct(lat, 0.5) * 1e6, 1),
                "p99": round(_pct(lat, 0.99) * 1e6, 1),
                "max": round(lat[-1] * 1e6, 1) if lat else 0,
            },
            "placements_per_s": round(self.throughput()),
            "queued_calls": len(queued),
            "queue_wait_s": {
                "p50": round(_pct(waits, 0.5), 2),
                "p95": round(_pct(waits, 0.95), 2),
                "max": round(waits[-1], 2) if waits else 0,
            },
            "fifo_inversions": round(_inversions(queued), 4),
            "refused": sum(1 for c in measured if c.ended == "refused"),
            "node_failures": self.failures,
            "calls_lost_to_failures": self.lost,
            "offers_retried_after_dead_node": self.retried,
        }


def _pct(values: list[float], q: float) -> float:
    return values[min(int(q * len(values)), len(values) - 1)] if values else 0.0


def _inversions(calls: list[SimCall]) -> float:
    """Share of pairs of queued callers admitted in the opposite order of their arrival (0: one FIFO)."""
    if len(calls) < 2:
        return 0.0
    order = [c.admitted for c in sorted(calls, key=lambda c: c.arrival)]
    ranks = {v: i for i, v in enumerate(sorted(set(order)))}  # type: ignore[arg-type]
    tree = [0] * (len(ranks) + 1)
    inversions = 0
    for seen, value in enumerate(order):
        r = ranks[value] + 1  # type: ignore[index]
        i, below = r, 0
        while i > 0:  # admitted no later than this one, among the earlier arrivals
            below += tree[i]
            i -= i & -i
        inversions += seen - below
        while r < len(tree):
            tree[r] += 1
            r += r & -r
    pairs = len(order) * (len(order) - 1) // 2
    return inversions / pairs


def scenarios(minutes: float, quick: bool) -> list[Scenario]:
    mean_capacity = sum(CAPACITY[m] * w for m, w in MIX.items())
    small = 10 * 8 * mean_capacity
    if quick:
        return [
            Scenario(name="steady", nodes=20, gpus=8, concurrent=2000, minutes=minutes),
            Scenario(
                name="overload", nodes=4, gpus=8, concurrent=1.2 * 4 * 8 * mean_capacity, minutes=minutes
            ),
        ]
    return [
        Scenario(name="steady", nodes=100, gpus=8, concurrent=10_000, minutes=minutes),
        Scenario(name="overload", nodes=10, gpus=8, concurrent=1.2 * small, minutes=minutes),
    ]


def markdown(results: list[dict[str, object]]) -> str:
    lines = [
        "| scenario | nodes x GPUs | offered | concurrent (mean / max) | utilisation | placement p50 / p99 (us) "
        "| placements/s | queued calls | wait p50 / p95 / max (s) | FIFO inversions | refused | failures "
        "| calls lost | offers retried |",
        "|" + " --- |" * 14,
    ]
    for r in results:
        s = r["scenario"]
        p, w = r["placement_us"], r["queue_wait_s"]
        lines.append(
            f"| {s['name']} | {s['nodes']} x {s['gpus']} | {s['concurrent']:.0f} | {r['concurrent_mean']} / "  # type: ignore[index]
            f"{r['concurrent_max']} | {r['utilisation_mean']:.1%} | {p['p50']} / {p['p99']} | "  # type: ignore[index]
            f"{r['placements_per_s']} | {r['queued_calls']} | {w['p50']} / {w['p95']} / {w['max']} | "  # type: ignore[index]
            f"{r['fifo_inversions']:.2%} | {r['refused']} | {r['node_failures']} | {r['calls_lost_to_failures']} "
            f"| {r['offers_retried_after_dead_node']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-out/placement")
    parser.add_argument("--minutes", type=float, default=15.0, help="simulated minutes per scenario")
    parser.add_argument("--quick", action="store_true", help="smaller clusters (tests)")
    args = parser.parse_args(argv)
    results = []
    for scenario in scenarios(args.minutes, args.quick):
        started = time.perf_counter()
        result = Simulation(scenario).run()
        result["wall_s"] = round(time.perf_counter() - started, 1)
        results.append(result)
        print(json.dumps(result), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "placement.json").write_text(json.dumps(results, indent=1))
    (out / "placement.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
