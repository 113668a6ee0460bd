"""A call as the operator sees it: in `/api/sessions` (`call_info`), and in the admin dashboard and `/metrics`
(`call_snapshot`, which a media shard sends the front). One view for a WebRTC call (`rtc_server.session`) and a
Realtime WebSocket session (`rtc_server.realtime.websocket`), which has no media track: its frame counters stay
zero."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from media_shard.messages import CallSnapshot
from rtc_server import events as ev
from rtc_server.metrics import percentile

if TYPE_CHECKING:
    from media_tracks import InboundAudio, SpeechTrack


class CallView(Protocol):
    """What these views read of a call."""

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


def call_info(call: CallView, queue_position: int | None) -> ev.SessionInfo:
    return ev.SessionInfo(
        session_id=call.id,
        mode=call.mode,
        phase=call.phase,  # type: ignore[arg-type]
        state=call.state,
        worker_id=call.worker_id,
        queue_position=queue_position,
        age_s=round(time.monotonic() - call.created_at, 3),
    )


def call_snapshot(
    call: CallView, speech: SpeechTrack | None = None, inbound: InboundAudio | None = None
) -> CallSnapshot:
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
        speech_buffered_s=round(speech.buffered_s, 3) if speech is not None else 0.0,
        send_lateness_p95_ms=round(speech.pacing.percentile(95) * 1000, 2) if speech is not None else 0.0,
        frames_in=inbound.frames_in if inbound is not None else 0,
        frames_out=speech.frames_out if speech is not None else 0,
        frames_dropped=inbound.frames_dropped if inbound is not None else 0,
        audio_lost_s=round(inbound.unfilled_gap_s, 3) if inbound is not None else 0.0,
    )
