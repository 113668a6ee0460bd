"""The worker's data links: a Unix socket (mode 0600) on which media shards connect, prove the worker secret
(`link_hello`) and then send their sessions' messages themselves (inference/README.md, "Control connection and
data links"). A session's outputs go back on the connection that opened it (`inference.sessions.Sessions`),
and a link that closes ends its sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import stat
import struct
import time

from inference import protocol as p
from inference.sessions import Connection, Sessions

log = logging.getLogger("inference.worker")
LINK_AUTH_TIMEOUT_S = 5.0  # a data link must answer the challenge within this


def bind_private_socket(path: str) -> socket.socket:
    """A listening Unix socket at `path`, mode 0600 before it listens (nobody connects to a looser one)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # a previous worker's socket (killed before it could remove it)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _peer_pid(writer: asyncio.StreamWriter) -> int | None:
    """The connecting process's pid as the kernel saw it (Linux SO_PEERCRED); None where unknown."""
    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return None
    return struct.unpack("3i", creds)[0] or None


async def authenticate_link(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes
) -> p.LinkHello:
    """Challenge a new data link; its first message must be a `link_hello` proving the secret, for the pid
    that really connected. Raises ProtocolError (or a read error) otherwise."""
    nonce = secrets.token_hex(32)
    writer.write(p.encode(p.Challenge(nonce=nonce)))
    first, _ = await p.read_message(reader, p.MAX_HELLO_BYTES, 0)
    if not isinstance(first, p.LinkHello):
        raise p.ProtocolError(f"first message is {first.type!r}, not link_hello")
    if first.version != p.PROTOCOL_VERSION:
        raise p.ProtocolError(f"peer speaks protocol {first.version}, worker {p.PROTOCOL_VERSION}")
    if not p.link_proof_ok(secret, nonce, first):
        raise p.ProtocolError(f"link_hello of shard {first.shard_id} without a valid proof")
    peer = _peer_pid(writer)
    if peer is not None and peer != first.pid:
        raise p.ProtocolError(f"link_hello claims pid {first.pid}, the peer is pid {peer}")
    return first


class LinkServer:
    """The worker's data links: a Unix socket server whose authenticated connections carry sessions."""

    def __init__(self, path: str, secret: bytes, sessions: Sessions) -> None:
        self.path = path
        self.secret = secret
        self.sessions = sessions
        self.writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._inode: int | None = None

    async def start(self) -> None:
        sock = bind_private_socket(self.path)
        self._inode = os.stat(self.path).st_ino
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        log.info("data links on %s", self.path)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self.writers):
            writer.close()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:  # ours, not a newer worker's
                os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await asyncio.wait_for(
                authenticate_link(reader, writer, self.secret), LINK_AUTH_TIMEOUT_S
            )
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, p.ProtocolError) as exc:
            why = (
                str(exc)
                if isinstance(exc, p.ProtocolError)
                else f"no valid link_hello ({type(exc).__name__})"
            )
            log.warning("data link rejected: %s", why)
            writer.close()
            return
        conn = Connection(writer, f"link of shard {hello.shard_id} (pid {hello.pid})")
        self.writers.add(writer)
        log.info("%s: up", conn.name)
        try:
            while True:
                message, payload = await p.read_message(reader)
                await self.sessions.handle(conn, message, payload, time.monotonic())
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except p.ProtocolError as exc:
            log.warning("%s: %s; closing it", conn.name, exc)
        finally:
            conn.closed = True
            self.writers.discard(writer)
            writer.close()
            ended = self.sessions.end_owned(conn)
            log.info("%s: closed, %d sessions ended", conn.name, ended)
