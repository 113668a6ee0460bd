"""The IPC protocol between the server (`rtc_server`) and a worker process.

One stream connection per worker (TCP on 127.0.0.1 today; any host later), carrying messages of the form

    u32 header_len | u32 payload_len | header (UTF-8 JSON) | payload (raw bytes)

big-endian. The header is one of the pydantic models below, told apart by its `type` field; the payload
carries bulk data so that PCM never goes through JSON: float32 little-endian mono samples for `unit` and
`audio`, followed for `unit` by an optional HxWx3 uint8 RGB frame (`frame_shape` says its size); a
`frame_ahead` carries such a frame alone, for a unit still to come.

Every message about a session carries `session_id`; one connection multiplexes all sessions of a worker.

A connection starts with the server's `challenge` (a fresh nonce); the worker answers with `hello`, whose
`proof` is `hello_proof(secret, nonce, worker_id, pid)`: an HMAC keyed by the secret the supervisor gave the
worker in its environment (`AUTH_ENV`). The secret itself never goes over the connection.

A worker started with `--listen PATH` also serves "data links" on that Unix socket: a media shard connects,
the worker sends `challenge`, the shard answers `link_hello` with `link_proof(secret, nonce, shard_id, pid)`,
and the link then carries session messages (`open`/`unit`/`control`/`close` in, the session outputs back) like
the control connection; a `ping` on it is answered with `pong`.
Clock fields (`completed_at`, `play_at`) are in the server's `time.monotonic()` timeline: a worker only
copies or offsets them, never compares them with its own clock (except for the same-host hand-off metric).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import struct
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from MiniCPMO45.audio.rates import MODEL_INPUT_RATE, SPEECH_RATE

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 64 << 20
MAX_HELLO_BYTES = 64 << 10  # the bound on the first message, before the peer has proved anything
AUTH_ENV = "MINICPMO45_WORKER_SECRET"  # the supervisor's per-start secret (hex), in each worker's environment
UNITS_DROPPED = "units_dropped"  # error code: a session's queue was full, its oldest unit went
CONTROLS_DROPPED = "controls_dropped"  # error code: a session's queue was full, a control was refused
_PREFIX = struct.Struct(">II")


class ProtocolError(RuntimeError):
    """A peer sent bytes that are not a valid message."""


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- server -> worker ----------------------------------------------------------------------------


class OpenSession(_Msg):
    """Start (or switch the mode of) a session. The worker answers `opened` or `error`."""

    type: Literal["open"] = "open"
    session_id: str
    mode: str
    options: dict[str, Any] = Field(default_factory=dict)


MAX_FRAME_SIDE = 4096  # the largest side of a frame a `unit` or `frame_ahead` may carry
FrameSide = Annotated[int, Field(ge=1, le=MAX_FRAME_SIDE)]
FrameShape = tuple[FrameSide, FrameSide, Literal[3]]  # an RGB frame's (height, width, 3)


class Unit(_Msg):
    """One audio unit (payload: float32 PCM, then an optional RGB frame)."""

    type: Literal["unit"] = "unit"
    session_id: str
    index: int
    sample_rate: int = MODEL_INPUT_RATE
    samples: int
    completed_at: float  # server monotonic time when the unit's last sample arrived
    sent_at: float  # server monotonic time when the unit was written to the socket
    frame_shape: FrameShape | None = None
    # the unit's frame went ahead of it (`frame_ahead` with this index), so its payload holds only the PCM
    frame_ahead: bool = False


class FrameAhead(_Msg):
    """The camera frame of a session's next unit, sent as soon as the server took it (before the unit's audio
    is complete), so that the worker can encode it before the unit's tick (payload: HxWx3 uint8 RGB). The
    `unit` of that index then says `frame_ahead` and carries no frame. Only to a mode that asked for it
    (`Opened.frames_ahead`)."""

    type: Literal["frame_ahead"] = "frame_ahead"
    session_id: str
    index: int
    frame_shape: FrameShape


class Control(_Msg):
    """A client control message (`interrupt`, `pause`, `system_prompt`, ...) forwarded to the mode."""

    type: Literal["control"] = "control"
    session_id: str
    message: dict[str, Any]


class CloseSession(_Msg):
    type: Literal["close"] = "close"
    session_id: str


class Ping(_Msg):
    type: Literal["ping"] = "ping"
    seq: int


class Challenge(_Msg):
    """The server's first message on a new connection; the worker's `hello` answers it."""

    type: Literal["challenge"] = "challenge"
    nonce: str  # hex, fresh for every connection


class LinkHello(_Msg):
    """A media shard's first message on a data link (the worker's Unix socket), answering its `challenge`."""

    type: Literal["link_hello"] = "link_hello"
    version: int = PROTOCOL_VERSION
    shard_id: int
    pid: int
    proof: str = Field("", repr=False)  # link_proof(secret, challenge nonce, shard_id, pid)


# ---- worker -> server ----------------------------------------------------------------------------


class Hello(_Msg):
    """First message of a worker: who it is and which modes it serves."""

    type: Literal["hello"] = "hello"
    version: int = PROTOCOL_VERSION
    worker_id: int
    pid: int
    device: str
    modes: list[str]
    # sessions per worker and per mode as planned before the model loads (inference/capacity.py); None: the
    # server's configured capacity applies
    capacity: int | None = None
    capacity_by_mode: dict[str, int] = {}
    capacity_source: str = "configured"
    # False: the worker is loading its model and sizing its caches, and says `capacity` when it is done;
    # admission gives it no session until then
    capacity_final: bool = True
    proof: str = Field("", repr=False)  # hello_proof(secret, challenge nonce, worker_id, pid)


class CapacityOut(_Msg):
    """The worker's capacity once its model is loaded and its caches sized to its memory (after `hello`)."""

    type: Literal["capacity"] = "capacity"
    sessions: int = Field(ge=1)
    by_mode: dict[str, int] = {}
    source: str
    per_session_mib: float | None = None
    free_mib: float | None = None


class Opened(_Msg):
    """The mode is running; the server cuts the session's audio into units of these sizes."""

    type: Literal["opened"] = "opened"
    session_id: str
    mode: str
    unit_samples: int
    first_unit_samples: int | None = None
    output_rate: int = SPEECH_RATE
    video_max_side: int | None = None  # the mode wants one camera frame per unit, at most this large
    # ... or, with (resolution, multiple), at the model's input size for an unsliced image
    # (`media_tracks.model_input_size`): the server resizes the camera's frame once, and the worker's image
    # processor takes it as it is
    video_fit: tuple[int, int] | None = None
    # send each unit's frame ahead of the unit as soon as it is taken (`FrameAhead`)
    frames_ahead: bool = False
    align_units: bool = False  # cut units on a grid of the server's clock (batching modes)
    # the session's tick phase: its units end this long after the grid lines (multiples of the unit length)
    grid_offset_s: float = Field(0.0, ge=0.0)
    open_ms: float = 0.0  # worker time to close the previous mode (if any) and open this one

    def unit_grid(self) -> UnitGrid | None:
        """The grid the session's units end on (`align_units`), else None."""
        if not self.align_units:
            return None
        return UnitGrid(unit_s=self.unit_samples / MODEL_INPUT_RATE, offset_s=self.grid_offset_s)


class UnitGrid(BaseModel):
    """A session's unit grid on the server's monotonic clock: lines `offset_s` past the multiples of `unit_s`."""

    model_config = ConfigDict(frozen=True)
    unit_s: float = Field(gt=0.0)
    offset_s: float = Field(0.0, ge=0.0)

    def distance_ms(self, t: float) -> float:
        """How far past the nearest grid line `t` lies, in ms (negative: before it)."""
        past = (t - self.offset_s) % self.unit_s
        return (past - self.unit_s if past > self.unit_s / 2 else past) * 1000


# The session outputs below are also what a mode returns (`inference.modes.base.Output`): a mode leaves
# `session_id` empty (and `AudioOut.sample_rate` 0) and the worker fills them in before it sends the message.
# The caller-facing ones are the data channel's events too: `TextEvent`, `StateEvent`, `UserTurnEvent` and
# `ErrorEvent` are their bodies (re-exported by `rtc_server.events`), and `caller_event` drops the session id.

TalkState = Literal["listening", "thinking", "speaking"]


class AudioOut(_Msg):
    """Speech for the caller (payload: float32 PCM at `sample_rate`; `pcm` holds it on either side)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    type: Literal["audio"] = "audio"
    session_id: str = ""
    turn: int
    sample_rate: int = 0  # the mode's `SessionSetup.output_rate` (set by the worker)
    play_at: float | None = None  # server monotonic time to start playing; None: as soon as possible
    pcm: np.ndarray | None = Field(None, exclude=True, repr=False)  # float32 mono; travels as the payload


class TextEvent(_Msg):
    """A delta of the assistant's text for turn `turn`."""

    type: Literal["text"] = "text"
    text: str
    turn: int


class UserTurnEvent(_Msg):
    """The caller's turn `turn` as the model took it (turn-based modes): `seconds` of speech the voice activity
    detector (or `end_turn`) cut, or the typed `text`. The assistant's reply to it has the same `turn`. With
    `started` (and neither seconds nor text), the detector heard the caller begin to speak; the turn's own
    `user_turn` follows when it ends."""

    type: Literal["user_turn"] = "user_turn"
    turn: int
    seconds: float | None = None
    text: str | None = None
    started: bool = False


class StateEvent(_Msg):
    type: Literal["state"] = "state"
    state: TalkState


class ErrorEvent(_Msg):
    """A problem. `pause_timeout`, `mode_error` and `worker_failed` end the call; `internal_error` ends it
    when the media path failed, not when one client message did. About what the caller sent: `bad_message`,
    `message_too_large` (over `session.max_message_bytes`), `unknown_mode`, `audio_too_fast` (audio arriving
    faster than real time: the excess is dropped; told at most every 5 s), `audio_lost` (a jump of over 1 s
    in the inbound timestamps: that audio never reached the model). The call goes on after those."""

    type: Literal["error"] = "error"
    code: str
    message: str


class TextOut(TextEvent):
    session_id: str = ""


class UserTurnOut(UserTurnEvent):
    session_id: str = ""


class StateOut(StateEvent):
    session_id: str = ""


class FlushOut(_Msg):
    """Drop queued speech of turns older than `turn` (the model stopped speaking)."""

    type: Literal["flush"] = "flush"
    session_id: str = ""
    turn: int


class UnitMetrics(_Msg):
    """Timings of one unit: one model for the worker's `unit_done`, the data channel's `metrics` event, the
    admin totals and the OpenAPI document. A mode returns the numbers it knows (its split of `compute_ms`, the
    KV length, the tick's batch); the worker adds the hand-off, queue and compute times; the server adds
    `roundtrip_ms` and `lag_ms` (`UnitDone.at_server`)."""

    handoff_ms: float = Field(0.0, description="unit complete -> in the worker")
    compute_ms: float = Field(0.0, description="the mode's time on the unit (split below where it applies)")
    roundtrip_ms: float = Field(0.0, description="unit complete -> its result back at the server")
    queue_ms: float = Field(0.0, description="waiting in the worker behind the session's earlier units")
    lag_ms: float = Field(
        0.0, description="handoff + queue: how far behind real time the model started on this unit"
    )
    backlog_units: int = Field(0, description="units of the session waiting behind this one")
    prepare_ms: float | None = Field(
        None,
        description="batching modes with per-unit CPU work off the mode thread (chat's VAD): the tick's, before "
        "its run",
    )
    merged_units: int | None = Field(
        None,
        description="units of the session that waited and were taken as one (chat catching up a backlog): each "
        "of them reports it",
    )
    tick_wait_ms: float | None = Field(
        None,
        description="batching modes: in the worker's tick loop before its tick began (the other sessions' units, "
        "the ticks ahead of it)",
    )
    tick_ms: float | None = Field(None, description="batching modes: the run of the tick that held the unit")
    grid_ms: float | None = Field(
        None,
        description="batching modes: how long after its tick phase's grid line the unit completed at the server "
        "(negative: before it); a phase's tick waits for its latest unit",
    )
    prefill_ms: float | None = Field(None, description="prefill (audio encoder, vision, LLM feed)")
    vision_ahead_ms: float | None = Field(
        None,
        description="omni: the run that encoded the unit's camera frame before the unit came (the server sent it "
        "ahead; the prefill then had no vision to run); absent: the frame was encoded in the unit's tick",
    )
    prefill_ahead_ms: float | None = Field(
        None,
        description="omni with `prefill_ahead`: the step that opened the unit before its audio came (the previous "
        "unit's tail, `<unit>` and the frame's image blocks into the KV; its tick then fed the audio alone); "
        "absent: the tick fed the whole unit",
    )
    decide_ms: float | None = Field(None, description="the listen/speak decision and the text")
    tts_ms: float | None = Field(None, description="speech tokens")
    vocoder_ms: float | None = Field(None, description="speech tokens -> audio")
    vad_ms: float | None = Field(None, description="voice activity detection (chat)")
    turn_to_speech_ms: float | None = Field(
        None,
        description="chat, on the unit whose tick sent a reply's first speech: from the user turn's end (a "
        "spoken turn's last unit complete at the server, a typed turn or a held turn's respond taken by the "
        "worker) to that speech",
    )
    early_reply: int | None = Field(
        None,
        description="chat, 1 on the unit that ended a turn whose reply had started in the tick before (the caller "
        "was one unit of silence from the end) and whose held outputs went out at the start of this tick",
    )
    early_dropped: int | None = Field(
        None,
        description="chat, 1 on the unit in which the caller spoke on and a reply started early was dropped",
    )
    kv_tokens: int | None = Field(None, description="the session's KV length after the unit")
    dropped_tokens: int | None = Field(
        None, description="KV positions the context window dropped before the unit"
    )
    batch_sessions: int | None = Field(
        None,
        description="sessions whose units ran in the same worker tick (batching modes; chat: the replies that "
        "advanced in it)",
    )

    def rounded(self, digits: int = 2) -> UnitMetrics:
        """The same numbers, times rounded to `digits` decimals (what the caller and the recordings get)."""
        times = {
            name: round(value, digits)
            for name, value in self.model_dump().items()
            if isinstance(value, float)
        }
        return self.model_copy(update=times)


class UnitDone(_Msg):
    """A unit is done: its timings, sent after the mode handled it."""

    type: Literal["unit_done"] = "unit_done"
    session_id: str
    index: int
    completed_at: float
    metrics: UnitMetrics

    def at_server(self, now: float, grid: UnitGrid | None = None) -> UnitMetrics:
        """The unit's metrics once its result is back at the server (`now`: the server's monotonic clock), with
        the server's `roundtrip_ms` and `lag_ms`, and `grid_ms` when the session's units are cut on `grid`."""
        update: dict[str, float] = {
            "roundtrip_ms": (now - self.completed_at) * 1000,
            "lag_ms": self.metrics.handoff_ms + self.metrics.queue_ms,
        }
        if grid is not None:
            update["grid_ms"] = grid.distance_ms(self.completed_at)
        return self.metrics.model_copy(update=update)


class ErrorOut(ErrorEvent):
    """A session-level error (session_id set) or a worker-level one."""

    session_id: str | None = None


CallerEvent = TextEvent | UserTurnEvent | StateEvent | ErrorEvent


def caller_event(message: TextOut | UserTurnOut | StateOut | ErrorOut) -> CallerEvent:
    """The data-channel event of a session output that goes to the caller as it is: its own fields without
    the session id (each of these messages extends its event)."""
    event_type = type(message).__bases__[0]
    return event_type.model_validate(message.model_dump(exclude={"session_id"}))


class Closed(_Msg):
    type: Literal["closed"] = "closed"
    session_id: str


class Pong(_Msg):
    type: Literal["pong"] = "pong"
    seq: int


Message = Annotated[
    OpenSession
    | Unit
    | FrameAhead
    | Control
    | CloseSession
    | Ping
    | Challenge
    | LinkHello
    | Hello
    | CapacityOut
    | Opened
    | AudioOut
    | TextOut
    | UserTurnOut
    | StateOut
    | FlushOut
    | UnitDone
    | ErrorOut
    | Closed
    | Pong,
    Field(discriminator="type"),
]
_message_adapter: TypeAdapter[Message] = TypeAdapter(Message)


def encode(message: BaseModel, payload: bytes = b"") -> bytes:
    header = message.model_dump_json().encode()
    if len(header) > MAX_HEADER_BYTES or len(payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"message too large: header {len(header)} B, payload {len(payload)} B")
    return _PREFIX.pack(len(header), len(payload)) + header + payload


MAX_WRITE_BUFFER = 8 << 20  # a peer this far behind gets no more units until it catches up
MAX_WRITE_BACKLOG = 32 << 20  # a peer this far behind is not reading at all


def write_bounded(writer: asyncio.StreamWriter, message: BaseModel, payload: bytes = b"") -> str:
    """Queue a message without waiting, unless the peer is behind: "sent"; "dropped" (a unit or a frame ahead,
    with more than `MAX_WRITE_BUFFER` unsent); "stalled" (more than `MAX_WRITE_BACKLOG` unsent: the transport is
    aborted, which frees the buffer and ends the connection)."""
    buffered = writer.transport.get_write_buffer_size()
    if buffered > MAX_WRITE_BACKLOG:
        writer.transport.abort()
        return "stalled"
    if isinstance(message, Unit | FrameAhead) and buffered > MAX_WRITE_BUFFER:
        return "dropped"
    writer.write(encode(message, payload))
    return "sent"


def decode_header(raw: bytes) -> Message:
    try:
        return _message_adapter.validate_python(json.loads(raw))
    except ValueError as exc:  # json.JSONDecodeError and pydantic.ValidationError are ValueErrors
        raise ProtocolError(f"invalid message header: {exc}") from None


def hello_proof(secret: bytes, nonce: str, worker_id: int, pid: int) -> str:
    """The worker's answer to a challenge: binds the nonce and the worker's claim (id, pid) to the secret."""
    return hmac.new(secret, f"{nonce}:{worker_id}:{pid}".encode(), hashlib.sha256).hexdigest()


def proof_ok(secret: bytes, nonce: str, hello: Hello) -> bool:
    expected = hello_proof(secret, nonce, hello.worker_id, hello.pid)
    return hmac.compare_digest(expected.encode(), hello.proof.encode())


def link_proof(secret: bytes, nonce: str, shard_id: int, pid: int) -> str:
    """A media shard's answer to a data link's challenge; never equal to a `hello_proof` (the `link` tag)."""
    return hmac.new(secret, f"{nonce}:link:{shard_id}:{pid}".encode(), hashlib.sha256).hexdigest()


def link_proof_ok(secret: bytes, nonce: str, hello: LinkHello) -> bool:
    expected = link_proof(secret, nonce, hello.shard_id, hello.pid)
    return hmac.compare_digest(expected.encode(), hello.proof.encode())


async def read_message(
    reader: asyncio.StreamReader, max_header: int = MAX_HEADER_BYTES, max_payload: int = MAX_PAYLOAD_BYTES
) -> tuple[Message, bytes]:
    """Read one message; raises asyncio.IncompleteReadError at EOF and ProtocolError on garbage. A length
    over the bounds is refused before anything more is read, so a peer cannot make us buffer it."""
    header, payload = await read_frame(reader, max_header, max_payload)
    return decode_header(header), payload


async def read_frame(reader: asyncio.StreamReader, max_header: int, max_payload: int) -> tuple[bytes, bytes]:
    """One frame's raw header and payload (the framing shared with the front-shard control protocol)."""
    header_len, payload_len = _PREFIX.unpack(await reader.readexactly(_PREFIX.size))
    if header_len > max_header or payload_len > max_payload:
        raise ProtocolError(f"message too large: header {header_len} B, payload {payload_len} B")
    header = await reader.readexactly(header_len)
    payload = await reader.readexactly(payload_len) if payload_len else b""
    return header, payload


def pcm_to_bytes(pcm: np.ndarray) -> bytes:
    return np.ascontiguousarray(pcm, dtype="<f4").tobytes()


def pcm_from_bytes(data: bytes, samples: int | None = None) -> np.ndarray:
    pcm = np.frombuffer(data, dtype="<f4")
    if samples is not None and pcm.size != samples:
        raise ProtocolError(f"expected {samples} samples, got {pcm.size}")
    return pcm.astype(np.float32, copy=False)


def split_unit_payload(unit: Unit, payload: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    """The PCM and optional frame of a `unit` message."""
    if unit.frame_ahead and unit.frame_shape is not None:
        raise ProtocolError("a unit whose frame went ahead carries none")
    pcm_bytes = unit.samples * 4
    frame_bytes = 0 if unit.frame_shape is None else int(np.prod(unit.frame_shape))
    if len(payload) != pcm_bytes + frame_bytes:
        raise ProtocolError(f"unit payload is {len(payload)} B, expected {pcm_bytes + frame_bytes} B")
    pcm = pcm_from_bytes(payload[:pcm_bytes])
    frame = None
    if unit.frame_shape is not None:
        frame = np.frombuffer(payload[pcm_bytes:], dtype=np.uint8).reshape(unit.frame_shape)
    return pcm, frame


def frame_ahead_pixels(message: FrameAhead, payload: bytes) -> np.ndarray:
    """The RGB frame of a `frame_ahead` message."""
    if len(payload) != int(np.prod(message.frame_shape)):
        raise ProtocolError(
            f"frame_ahead payload is {len(payload)} B, expected {int(np.prod(message.frame_shape))} B"
        )
    return np.frombuffer(payload, dtype=np.uint8).reshape(message.frame_shape)
