"""Entry point: `python run.py [--http] [--gpus 0,1] [--host H] [--port P] [--model-path DIR] [--config FILE]`.

Cluster mode (docs/CLUSTER.md): `python run.py --cluster auto` serves a front, `python run.py --cluster auto
--node` this host's node agent.

Loads `config.toml` (or --config), applies the CLI on top (CLI > file > defaults), starts one worker process
per GPU (or one CPU worker) and serves the web app and the signalling API.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from inference.processes import name_this_thread
from rtc_server.app import start_server
from rtc_server.config import ConfigError, load_config

REPO_ROOT = Path(__file__).resolve().parent


def parse_gpus(text: str) -> list[int]:
    try:
        gpus = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--gpus takes a comma-separated list of GPU indices, got {text!r}"
        ) from None
    if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise argparse.ArgumentTypeError(f"--gpus needs distinct non-negative indices, got {text!r}")
    return gpus


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="MiniCPM-o 4.5 real-time WebRTC server")
    parser.add_argument(
        "--config", default=None, help="TOML config file (default: config.toml beside run.py)"
    )
    parser.add_argument("--host", help="listen address (server.host)")
    parser.add_argument("--port", type=int, help="listen port (server.port)")
    parser.add_argument("--http", action="store_true", default=None, help="plain HTTP instead of HTTPS")
    parser.add_argument("--gpus", type=parse_gpus, help="one worker per listed GPU, e.g. 0,1 (workers.gpus)")
    parser.add_argument("--model-path", help="model checkpoint folder (model.path); default: embedded model")
    parser.add_argument(
        "--media-procs",
        type=int,
        help="processes owning the calls' media (workers.media_procs): 0 the front process, -1 automatic",
    )
    parser.add_argument(
        "--cluster",
        metavar="auto|HOST:PORT|ray://HOST:PORT",
        help="cluster mode on Ray (cluster.address): serve a front that places calls on the cluster's nodes",
    )
    parser.add_argument(
        "--node",
        action="store_true",
        help="with --cluster: start this host's node agent (its workers and media) instead of a front",
    )
    parser.add_argument("--log-level", default="INFO")
    return parser


def cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, dict[str, Any]] = {"server": {}, "workers": {}, "model": {}, "cluster": {}}
    if args.host is not None:
        overrides["server"]["host"] = args.host
    if args.port is not None:
        overrides["server"]["port"] = args.port
    if args.http:
        overrides["server"]["http"] = True
    if args.gpus is not None:
        overrides["workers"]["gpus"] = args.gpus
    if args.model_path is not None:
        overrides["model"]["path"] = args.model_path
    if args.media_procs is not None:
        overrides["workers"]["media_procs"] = args.media_procs
    if args.cluster is not None:
        overrides["cluster"]["address"] = args.cluster
    return {k: v for k, v in overrides.items() if v}


async def serve(config_path: Path | None, overrides: dict[str, Any], node: bool = False) -> None:
    config = load_config(config_path, overrides)
    if node and not config.cluster.address:
        raise ConfigError("--node needs cluster mode: --cluster auto|HOST:PORT|ray://HOST:PORT")
    if config.cluster.address:  # cluster mode: only here is Ray imported (cluster/, docs/CLUSTER.md)
        from cluster.serve import serve_front, serve_node

        await (serve_node(config) if node else serve_front(config))
        return
    name_this_thread("front")  # this process's event loop (and the calls' media when it has no media shards)
    server = await start_server(config)
    shards = len(server.manager.shards.shards) if server.manager.shards is not None else 0
    media = f"{shards} media process(es)" if shards else "media in this process"
    workers = len(server.supervisor.workers)
    print(f"serving on {server.url} ({workers} worker(s), {media}); Ctrl-C stops", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.config is not None:
        config_path: Path | None = Path(args.config)
    else:
        default = REPO_ROOT / "config.toml"
        config_path = default if default.is_file() else None
    try:
        asyncio.run(serve(config_path, cli_overrides(args), node=args.node))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if type(exc).__name__ != "ClusterError":  # cluster/connect.py's, without importing it here
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    with contextlib.suppress(Exception):
        logging.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
