"""What a call talks to: the process that owns it (`CallHost`) and, for a Realtime API call, its protocol
translator (`RealtimePort`). Defined here so that the call modules (`session.py`,
`remote_call.py`) do not import the managers that import them. Two hosts implement it: the front's
`rtc_server.manager.SessionManager` (workers through `inference.supervisor.WorkerSupervisor`, the real
admission) and a media shard's `media_shard.shard.Shard` (workers through its own `inference.links.WorkerLinks`,
admission asked of the front)."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel

from inference import protocol as p
from inference.supervisor import SessionSink
from rtc_server.config import AppConfig
from rtc_server.stats import ServerStats


class WorkerPort(Protocol):
    """How a call reaches its worker (`WorkerSupervisor` or `WorkerLinks`)."""

    def attach(self, worker_id: int, session_id: str, sink: SessionSink) -> None: ...

    def detach(self, worker_id: int, session_id: str) -> None: ...

    def send(self, worker_id: int, message: p.BaseModel, payload: bytes = b"") -> bool: ...


class SlotQueue(Protocol):
    """The admission a call asks for its worker slot (`rtc_server.admission.Admission`, or the front's through a
    shard's link)."""

    def switch(self, ticket: Any, mode: str) -> None: ...

    def leave(self, ticket: Any) -> None: ...

    def position(self, ticket: Any) -> int | None: ...


class RealtimePort(Protocol):
    """A Realtime API call's side of its session (`rtc_server.realtime.webrtc.RtcPort`): its `oai-events`
    channel speaks that protocol, translated from the call's own events."""

    def on_channel_open(self) -> None: ...

    def on_client_data(self, data: str | bytes) -> None: ...

    def on_call_event(self, event: BaseModel) -> None: ...

    def on_flush(self, turn: int) -> None: ...

    def on_speech(self, pcm: np.ndarray, turn: int) -> None: ...


class CallHost(Protocol):
    config: AppConfig
    supervisor: WorkerPort
    admission: SlotQueue
    stats: ServerStats

    def known_modes(self) -> list[str]: ...

    def connected(self, session: Any) -> None:
        """The call's ICE and DTLS are up: it asks for a worker slot now."""

    def forget(self, session: Any, why: str = "") -> None:
        """The call ended: drop it from the tables."""


class FrontCallHost(CallHost, Protocol):
    """The front's host (`SessionManager`) as a call on a media shard (`rtc_server.remote_call.RemoteCall`)
    sees it: an ended call also says why, as an error code."""

    def forget(self, session: Any, why: str = "", code: str = "session_ended") -> None: ...
