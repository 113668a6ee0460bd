"""The control protocol between the front (`rtc_server`) and its media shards.

The same framing as the worker protocol (`inference.protocol.encode`: two big-endian u32 lengths, a JSON
header, a payload), on one local stream connection per shard, opened by the shard. The shard proves the
server's per-start secret first (`shard_proof` over the front's challenge nonce). Media never passes here:
a shard talks to the GPU workers over its own data links (`inference.links`), and to the callers directly.

Requests from the front carry a `request_id`; the shard answers each with `answer`, `done` or `refused`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from inference import protocol
from inference.links import LinkTarget
from inference.protocol import MAX_HELLO_BYTES, Challenge, ProtocolError

MAX_CONTROL_BYTES = protocol.MAX_HEADER_BYTES  # offers, snapshots: a few kB to a few hundred kB


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- front -> shard ----------------------------------------------------------------------------------


class Offer(_Msg):
    """Answer this SDP offer with a new call (its id is chosen by the front)."""

    type: Literal["offer"] = "offer"
    request_id: int
    session_id: str
    mode: str
    sdp: str
    system_prompt: str | None = None
    voice: str | None = None
    options: dict[str, Any] | None = None
    known_modes: list[str]
    notice: tuple[str, str] | None = None  # (code, message) of an `error` event the call sends once it opens
    realtime: dict[str, Any] | None = None  # a Realtime API call: its session settings (rtc_server/realtime)


class Trickle(_Msg):
    """Trickled ICE candidates of a call (`PATCH`): (mid, candidate line) pairs, and end-of-candidates."""

    type: Literal["trickle"] = "trickle"
    request_id: int
    session_id: str
    candidates: list[tuple[str | None, str]]
    end: bool = False


class Hangup(_Msg):
    type: Literal["hangup"] = "hangup"
    request_id: int
    session_id: str
    reason: str


class Admit(_Msg):
    """The call has a slot on this worker: open its mode there."""

    type: Literal["admit"] = "admit"
    session_id: str
    worker_id: int


class QueueUpdate(_Msg):
    type: Literal["queue"] = "queue"
    session_id: str
    position: int
    eta_s: float


class Rejected(_Msg):
    """Admission refused the call at connection time (a full queue): tell the caller and end the call."""

    type: Literal["reject"] = "reject"
    session_id: str
    code: str
    message: str


class Workers(_Msg):
    """Where the GPU workers listen for data links, and which are up (sent at start and on every change)."""

    type: Literal["workers"] = "workers"
    workers: list[LinkTarget]
    known_modes: list[str]


# ---- shard -> front ----------------------------------------------------------------------------------


class ShardHello(_Msg):
    type: Literal["shard_hello"] = "shard_hello"
    shard_id: int
    pid: int
    proof: str = Field("", repr=False)


class Answer(_Msg):
    type: Literal["answer"] = "answer"
    request_id: int
    sdp: str


class Done(_Msg):
    type: Literal["done"] = "done"
    request_id: int


class Refused(_Msg):
    """A request failed: `code` is the HTTP error code the front answers with (bad_sdp, unknown_session...)."""

    type: Literal["refused"] = "refused"
    request_id: int
    code: str
    message: str


class Connected(_Msg):
    """The call's ICE and DTLS are up: it asks admission for a slot now."""

    type: Literal["connected"] = "connected"
    session_id: str
    mode: str


class Switched(_Msg):
    """The caller switched the call's mode (admission moves its share)."""

    type: Literal["switched"] = "switched"
    session_id: str
    mode: str


class Ended(_Msg):
    """The call is over and everything it held on the shard is released."""

    type: Literal["ended"] = "ended"
    session_id: str
    reason: str


class CallSnapshot(_Msg):
    """One live call as the admin dashboard, `/api/sessions` and `/metrics` see it."""

    session_id: str
    mode: str
    phase: str
    state: str
    worker_id: int | None
    age_s: float
    units: int
    unit_latency_p50_ms: float | None
    unit_latency_p95_ms: float | None
    speech_buffered_s: float
    send_lateness_p95_ms: float
    frames_in: int
    frames_out: int
    frames_dropped: int
    audio_lost_s: float = 0.0  # inbound timestamp jumps too long to fill: audio that never reached the model


class StatsSnapshot(_Msg):
    """A media process's counters since it started (closed calls included)."""

    units_sent: int = 0
    units_done: int = 0
    frames_in: int = 0
    frames_out: int = 0
    frames_dropped: int = 0
    audio_lost_s: float = 0.0
    sessions_started: dict[str, int] = Field(default_factory=dict)
    roundtrip_counts: list[int] = Field(default_factory=list)  # cumulative, per LATENCY_BUCKETS bound
    roundtrip_total: float = 0.0
    roundtrip_n: int = 0
    handoff_counts: list[int] = Field(default_factory=list)
    handoff_total: float = 0.0
    handoff_n: int = 0
    turn_speech_counts: list[int] = Field(default_factory=list)  # per TURN_BUCKETS bound (chat replies)
    turn_speech_total: float = 0.0
    turn_speech_n: int = 0
    early_replies: int = 0  # chat turns answered by a reply started a unit before their end
    early_dropped: int = 0  # chat replies started early and dropped (the caller spoke on)
    cpu_s: float = 0.0  # the process's CPU time (user + system), for media CPU per call


class Snapshot(_Msg):
    """Sent every second: the shard's live calls and counters."""

    type: Literal["snapshot"] = "snapshot"
    calls: list[CallSnapshot]
    stats: StatsSnapshot


ShardMessage = Annotated[
    Offer
    | Trickle
    | Hangup
    | Admit
    | QueueUpdate
    | Rejected
    | Workers
    | Challenge
    | ShardHello
    | Answer
    | Done
    | Refused
    | Connected
    | Switched
    | Ended
    | Snapshot,
    Field(discriminator="type"),
]
_adapter: TypeAdapter[ShardMessage] = TypeAdapter(ShardMessage)


def encode(message: BaseModel) -> bytes:
    return protocol.encode(message)


async def read(reader: asyncio.StreamReader, max_bytes: int = MAX_CONTROL_BYTES) -> ShardMessage:
    """One control message; IncompleteReadError at EOF, ProtocolError on garbage or an oversized frame."""
    header, _ = await protocol.read_frame(reader, max_bytes, 0)
    try:
        return _adapter.validate_python(json.loads(header))
    except ValueError as exc:
        raise ProtocolError(f"invalid control message: {exc}") from None


async def read_hello(reader: asyncio.StreamReader) -> ShardMessage:
    return await read(reader, MAX_HELLO_BYTES)


def shard_proof(secret: bytes, nonce: str, shard_id: int, pid: int) -> str:
    return hmac.new(secret, f"{nonce}:shard:{shard_id}:{pid}".encode(), hashlib.sha256).hexdigest()


def proof_ok(secret: bytes, nonce: str, hello: ShardHello) -> bool:
    expected = shard_proof(secret, nonce, hello.shard_id, hello.pid)
    return hmac.compare_digest(expected.encode(), hello.proof.encode())
