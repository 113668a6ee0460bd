"""Media shards: calls placed on several media processes behind one front, over real aiortc callers.

The front keeps the HTTP port, admission and the registry; each shard owns its calls' peer connections and
talks to the worker over its own data link. A shard that dies ends only its own calls, and is restarted."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from tests.rtc_client import RATE, Call

TONE = (0.2 * np.sin(2 * np.pi * 300 * np.arange(RATE * 30) / RATE)).astype(np.float32)


async def wait_for(predicate, timeout: float = 15.0, what: str = "condition") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def sharded_server(start_test_server, **workers: object):  # noqa: ANN001, ANN201
    return await start_test_server(workers={"media_procs": 2, **workers})


def shard_of(server, call: Call) -> int:  # noqa: ANN001
    (shard,) = [s for s in server.manager.shards.shards if call.session_id in s.calls]
    return shard.shard_id


async def open_calls(server, n: int, mode: str = "loopback", **extra: object) -> list[Call]:  # noqa: ANN001
    calls = []
    for _ in range(n):
        call = Call(server.url, TONE)
        await call.start_json(mode, **extra)
        calls.append(call)
    await asyncio.gather(*(c.wait_connected(20) for c in calls))
    return calls


async def test_calls_spread_over_two_shards_and_media_flows(start_test_server) -> None:
    server = await sharded_server(start_test_server)
    assert server.manager.shards is not None and len(server.manager.shards.shards) == 2
    calls = await open_calls(server, 2)
    try:
        assert sorted(shard_of(server, c) for c in calls) == [0, 1]
        for call in calls:
            await call.wait_event("session", phase="active", timeout=15)
        # loopback: each caller hears its own tone back through its shard
        await wait_for(lambda: all(c.recorder.samples > RATE for c in calls), 15, "loopback audio")  # 1 s
        # the front sees both shards' calls: the list, one entry, and /metrics
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{server.url}/api/sessions") as resp:
                listed = {s["session_id"]: s for s in (await resp.json())["sessions"]}
            assert set(listed) == {c.session_id for c in calls}
            assert all(s["phase"] == "active" and s["worker_id"] == 0 for s in listed.values())
            async with http.get(f"{server.url}/api/sessions/{calls[1].session_id}") as resp:
                assert resp.status == 200 and (await resp.json())["mode"] == "loopback"
            await asyncio.sleep(1.5)  # a snapshot from each shard
            async with http.get(f"{server.url}/metrics") as resp:
                text = await resp.text()
        assert 'rtc_media_shard_up{shard="0"} 1' in text and 'rtc_media_shard_up{shard="1"} 1' in text
        frames_in = float(text.split("\nrtc_media_frames_in_total ")[1].split("\n")[0])
        assert frames_in > 100, "the shards' inbound frames are not in the front's metrics"
        for call in calls:
            assert await call.hang_up() == 200
        await wait_for(lambda: not server.manager.sessions, 10, "the calls to end")
        # each shard recorded its own call into the one recordings folder
        recorded = Path(server.config.recording.dir)
        await wait_for(
            lambda: all((recorded / c.session_id / "meta.json").is_file() for c in calls), 10, "recordings"
        )
        for call in calls:
            assert json.loads((recorded / call.session_id / "meta.json").read_text())["ended"]
        assert not server.manager.admission.busy
        assert all(not s.calls for s in server.manager.shards.shards)
        async with (
            aiohttp.ClientSession() as http
        ):  # an ended call's URL says how it ended; a made-up one is 404
            async with http.get(f"{server.url}/api/sessions/{calls[0].session_id}") as resp:
                assert resp.status == 410 and (await resp.json())["error"]["code"] == "session_ended"
            async with http.get(f"{server.url}/api/sessions/{calls[0].session_id[:-2]}xy") as resp:
                assert resp.status == 404
    finally:
        for call in calls:
            await call.close()


async def test_a_killed_shard_ends_only_its_calls_and_comes_back(start_test_server) -> None:
    server = await sharded_server(start_test_server)
    calls = await open_calls(server, 2)
    new_call: Call | None = None
    try:
        for call in calls:
            await call.wait_event("session", phase="active", timeout=15)
        victim = next(c for c in calls if shard_of(server, c) == 0)
        survivor = next(c for c in calls if c is not victim)
        shard0 = server.manager.shards.shards[0]
        os.kill(shard0.pid, signal.SIGKILL)
        await wait_for(lambda: victim.session_id not in server.manager.sessions, 10, "the lost call to go")
        assert victim.session_id not in server.manager.admission.busy, "the lost call kept its slot"
        assert survivor.session_id in server.manager.admission.busy
        # its events channel died with the shard: the caller learns why at the call's URL (410)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{server.url}/api/sessions/{victim.session_id}") as resp:
                assert resp.status == 410
                assert (await resp.json())["error"]["code"] == "media_process_lost"
            async with http.get(f"{server.url}/api/sessions/{survivor.session_id}") as resp:
                assert resp.status == 200
        # the other shard's call goes on: its audio keeps arriving
        before = survivor.recorder.samples
        await asyncio.sleep(1.0)
        assert survivor.recorder.samples - before > 0.6 * RATE
        assert survivor.pc.connectionState == "connected"
        await wait_for(lambda: shard0.up and shard0.restarts == 1, 30, "the shard to restart")
        # a new call still works (whichever shard takes it)
        (new_call,) = await open_calls(server, 1)
        await new_call.wait_event("session", phase="active", timeout=15)
        await wait_for(lambda: new_call.recorder.samples > RATE, 15, "audio on the new call")
    finally:
        for call in [*calls, *([new_call] if new_call else [])]:
            await call.close()


async def test_admission_counts_the_calls_of_every_shard(start_test_server) -> None:
    server = await sharded_server(start_test_server, cpu_capacity=2)
    calls = await open_calls(server, 3)
    try:
        phases = []
        for call in calls:
            event = await call.wait_event("session", timeout=15)
            phases.append(event["phase"])
        await wait_for(lambda: len(server.manager.admission.busy) == 2, 10, "two admitted calls")
        assert len({shard_of(server, c) for c in calls}) == 2
        queued = [c for c in calls if c.session_id in {t.id for t in server.manager.admission.waiting}]
        assert len(queued) == 1
        await queued[0].wait_event("queue", timeout=10)
        # one admitted caller hangs up: the queued one, on whichever shard, gets the slot
        leaving = next(c for c in calls if c is not queued[0])
        assert await leaving.hang_up() == 200
        await queued[0].wait_event("session", phase="active", timeout=15)
    finally:
        for call in calls:
            await call.close()


async def test_trickle_and_delete_reach_the_owning_shard(start_test_server) -> None:
    server = await sharded_server(start_test_server)
    calls = [Call(server.url, TONE), Call(server.url, TONE)]
    try:
        for call in calls:
            await call.start_whip("loopback")
        await asyncio.gather(*(c.wait_connected(20) for c in calls))
        assert sorted(shard_of(server, c) for c in calls) == [0, 1]
        frag = "a=mid:0\r\na=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host\r\na=end-of-candidates\r\n"
        bad = "a=mid:0\r\na=candidate:nonsense\r\n"
        headers = {"Content-Type": "application/trickle-ice-sdpfrag"}
        async with aiohttp.ClientSession() as http:
            for call in calls:
                async with http.patch(f"{server.url}{call.location}", data=frag, headers=headers) as resp:
                    assert resp.status == 204, await resp.text()
                async with http.patch(f"{server.url}{call.location}", data=bad, headers=headers) as resp:
                    assert resp.status == 400 and (await resp.json())["error"]["code"] == "bad_candidate"
        target = calls[1]
        owner = server.manager.shards.shards[shard_of(server, target)]
        assert await target.hang_up() == 204
        await wait_for(lambda: target.session_id not in owner.calls, 10, "the owning shard to end the call")
        await wait_for(lambda: target.pc.connectionState in ("closed", "failed"), 20, "the caller to see it")
        assert calls[0].pc.connectionState == "connected"
    finally:
        for call in calls:
            await call.close()


@pytest.mark.parametrize("mode", ["audio_duplex"])
async def test_a_model_mode_runs_over_the_shards_data_link(start_test_server, mode: str) -> None:
    """The unit path shard -> worker -> shard, never through the front: units go out, metrics come back."""
    server = await sharded_server(start_test_server)
    (call,) = await open_calls(server, 1, mode)
    try:
        await call.wait_event("session", phase="active", timeout=30)
        await call.wait_event("metrics", timeout=30)
        assert server.manager.stats.units_sent == 0, "units went through the front"
        await asyncio.sleep(1.2)
        assert server.manager.totals().stats.units_sent > 0
    finally:
        await call.close()
