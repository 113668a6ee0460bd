"""The worker process: serves the sessions the server assigns to it, one mode instance per session.

Started by `inference.supervisor.WorkerSupervisor` as `python -m inference.worker --connect HOST:PORT ...`;
it connects to the server, answers its challenge with `hello` (proving the secret from its environment),
then handles `open`/`unit`/`control`/`close` messages (queued per session, bounded: `SessionQueue`) and
answers `ping` at once. Mode code runs in a single worker thread (one model per process; GPU work never runs
in the IPC loop), so heartbeats keep flowing while a mode is busy. Units of modes that batch (`on_units`,
the duplex modes) go through `UnitTicker` (`inference/ticker.py`): each tick takes the waiting unit of every
such session and runs them as one call, so N sessions cost one batched model pass per tick instead of N
passes. The sessions, their queues and runners are in `inference/sessions.py`. This module must never import
aiortc; heavy imports (torch, the engine) happen lazily inside the modes that need them.

Its settings (`--settings`, the JSON of `inference.settings.WorkerSettings`) are parsed and validated once,
in `main`.

With `--listen PATH` the worker also serves data links on a Unix socket (mode 0600): each media shard
connects, proves the same secret (`link_hello`) and then sends its sessions' messages itself; a session's
outputs go back on the connection that opened it (`Sessions`), and a link that closes ends its sessions
(`inference/link_server.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import os
import sys
import time
from pathlib import Path

from inference import gc_pauses
from inference import protocol as p
from inference.capacity import WorkerCapacity
from inference.link_server import LinkServer
from inference.modes import load_extra_modes, mode_names
from inference.processes import name_this_thread
from inference.sessions import Connection, Sessions
from inference.settings import WorkerSettings

log = logging.getLogger("inference.worker")
MEMORY_LOG_S = 30.0  # a GPU worker logs its memory this often


def planned_capacity(settings: WorkerSettings) -> WorkerCapacity:
    """The capacity known before the model loads (no torch import): the operator's table or number, else one
    session until the preloading GPU worker has measured its card and memory."""
    from inference.capacity import planned_capacity as plan  # pydantic only, no torch

    return plan(
        explicit_table=settings.model.capacity_table,
        configured=settings.max_sessions,
        card=None,
        context=settings.model.max_kv_tokens,
        modes=mode_names(),
    )


def wants_preload(settings: WorkerSettings, device: str) -> bool:
    """Preload on a worker whose GPU is really there (`preload_engine` in the settings overrides). Checked
    without importing torch (seconds of import with the GIL held would stall this process's IPC loop): a
    worker given a GPU id on a machine without the NVIDIA driver (tests) keeps its mode thread free."""
    if settings.preload_engine is not None:
        return settings.preload_engine
    return device.startswith("cuda") and Path("/dev/nvidiactl").exists()


def preload_engine(settings: WorkerSettings) -> WorkerCapacity | None:
    """Load the model, size its caches to the card's memory and capture the duplex graphs (compiling their
    attention kernels) now, on the mode thread, so the first call does not wait for them. Returns the
    capacity the worker then holds; None if preloading failed (logged; the first session tries again and
    reports the error)."""
    try:
        from inference.engine_host import get_host  # torch and the model: only where they are used

        host = get_host(settings)
        host.duplex_batcher()
        frozen = gc_pauses.freeze_loaded()
        log.info("%d objects of the loaded engine kept out of garbage collections", frozen)
        return host.capacity
    except Exception:
        log.exception("preloading the engine failed; the first session will try again")
        return None


async def report_capacity(
    conn: Connection, executor: concurrent.futures.Executor, settings: WorkerSettings, plan: WorkerCapacity
) -> None:
    """Preload on the mode thread, then tell the server the capacity the worker holds (the plan if
    preloading failed: the first session then reports the error)."""
    loop = asyncio.get_running_loop()
    capacity = await loop.run_in_executor(executor, preload_engine, settings) or plan
    await conn.send(p.CapacityOut(**capacity.model_dump()))
    from inference import engine_host  # loaded by the preload above

    host = engine_host._HOST
    while host is not None and host.device.type == "cuda":  # what live ticks allocate beyond the warm-up
        await asyncio.sleep(MEMORY_LOG_S)
        log.info("%s", host.memory_report())


async def serve(
    host: str,
    port: int,
    worker_id: int,
    device: str,
    settings: WorkerSettings,
    secret: bytes | None = None,
    listen: str | None = None,
) -> None:
    """Serve the server at host:port. With `secret`, the server's challenge comes first and the hello proves
    the secret; without, the hello goes first, unproven (a test server that does not check). With `listen`
    (and `secret`), data links are served on that Unix socket path as well."""
    plan = planned_capacity(settings)
    preload = wants_preload(settings, device)
    settings = settings.model_copy(update={"device": device})
    name_this_thread("ipc")  # the event loop: the server connection, the data links, the session runners
    gc_pauses.watch()  # long collections during ticks get logged (`UnitTicker`)
    executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="mode", initializer=name_this_thread, initargs=("mode",)
    )
    sessions = Sessions(executor, settings)
    links: LinkServer | None = None
    preloading: asyncio.Task[None] | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        if listen is not None and secret is None:
            log.error("no secret: data links on %s are not served", listen)
        elif listen is not None and secret is not None:
            links = LinkServer(listen, secret, sessions)
            try:
                await links.start()
            except OSError:  # the control connection still serves: the in-process media mode works
                log.exception("cannot serve data links on %s", listen)
                links = None
        reader, writer = await asyncio.open_connection(host, port)
        conn = Connection(writer)
        proof = ""
        if secret is not None:
            challenge, _ = await p.read_message(reader, p.MAX_HELLO_BYTES, 0)
            if not isinstance(challenge, p.Challenge):
                raise p.ProtocolError(f"expected the server's challenge, got {challenge.type!r}")
            proof = p.hello_proof(secret, challenge.nonce, worker_id, os.getpid())
        await conn.send(
            p.Hello(
                worker_id=worker_id,
                pid=os.getpid(),
                device=device,
                modes=mode_names(),
                capacity=plan.sessions,
                capacity_by_mode=plan.by_mode,
                capacity_source=plan.source,
                capacity_final=not preload,
                proof=proof,
            )
        )
        if preload:
            preloading = asyncio.create_task(report_capacity(conn, executor, settings, plan), name="preload")
        while True:
            try:
                message, payload = await p.read_message(reader)
            except asyncio.IncompleteReadError:
                return  # the server went away: nothing left to serve
            await sessions.handle(conn, message, payload, time.monotonic())
    finally:
        if preloading is not None:
            preloading.cancel()
        if links is not None:
            links.close()
        sessions.end_all()
        sessions.ticker.task.cancel()
        executor.shutdown(wait=False, cancel_futures=True)
        if writer is not None:
            writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="MiniCPM-o 4.5 inference worker (started by the server)")
    parser.add_argument("--connect", required=True, help="HOST:PORT of the server's worker listener")
    parser.add_argument("--worker-id", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--settings", default="{}", help="the worker's settings (JSON of WorkerSettings)")
    parser.add_argument("--listen", default=None, help="Unix socket path to serve data links on (mode 0600)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"worker{args.worker_id} %(levelname)s %(message)s")
    # out of the environment of anything this process starts; a worker without it is refused by the server
    secret = bytes.fromhex(os.environ.pop(p.AUTH_ENV, "")) or None
    load_extra_modes()
    host, _, port = args.connect.rpartition(":")
    settings = WorkerSettings.model_validate_json(args.settings)  # validated once, here
    try:
        asyncio.run(serve(host, int(port), args.worker_id, args.device, settings, secret, args.listen))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
