"""`python -m media_shard --connect HOST:PORT --shard-id N --config JSON`: one media shard (started by the front).

The server's per-start secret comes in the environment (`inference.protocol.AUTH_ENV`) and is removed from it
at once; it proves this process to the front and to the workers' data links.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

from inference.processes import name_this_thread
from inference.protocol import AUTH_ENV
from media_shard.shard import serve
from rtc_server.config import AppConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="MiniCPM-o 4.5 media shard (started by the server)")
    parser.add_argument("--connect", required=True, help="HOST:PORT of the front's shard listener")
    parser.add_argument("--shard-id", type=int, required=True)
    parser.add_argument("--config", required=True, help="the server's configuration as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"shard{args.shard_id} %(levelname)s %(name)s %(message)s")
    secret = bytes.fromhex(os.environ.pop(AUTH_ENV, ""))
    if not secret:
        parser.error(f"{AUTH_ENV} is not set: media shards are started by the server")
    config = AppConfig.model_validate_json(args.config)
    host, port = args.connect.rsplit(":", 1)

    name_this_thread("media-loop")  # aiortc's decoder and encoder threads keep their own names

    async def run() -> None:
        task = asyncio.ensure_future(serve(host, int(port), args.shard_id, config, secret))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
