"""A WebSocket Realtime session as the operator sees it: in `/api/sessions`, the admin dashboard and `/metrics`,
like a call (it has no media track, so its frame counters are zero)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from media_shard.messages import CallSnapshot
from rtc_server import events as ev
from rtc_server.metrics import percentile

if TYPE_CHECKING:
    from rtc_server.realtime.websocket import SocketCall


def socket_info(call: SocketCall) -> ev.SessionInfo:
    return ev.SessionInfo(
        session_id=call.id,
        mode=call.mode,
        phase=call.phase,  # type: ignore[arg-type]
        state=call.state,
        worker_id=call.worker_id,
        queue_position=call.manager.admission.position(call),
        age_s=round(time.monotonic() - call.created_at, 3),
    )


def socket_snapshot(call: SocketCall) -> CallSnapshot:
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
