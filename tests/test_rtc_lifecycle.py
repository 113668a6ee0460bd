"""Call lifecycle: a vanished caller, a killed worker, capacity and the queue, and /metrics."""

from __future__ import annotations

import asyncio
import gc
import os
import re
import signal
import time
import weakref

import aiohttp
import numpy as np

from tests.rtc_client import RATE, Call


def _tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)


async def _wait_for(predicate, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def _vanish(call: Call) -> None:
    """Close the caller's UDP sockets without a word to the server: no DELETE, no DTLS close, no ICE."""
    for transceiver in call.pc.getTransceivers():
        ice = transceiver.sender.transport.transport
        for protocol in ice.iceGatherer._connection._protocols:
            protocol.transport.close()


async def test_vanished_caller_is_cleaned_up_within_the_consent_timeout(start_test_server) -> None:
    server = await start_test_server()
    rtc = server.config.rtc
    tasks_before = {t for t in asyncio.all_tasks()}
    call = Call(server.url, _tone(10))
    try:
        await call.start_json("loopback")
        await call.wait_connected()
        await call.wait_event("state")
        session = server.manager.get(call.session_id)
        assert session is not None
        pc_ref = weakref.ref(session.pc)
        del session
        _vanish(call)
        # consent checks: each interval (x1.2 jitter) plus one STUN timeout (<= 1 s) per failure
        budget = rtc.consent_failures * (rtc.consent_interval_s * 1.2 + 1.0) + 2.0
        took = await _wait_for(lambda: not server.manager.sessions, budget, "the session to be dropped")
        print(f"vanished caller dropped after {took:.1f} s (budget {budget:.1f} s)")
        assert server.manager.admission.busy == {} and server.manager.admission.waiting == []
        async with aiohttp.ClientSession() as http:  # the call's URL says it ended, and why
            async with http.get(f"{server.url}/api/sessions/{call.session_id}") as resp:
                body = await resp.json()
        assert resp.status == 410 and body["error"]["code"] == "session_ended", body
        assert body["error"]["message"] == "connection closed", body
    finally:
        await call.close()
    await asyncio.sleep(0.3)
    gc.collect()
    assert pc_ref() is None, "the server still holds the peer connection"
    leaked = [
        t for t in asyncio.all_tasks() - tasks_before if not t.done() and t is not asyncio.current_task()
    ]
    assert not leaked, f"tasks left behind: {leaked}"


async def test_killed_worker_fails_its_calls_and_comes_back(start_test_server) -> None:
    # Two workers (as with --gpus 0,1; the loopback mode needs no GPU), one call on each.
    server = await start_test_server(workers={"gpus": [0, 1], "capacity_per_gpu": 1})
    victim, bystander = Call(server.url, _tone(20)), Call(server.url, _tone(20))
    try:
        for call in (victim, bystander):
            await call.start_json("loopback")
            await call.wait_connected()
            await call.wait_event("metrics")  # units are flowing through the worker
        worker = server.supervisor.workers[server.manager.get(victim.session_id).worker_id]
        other = server.supervisor.workers[server.manager.get(bystander.session_id).worker_id]
        assert worker is not other
        old_pid = worker.pid
        os.kill(old_pid, signal.SIGKILL)
        error = await victim.wait_event("error", timeout=10)
        assert error["code"] == "worker_failed"
        await _wait_for(
            lambda: victim.session_id not in server.manager.sessions, 5, "the failed session to close"
        )
        await _wait_for(lambda: victim.pc.connectionState == "closed", 5, "the caller's connection to close")
        await _wait_for(lambda: worker.up and worker.pid != old_pid, 20, "the worker to restart")
        assert worker.restarts == 1 and other.restarts == 0
        # the other worker's call was untouched and still flows
        assert not any(e["type"] == "error" for e in bystander.events)
        seen = len(bystander.events)
        await _wait_for(lambda: any(e["type"] == "metrics" for e in bystander.events[seen:]), 5, "more units")
        assert bystander.session_id in server.manager.sessions
        await bystander.hang_up()
    finally:
        await victim.close()
        await bystander.close()
    call = Call(server.url, _tone(1.0))
    try:
        await call.start_whip("loopback")
        await call.wait_connected()
        await asyncio.sleep(1.0 + server.config.loopback.delay_s + 0.3)
        assert np.sqrt(np.mean(call.recorder.signal() ** 2)) > 0.02, "no audio came back after the restart"
        await call.hang_up()
    finally:
        await call.close()


# ---- Prometheus text format ----

_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r"(?:\{(?P<labels>[a-zA-Z_][a-zA-Z0-9_]*=\"(?:[^\"\\]|\\.)*\"(?:,[a-zA-Z_][a-zA-Z0-9_]*=\"(?:[^\"\\]|\\.)*\")*)?\})?"
    r" (?P<value>[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|Inf|NaN))$"
)


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """A strict little parser for the text exposition format; raises AssertionError on anything off."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in {"counter", "gauge", "histogram", "summary", "untyped"}, line
            assert name not in types, f"TYPE twice for {name}"
            types[name] = kind
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name = match["name"]
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"sample {name} before its TYPE"
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', match["labels"] or ""))
        samples.setdefault(name, []).append((labels, float(match["value"])))
    for name, kind in types.items():
        if kind == "histogram":
            buckets = samples[f"{name}_bucket"]
            counts = [v for _, v in buckets]
            assert counts == sorted(counts), f"{name} buckets not cumulative"
            assert buckets[-1][0]["le"] == "+Inf" and counts[-1] == samples[f"{name}_count"][0][1]
    return samples


async def _metrics(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return parse_prometheus(await resp.text())


def _value(metrics: dict, name: str, **labels: str) -> float:
    return sum(v for lab, v in metrics[name] if all(lab.get(k) == x for k, x in labels.items()))


async def test_capacity_one_queues_the_second_caller_and_metrics_parse(start_test_server) -> None:
    server = await start_test_server(workers={"cpu_capacity": 1}, queue={"max_length": 1})
    url = server.url
    first, second, third = Call(url, _tone(20)), Call(url, _tone(20)), Call(url, _tone(20))
    try:
        await first.start_json("loopback")
        await first.wait_connected()
        await first.wait_event("metrics")
        await second.start_whip("loopback")
        await second.wait_connected()
        queued = await second.wait_event("queue")
        assert queued["position"] == 1 and queued["eta_s"] >= 0
        await second.wait_event("session", phase="queued")
        # the queue holds one caller: the next one is turned away
        async with aiohttp.ClientSession() as http:
            offer = await Call(url, _tone(0.1))._offer()
            async with http.post(
                f"{url}/api/sessions", json={"sdp": offer, "type": "offer", "mode": "loopback"}
            ) as r:
                assert r.status == 503 and (await r.json())["error"]["code"] == "queue_full"
        metrics = await _metrics(url)
        assert _value(metrics, "rtc_queue_length") == 1
        assert _value(metrics, "rtc_sessions", mode="loopback", state="active") == 1
        assert _value(metrics, "rtc_sessions", mode="loopback", state="queued") == 1
        assert _value(metrics, "rtc_sessions_talking", mode="loopback", state="listening") == 1
        assert _value(metrics, "rtc_units_processed_total") > 0
        assert _value(metrics, "rtc_unit_latency_seconds_count") > 0
        assert _value(metrics, "rtc_worker_up", worker="0") == 1
        assert (
            _value(metrics, "rtc_media_frames_in_total") > 0
            and _value(metrics, "rtc_media_frames_out_total") > 0
        )
        assert not any(e["type"] == "metrics" for e in second.events), (
            "a queued caller's audio reached a worker"
        )

        # a queued caller who hangs up leaves the queue; the next one takes its place
        assert await second.hang_up() == 204
        await third.start_json("loopback")
        await third.wait_event("queue", position=1)

        # when the first caller hangs up, the queued one starts
        assert await first.hang_up() == 200
        await third.wait_event("session", phase="active")
        await third.wait_event("state", state="listening")
        await third.wait_event("metrics")
        metrics = await _metrics(url)
        assert _value(metrics, "rtc_queue_length") == 0
        assert _value(metrics, "rtc_sessions", mode="loopback", state="active") == 1
        assert _value(metrics, "rtc_sessions_started_total", mode="loopback") == 3
        await third.hang_up()
    finally:
        for call in (first, second, third):
            await call.close()


async def test_caller_that_never_connects_is_dropped(start_test_server) -> None:
    server = await start_test_server(rtc={"connect_timeout_s": 1.5})
    call = Call(server.url, _tone(1.0))
    try:
        offer = await call._offer()
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{server.url}/whip?mode=loopback", data=offer, headers={"Content-Type": "application/sdp"}
            ) as r:
                assert r.status == 201
    finally:
        await call.close()  # never applies the answer: ICE and DTLS never complete
    assert len(server.manager.sessions) == 1
    took = await _wait_for(lambda: not server.manager.sessions, 6, "the unconnected session to be dropped")
    assert took < 5
    assert server.manager.admission.busy == {}
