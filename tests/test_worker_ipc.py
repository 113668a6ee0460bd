"""The worker IPC protocol and the supervisor's per-GPU worker processes."""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from inference import protocol as p
from inference.modes import create_mode, mode_names
from inference.modes.base import ModeUnit, SessionOptions
from inference.processes import kill
from inference.settings import LoopbackSettings, SupervisorSettings, WorkerSettings
from inference.supervisor import WorkerHandle, WorkerSupervisor


async def _roundtrip(data: bytes) -> tuple[p.Message, bytes]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return await p.read_message(reader)


async def test_messages_roundtrip_with_binary_payload() -> None:
    pcm = np.linspace(-1, 1, 1600, dtype=np.float32)
    frame = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    unit = p.Unit(
        session_id="s", index=3, samples=pcm.size, completed_at=1.5, sent_at=1.6, frame_shape=(2, 3, 3)
    )
    message, payload = await _roundtrip(p.encode(unit, p.pcm_to_bytes(pcm) + frame.tobytes()))
    assert message == unit
    got_pcm, got_frame = p.split_unit_payload(message, payload)
    np.testing.assert_array_equal(got_pcm, pcm)
    np.testing.assert_array_equal(got_frame, frame)


@pytest.mark.parametrize(
    "data",
    [
        struct.pack(">II", 5, 0) + b"{nope",
        struct.pack(">II", 17, 0) + b'{"type": "bogus"}',
        struct.pack(">II", p.MAX_HEADER_BYTES + 1, 0),
    ],
)
async def test_garbage_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(p.ProtocolError):
        await _roundtrip(data)


async def test_a_length_over_the_callers_bound_is_refused_before_reading_on() -> None:
    reader = asyncio.StreamReader()  # no body and no EOF: reading on would wait forever
    reader.feed_data(struct.pack(">II", p.MAX_HELLO_BYTES + 1, 0))
    with pytest.raises(p.ProtocolError):
        await asyncio.wait_for(p.read_message(reader, p.MAX_HELLO_BYTES, 0), 1.0)


def test_hello_proof_binds_nonce_worker_and_pid() -> None:
    secret = b"k" * 32
    hello = p.Hello(worker_id=0, pid=42, device="cpu", modes=[], proof=p.hello_proof(secret, "n1", 0, 42))
    assert p.proof_ok(secret, "n1", hello)
    assert "proof" not in repr(hello)
    assert not p.proof_ok(b"x" * 32, "n1", hello)
    assert not p.proof_ok(secret, "n2", hello)
    assert not p.proof_ok(secret, "n1", hello.model_copy(update={"pid": 43}))
    assert not p.proof_ok(secret, "n1", hello.model_copy(update={"worker_id": 1}))


async def test_wrong_unit_payload_size_is_rejected() -> None:
    unit = p.Unit(session_id="s", index=0, samples=10, completed_at=0, sent_at=0)
    with pytest.raises(p.ProtocolError):
        p.split_unit_payload(unit, b"\0" * 12)


async def test_a_frame_ahead_is_checked_like_a_units_frame() -> None:
    ok = p.FrameAhead(session_id="s", index=3, frame_shape=(2, 4, 3))
    assert p.frame_ahead_pixels(ok, bytes(range(24))).shape == (2, 4, 3)
    with pytest.raises(p.ProtocolError):
        p.frame_ahead_pixels(ok, b"\0" * 23)
    for shape in ((0, 4, 3), (2, 4, 4), (5000, 4, 3)):  # empty, not RGB, over the side limit
        header = {"type": "frame_ahead", "session_id": "s", "index": 3, "frame_shape": list(shape)}
        with pytest.raises(p.ProtocolError):
            p.decode_header(json.dumps(header).encode())
    assert p.decode_header(json.dumps({**header, "frame_shape": [2, 4, 3]}).encode()) == ok
    # a unit that says its frame went ahead carries none
    unit = p.Unit(session_id="s", index=3, samples=2, completed_at=0, sent_at=0, frame_ahead=True)
    assert p.split_unit_payload(unit, b"\0" * 8)[1] is None
    with pytest.raises(p.ProtocolError):
        p.split_unit_payload(unit.model_copy(update={"frame_shape": (1, 1, 3)}), b"\0" * 11)


async def test_a_peer_that_falls_behind_gets_no_units_or_frames_ahead_but_every_other_message() -> None:
    """`write_bounded` over a real socket whose peer stopped reading: past `MAX_WRITE_BUFFER` unsent, units and
    frames ahead are dropped (a frame ahead then goes with its unit), controls still go."""
    accepted: asyncio.Future[asyncio.StreamReader] = asyncio.get_running_loop().create_future()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result(reader)  # never read
        await asyncio.sleep(30)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    _, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
    try:
        await accepted
        unit = p.Unit(session_id="s", index=0, samples=16000, completed_at=0, sent_at=0)
        pcm = b"\0" * 64000
        while writer.transport.get_write_buffer_size() <= p.MAX_WRITE_BUFFER:
            assert p.write_bounded(writer, unit, pcm) == "sent"
            await asyncio.sleep(0)  # the kernel's buffers fill first
        frame = p.FrameAhead(session_id="s", index=1, frame_shape=(392, 518, 3))
        assert p.write_bounded(writer, frame, b"\0" * (392 * 518 * 3)) == "dropped"
        assert p.write_bounded(writer, unit, pcm) == "dropped"
        assert p.write_bounded(writer, p.Control(session_id="s", message={"type": "pause"})) == "sent"
    finally:
        writer.transport.abort()
        server.close()


def test_loopback_mode_schedules_from_the_capture_timeline() -> None:
    assert "loopback" in mode_names()
    mode = create_mode("loopback", WorkerSettings(loopback=LoopbackSettings(delay_s=1.0, unit_ms=100)))
    setup, outputs = mode.open(SessionOptions(session_id="s"))
    assert setup.unit_samples == 1600 and setup.output_rate == 24000
    pcm = np.sin(np.arange(1600) / 10).astype(np.float32)
    (speech,) = mode.on_unit(ModeUnit(index=0, pcm=pcm, completed_at=100.0), None)
    assert isinstance(speech, p.AudioOut) and speech.pcm.size == 2400
    assert speech.play_at == pytest.approx(100.0 - 0.1 + 1.0 - 0.2)
    # a unit stamped late (a stalled loop) still plays on the capture timeline, not later
    (speech,) = mode.on_unit(ModeUnit(index=1, pcm=pcm, completed_at=100.4), None)
    assert speech.play_at == pytest.approx(100.0 - 0.1 + 0.1 + 1.0 - 0.2)
    mode.on_control({"type": "pause"})
    assert mode.on_unit(ModeUnit(index=2, pcm=pcm, completed_at=100.3), None) == []
    with pytest.raises(KeyError, match="unknown mode"):
        create_mode("karaoke", WorkerSettings())


async def test_one_worker_per_gpu_with_its_own_cuda_visible_devices() -> None:
    supervisor = WorkerSupervisor(SupervisorSettings(gpus=[0, 1], start_timeout_s=30), WorkerSettings())
    await supervisor.start()
    try:
        assert [w.device for w in supervisor.workers] == ["cuda:0", "cuda:1"]
        for worker in supervisor.workers:
            assert worker.up and worker.modes == mode_names()
            environ = Path(f"/proc/{worker.pid}/environ").read_bytes().split(b"\0")
            assert f"CUDA_VISIBLE_DEVICES={worker.gpu}".encode() in environ
            assert b"PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in environ
    finally:
        await supervisor.stop()
    assert all(w.process is not None and w.process.returncode is not None for w in supervisor.workers)


def test_gpu_workers_get_expandable_segments_unless_the_operator_chose(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    off = WorkerSettings.model_validate({"model": {"expandable_segments": False}})
    on = WorkerSupervisor(SupervisorSettings(gpus=[0]), WorkerSettings())
    gpu, cpu = WorkerHandle(worker_id=0, gpu=0, capacity=1), WorkerHandle(worker_id=1, gpu=None, capacity=1)
    assert on._env(gpu)["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in on._env(cpu)
    assert "PYTORCH_CUDA_ALLOC_CONF" not in WorkerSupervisor(SupervisorSettings(gpus=[0]), off)._env(gpu)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:256")
    assert on._env(gpu)["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:256"


async def test_stop_right_as_a_worker_says_hello_does_not_hang() -> None:
    """stop() cancels the keep-alive task in the very step in which the worker's hello completes: on Python
    3.11 `asyncio.wait_for` swallowed that cancellation, the task went on to wait for the worker process to
    exit, and stop() waited for the task forever (seen once in a full test run)."""
    for _ in range(3):
        supervisor = WorkerSupervisor(SupervisorSettings(start_timeout_s=30), WorkerSettings())
        await supervisor.start(wait_ready=False)
        worker = supervisor.workers[0]
        while worker.hello is None:
            await asyncio.sleep(0.01)
        stopping: list[asyncio.Future[None]] = []

        def stop_now(_: object, sup: WorkerSupervisor = supervisor, out: list = stopping) -> None:
            out.append(asyncio.ensure_future(sup.stop()))

        worker.hello.add_done_callback(stop_now)
        while not stopping:
            await asyncio.sleep(0.01)
        done, _ = await asyncio.wait(stopping, timeout=10)  # (asyncio.wait never cancels what it waits for)
        if not done:  # free the hung stop() before failing: kill the worker it waits for
            kill(worker.process)
            await stopping[0]
        assert done, "stop() hung: the keep-alive task lost its cancellation"
        assert worker.process is not None and worker.process.returncode is not None
