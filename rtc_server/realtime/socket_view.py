"""A WebSocket Realtime session as the operator sees it: in `/api/sessions`, the admin dashboard and `/metrics`,
like a call (it has no media track, so its frame counters are zero)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from media_shard.messages import CallSnapshot
from rtc_server import events as ev
from rtc_server.metrics import percentile


class SocketCallView(Protocol):
    """What these views read of a WebSocket session (`rtc_server.realtime.websocket.SocketCall`)."""

    @property
    def id(self) -> str: ...

    @property
    def mode(self) -> str: ...

    @property
    def phase(self) -> str: ...

    @property
    def state(self) -> ev.TalkState: ...

    @property
    def worker_id(self) -> int | None: ...

    @property
    def created_at(self) -> float: ...

    @property
    def unit_roundtrip_ms(self) -> Sequence[float]: ...


def socket_info(call: SocketCallView, queue_position: int | None) -> ev.SessionInfo:
    return ev.SessionInfo(
        session_id=call.id,
        mode=call.mode,
        phase=call.phase,  # type: ignore[arg-type]
        state=call.state,
        worker_id=call.worker_id,
        queue_position=queue_position,
        age_s=round(time.monotonic() - call.created_at, 3),
    )


def socket_snapshot(call: SocketCallView) -> CallSnapshot:
    return CallSnapshot(
        session_id=call.id,
        mode=call.mode,
        phase=call.phase,
        state=call.state,
        worker_id=call.worker_id,
        age_s=round(time.monotonic() - call.created_at, 3),
        units=len(call.unit_roundtrip_ms),
        unit_latency_p50_ms=percentile(call.unit_roundtrip_ms, 50),
        unit_latency_p95_ms=percentile(call.unit_roundtrip_ms, 95),
        speech_buffered_s=0.0,
        send_lateness_p95_ms=0.0,
        frames_in=0,
        frames_out=0,
        frames_dropped=0,
    )
