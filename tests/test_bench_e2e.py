"""bench/e2e.py: its aggregation on synthetic inputs, and one short real run (run.py subprocess, one loopback
caller) on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench.e2e import (
    RATE,
    CallResult,
    GpuSampler,
    Row,
    audio_onset,
    caller_jobs,
    caller_signal,
    frame_gaps_ms,
    gpu_name,
    late_ms,
    main,
    missing_share,
    parse_args,
    pctl,
    stalls_logged,
    summarize,
    table,
    text_latency,
    thread_split,
    tree_cpu,
)


def test_gaps_and_missing_frames() -> None:
    # 20 ms frames over a 10 s window, frames 250..259 (200 ms) never came
    arrivals = [0.01 + 0.02 * k for k in range(500) if not 250 <= k < 260]
    gaps = frame_gaps_ms(arrivals, 0.0, 10.0)
    assert len(gaps) == len(arrivals) + 1  # the window's edges count
    assert gaps[0] == pytest.approx(10) and gaps[-1] == pytest.approx(10)
    assert max(gaps) == pytest.approx(220)  # 4.99 s -> 5.21 s
    assert sorted(gaps)[-2] == pytest.approx(20)
    assert missing_share([0.02] * len(arrivals), 10.0) == pytest.approx(0.02)
    # frames are counted by their length: 40 ms frames are two 20 ms frames
    assert missing_share([0.04] * 200, 10.0) == pytest.approx(0.2)
    assert missing_share([0.02] * 520, 10.0) == 0.0  # a burst after a stall never counts as negative
    assert missing_share([], 10.0) == 1.0
    # frames outside the window are ignored; a window without any frame is one gap of its length
    assert frame_gaps_ms([0.5, 11.0], 1.0, 3.0) == pytest.approx([2000.0])


def test_lateness_is_measured_against_the_audio_each_frame_carried() -> None:
    """40 ms packets 40 ms apart are on time; a 40 ms packet 70 ms after the previous one is 30 ms late; frames
    whose predecessor lies before the window are not judged."""
    arrivals = [0.96, 1.00, 1.04, 1.08, 1.15, 1.19]
    durations = [0.04] * len(arrivals)
    assert late_ms(arrivals, durations, 1.0, 2.0) == pytest.approx([0.0, 0.0, 30.0, 0.0])
    assert late_ms([1.00, 1.02, 1.06], [0.02, 0.02, 0.02], 0.0, 2.0) == pytest.approx([0.0, 20.0])


def test_percentiles_and_summary() -> None:
    assert pctl([], 50) is None
    assert pctl(list(range(1, 101)), 95) == pytest.approx(95.05)
    a = CallResult(
        admitted=True,
        lag_ms=[10.0, 20.0],
        roundtrip_ms=[100.0, 300.0],
        error_codes=["worker_failed"],
        gaps_ms=[20.0] * 98 + [60.0, 500.0],
        frames=450,
        missing_share=0.1,
        voiced_share=0.5,
    )
    b = CallResult(admitted=True, lag_ms=[30.0], roundtrip_ms=[200.0], gaps_ms=[20.0], frames=500)
    a.batch_sessions, b.batch_sessions = [32.0, 32.0], [16.0]
    a.compute_ms, b.compute_ms = [150.0, 250.0], [350.0]
    a.stage_ms, b.stage_ms = {"tts_ms": [40.0], "prefill_ms": []}, {"tts_ms": [60.0]}
    b.missing_share, b.voiced_share = 0.0, 1.0
    refused = CallResult(failure="offer: RuntimeError: POST /api/sessions answered 503", error_codes=["x"])
    row = summarize("audio_duplex", 4, [a, b, refused], 10.0, {"media": 50.0, "worker": 80.0}, (5, 1))
    assert (row.asked, row.admitted, row.units) == (4, 2, 3)
    assert row.lag_ms == pytest.approx({"p50": 20.0, "p95": 29.0, "max": 30.0})
    assert row.roundtrip_ms == pytest.approx({"p50": 200.0, "p95": 290.0, "max": 300.0})
    assert row.errors == 2 and row.error_codes == {"worker_failed": 1, "x": 1}
    assert row.failures == {"offer: RuntimeError": 1, "caller process lost": 1}
    assert row.gap_max_ms == 500.0
    assert row.gap_p99_ms == pytest.approx(float(np.percentile([20.0] * 99 + [60.0, 500.0], 99)))
    assert row.frames_received == 950
    assert row.missing_pct == pytest.approx(5.0)  # mean over the admitted calls only
    assert row.voiced_pct == pytest.approx(75.0)
    assert row.media_cpu_per_call_pct == pytest.approx(25.0)
    assert row.gpu_busy_pct is None
    assert row.batch_sessions == pytest.approx({"p50": 32.0, "p95": 32.0, "max": 32.0})
    assert row.compute_ms == pytest.approx({"p50": 250.0, "p95": 340.0, "max": 350.0})
    assert row.stage_ms == {
        "tts_ms": pytest.approx({"p50": 50.0, "p95": 59.0, "max": 60.0})
    }  # only stages run
    meta = {"mode": "audio_duplex", "date": "d", "cpu": "c", "logical_cpus": 2, "gpu": "none"}
    meta |= {"workers": "one CPU worker", "client_procs": 1, "seconds": 10.0, "warmup": 2.0}
    md = table([row], meta)
    assert "| 2/4 | 20 / 29 / 30 |" in md and "worker_failed×1" in md and "| 5.0 % |" in md
    assert "| 5 / 1 |" in md  # captures and compiles while the calls joined / in the window


def test_chat_turn_latencies() -> None:
    timed = [(1.0, {"type": "text", "turn": 0, "text": "a"}), (5.3, {"type": "text", "turn": 1, "text": "b"})]
    timed.insert(1, (5.1, {"type": "text", "turn": 0, "text": "late delta of the old turn"}))
    assert text_latency(timed, 5.0) == pytest.approx(300)
    assert text_latency(timed, 6.0) is None
    arrivals = [5.0 + 0.02 * k for k in range(50)]
    voiced = [True] * 5 + [False] * 20 + [True] * 25  # the old answer's tail, silence, the new answer
    assert audio_onset(arrivals, voiced, 5.0) == pytest.approx(500)
    assert audio_onset(arrivals, [True] * 50, 5.0) is None


def test_gpu_sampling_with_a_stand_in_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        '#!/bin/sh\ncase "$*" in *name*) echo "Fake GPU 80GB";; *) printf "37, 1000\\n63, 3000\\n";; esac\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert gpu_name() == "Fake GPU 80GB"
    sampler = GpuSampler([0, 1])
    t0 = time.monotonic()
    sampler.start()
    time.sleep(2.5)
    sampler.halt.set()
    assert sampler.window(t0, time.monotonic()) == {"gpu_busy": 50.0, "gpu_mem": 3000.0}
    assert sampler.window(0.0, 1.0) == {}  # no samples: n/a


def test_e2e_loopback_one_call(tmp_path: Path) -> None:
    """Two callers against a server that admits one: the refused caller is counted at once (not after the
    ready timeout), and the admitted call is measured."""
    out = tmp_path / "out"
    argv = ["--mode", "loopback", "--calls", "2", "--capacity", "1", "--seconds", "3", "--warmup", "1"]
    t0 = time.monotonic()
    argv += ["--client-procs", "1", "--out", str(out), "--startup-timeout", "120", "--ready-timeout", "90"]
    assert main(argv) == 0
    assert time.monotonic() - t0 < 90
    results = json.loads((out / "e2e-loopback.json").read_text())
    [row] = results["rows"]
    assert (row["asked"], row["admitted"]) == (2, 1), row
    assert row["errors"] <= 1 and list(row["failures"]) in (
        ["admission: RuntimeError"],
        ["offer: RuntimeError"],
    )
    assert row["frames_received"] > 0 and row["units"] > 0
    assert row["missing_pct"] < 50 and row["roundtrip_ms"]["p50"] is not None
    assert results["meta"]["config"]["server"]["host"] == "127.0.0.1"
    assert (out / "server-loopback.log").stat().st_size > 0
    assert (row["stalls_joining"], row["stalls_window"]) == (0, 0)  # a CPU worker captures nothing
    # the server names its threads: the front's loop carries the in-process calls here (no media shards)
    assert row["thread_cpu_pct"].get("media:front", 0) > 0, row["thread_cpu_pct"]


def test_stalls_are_counted_from_the_server_log(tmp_path: Path) -> None:
    """The graph captures and torch.compile runs a server logs (the flow's, the HiFT decoder's, a static step's,
    a tick's compiles) and its ticks' CUDA allocator retries and garbage collections, nothing else; a missing log counts none."""
    log = tmp_path / "server.log"
    log.write_text(
        "x MiniCPMO45.token2wav.flow_graphs INFO flow graph 5 captured in 412 ms: ChunkShape(bucket=4)\n"
        "x MiniCPMO45.token2wav.padded_graphs INFO CausalHiFTGenerator.decode_spectrum graph 2 captured in 30 ms\n"
        "x inference.worker WARNING a tick of 3 units compiled 1 graph(s) with torch.compile (900 ms)\n"
        "x MiniCPMO45.engine.graphs INFO static step graph 7 captured in 150 ms: {'embeds': (24, 32, 4096)}\n"
        "x inference.worker INFO warm-up done; graphs captured: 12\n"
        "x inference.worker WARNING a tick of 24 units waited on 3 CUDA allocator retries (640 ms): short\n"
        "x inference.worker WARNING a tick of 24 units was held up by 1 garbage collection(s) (95 ms)\n"
        "x inference.worker INFO 2000000 objects of the loaded engine kept out of garbage collections\n"
    )
    assert stalls_logged(log) == 6
    assert stalls_logged(tmp_path / "missing.log") == 0


def test_thread_split_is_the_share_of_a_core_by_thread_name() -> None:
    before = {"worker:mode": 10.0, "worker:ipc": 2.0, "media:media-loop": 5.0}
    after = {"worker:mode": 14.0, "worker:ipc": 2.1, "media:media-loop": 7.0, "media:python": 0.01}
    split = thread_split(before, after, 4.0)
    assert split == {"worker:mode": 100.0, "media:media-loop": 50.0, "worker:ipc": 2.5}
    assert list(split) == [
        "worker:mode",
        "media:media-loop",
        "worker:ipc",
    ]  # busiest first; idle ones left out


def test_a_workers_children_count_as_the_workers() -> None:
    """Processes under this one: a worker (its command line names `inference.worker`) with a child of its own (as
    the GPU worker's compile processes are), and a media-side child. The worker's child is the worker's, not the
    media side's."""
    spawn = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])"
    worker = subprocess.Popen(
        [sys.executable, "-c", spawn + "; time.sleep(30)", "inference.worker"], start_new_session=True
    )
    media = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])

    def parent(pid: int) -> int:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])

    try:
        deadline = time.monotonic() + 10
        while True:
            tree = tree_cpu(os.getpid())
            below = [pid for pid in tree if pid != worker.pid and parent(pid) == worker.pid]
            if below or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert tree[worker.pid][0] and not tree[media.pid][0] and not tree[os.getpid()][0]
        assert len(below) == 1 and tree[below[0]][0]
    finally:
        os.killpg(worker.pid, 9)
        media.kill()
        worker.wait()
        media.wait()


def test_a_mixed_level_splits_its_calls_and_processes_between_chat_and_duplex() -> None:
    assert caller_jobs("chat", 3, 8) == [("chat", 1)] * 3
    assert caller_jobs("audio_duplex", 10, 4) == [("audio_duplex", 3)] * 2 + [("audio_duplex", 2)] * 2
    assert caller_jobs("mixed", 5, 4) == [("chat", 1), ("chat", 1), ("audio_duplex", 2), ("audio_duplex", 1)]
    assert caller_jobs("mixed", 1, 8) == [("audio_duplex", 1)]
    # the media CPU is shared by every admitted call of the level, both modes
    row = summarize(
        "chat (mixed)", 1, [CallResult(admitted=True)], 5.0, {"media": 30.0, "worker": 1.0}, (0, 0), 3
    )
    assert row.media_cpu_per_call_pct == pytest.approx(10.0)


def test_e2e_mixed_chat_and_duplex_calls_on_one_server(tmp_path: Path) -> None:
    """`--mode mixed` on the embedded model (CPU worker): one chat caller typing turns and one audio-duplex
    caller on the same server, a row for each, both admitted and measured."""
    out = tmp_path / "out"
    argv = ["--mode", "mixed", "--calls", "2", "--seconds", "4", "--warmup", "1", "--turn-interval", "2"]
    argv += ["--client-procs", "2", "--out", str(out), "--startup-timeout", "120", "--ready-timeout", "90"]
    assert main(argv) == 0
    rows = json.loads((out / "e2e-mixed.json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["chat (mixed)", "audio_duplex (mixed)"]
    for row in rows:
        assert (row["asked"], row["admitted"], row["errors"]) == (1, 1, 0), row
        assert row["units"] > 0 and row["frames_received"] > 0
    assert rows[0]["turns_sent"] >= 1 and rows[1]["turns_sent"] == 0


def test_e2e_runs_levels_of_several_modes_on_one_server(tmp_path: Path) -> None:
    """`--runs MODE:N ...`: the levels of two modes one after the other on one server start (one log), a JSON with
    its row for each mode; a level's session options reach its calls (here one the server refuses) and name its
    own JSON; a malformed level is refused."""
    out = tmp_path / "out"
    argv = [
        "--runs",
        "loopback:1",
        "audio_duplex:1",
        "audio_duplex:1:max_new_tokens=0",
        "--seconds",
        "3",
        "--warmup",
        "1",
        "--client-procs",
        "1",
    ]
    argv += ["--out", str(out), "--startup-timeout", "120", "--ready-timeout", "90"]
    assert main(argv) == 0
    for mode in ("loopback", "audio_duplex"):
        results = json.loads((out / f"e2e-{mode}.json").read_text())
        [row] = results["rows"]
        assert results["meta"]["mode"] == mode and row["mode"] == mode
        assert (row["asked"], row["admitted"], row["errors"]) == (1, 1, 0), row
        assert row["units"] > 0 and row["frames_received"] > 0
    refused = json.loads((out / "e2e-audio_duplex-max_new_tokens=0.json").read_text())
    [row] = refused["rows"]
    assert refused["meta"]["options"] == {"max_new_tokens": 0} and "session options" in table(
        [Row(**row)], refused["meta"]
    )
    assert (row["asked"], row["admitted"]) == (1, 0) and list(row["failures"]) == ["offer: RuntimeError"], row
    assert [p.name for p in out.glob("server-*.log")] == ["server-loopback-audio_duplex.log"]
    assert parse_args(["--runs", "chat:4:early_reply=false,top_k=5"]).runs[0].options == {
        "early_reply": False,
        "top_k": 5,
    }
    with pytest.raises(SystemExit):
        parse_args(["--runs", "chat:4:early_reply"])
    with pytest.raises(SystemExit):
        parse_args(["--runs", "chat48"])
    with pytest.raises(SystemExit):
        parse_args(["--runs", "karaoke:4"])


def test_chat_callers_speak_their_turns_on_a_period(tmp_path: Path) -> None:
    typed = caller_signal("chat", tmp_path)
    assert not typed.any()  # typed turns: a quiet microphone
    spoken = caller_signal("chat", tmp_path, "spoken", period_s=7.0)
    assert spoken.size == pytest.approx(7.0 * RATE, abs=1)  # one sentence, then the pause, every period
    voiced = np.flatnonzero(np.abs(spoken) > 0.05)
    assert voiced[0] < RATE and voiced[-1] < 5 * RATE  # the sentence leads, the reply gets the rest
    duplex = caller_signal("audio_duplex", tmp_path, "spoken", period_s=7.0)
    assert duplex.size < spoken.size  # duplex callers pause 1.5 s between sentences, whatever the period


def test_e2e_chat_with_spoken_turns_reports_the_server_turn_end_to_speech(tmp_path: Path) -> None:
    """`--chat-turns spoken` on the embedded model: the caller's sentences end turns at the server's VAD, and the
    row has the server's turn end -> first speech for them."""
    out = tmp_path / "out"
    argv = ["--mode", "chat", "--calls", "1", "--seconds", "7", "--warmup", "1", "--chat-turns", "spoken"]
    argv += ["--turn-interval", "4", "--client-procs", "1", "--out", str(out)]
    argv += ["--startup-timeout", "120", "--ready-timeout", "90"]
    assert main(argv) == 0
    results = json.loads((out / "e2e-chat.json").read_text())
    [row] = results["rows"]
    assert (row["admitted"], row["errors"], row["turns_sent"]) == (1, 0, 0), row
    first = row["stage_ms"]["turn_to_speech_ms"]
    assert 0 < first["p50"] <= first["max"] < 5000, first
    assert row["stage_ms"]["tick_ms"]["p50"] > 0
    # the turns' own units: their stages beside the turn end -> speech they carry
    assert row["turn_stage_ms"]["turn_to_speech_ms"] == first and "tick_ms" in row["turn_stage_ms"]
    assert row["early_replies"] >= 1, row  # the caller's sentences end in silence: answered early
    md = table([Row(**row)], results["meta"])
    assert "turn end→speech (server)" in md and f"| {first['p50']:.0f} / {first['p95']:.0f} (early " in md
    assert "chat turns spoken every 4 s" in md
