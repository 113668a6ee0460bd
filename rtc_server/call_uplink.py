"""A call's media on its way to the worker: the caller's audio cut into units (with a camera frame each when the
mode wants one), sent to the worker, and the caller told about audio the model did not hear.

`CallUplink` is owned by `rtc_server.session.CallSession` (an `UplinkCall`): the session starts it with the
peer connection's tracks and says how to cut units when the worker's mode opens.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

import numpy as np
from aiortc import MediaStreamTrack
from pydantic import BaseModel

from inference import protocol as p
from media_tracks import AudioUnit, InboundAudio, LatestVideoFrame, UnitCutter
from MiniCPMO45.audio.rates import MODEL_INPUT_RATE
from rtc_server import events as ev
from rtc_server.call_host import CallHost
from rtc_server.recordings import CallRecorder, encode_jpeg

log = logging.getLogger("rtc_server.session")
VIDEO_UNITS_LIMIT = 8  # units waiting for their camera frame snapshot
# A unit's camera frame is converted this long before the unit is due to end (at most half a unit), so that the
# unit goes to the worker as soon as its audio is complete: the units of a tick phase all end at once, and their
# frames' conversions would otherwise hold them up by several ms each, and make the phase's tick wait.
FRAME_LEAD_S = 0.15
FRAME_MAX_AGE_S = 0.5  # an early snapshot taken longer before its unit's end than this is taken again
# A unit that ends more than this before its tick phase's grid line is held until that line (`CallUplink._hold`)
HOLD_EARLY_MS = 20.0
AUDIO_REPORT_INTERVAL_S = 5.0  # how often a caller whose audio runs too fast hears about it


class UplinkCall(Protocol):
    """What the uplink reads of its call and asks of it."""

    @property
    def id(self) -> str: ...

    @property
    def manager(self) -> CallHost: ...

    @property
    def worker_id(self) -> int | None: ...

    @property
    def recorder(self) -> CallRecorder | None: ...

    @property
    def phase(self) -> str: ...

    @property
    def mode_open(self) -> bool: ...

    @property
    def paused(self) -> bool: ...

    @property
    def unit_grid(self) -> p.UnitGrid | None: ...

    def send_event(self, event: BaseModel) -> None: ...

    def close_soon(self, reason: str) -> None: ...


class CallUplink:
    def __init__(self, call: UplinkCall) -> None:
        self.call = call
        self.cutter = UnitCutter()
        self.inbound: InboundAudio | None = None
        self.video: LatestVideoFrame | None = None
        self.video_max_side: int | None = None  # the mode's frame size; None: no frames
        self.video_fit: tuple[int, int] | None = None  # ... or the model's input size (`protocol.Opened`)
        # the mode takes each unit's frame ahead of the unit (`protocol.FrameAhead`)
        self.frames_ahead = False
        self.video_units: asyncio.Queue[AudioUnit] | None = None
        self._video_task: asyncio.Task[None] | None = None
        self.video_units_dropped = 0  # units whose frame snapshot fell behind (the oldest waiting is dropped)
        # the next unit's frame, converted ahead of its end: (time.monotonic() when it started, the conversion)
        self._early_frame: tuple[float, asyncio.Future[np.ndarray | None]] | None = None
        # the last frame sent ahead of its unit: (that unit's index, the frame)
        self._sent_ahead: tuple[int, np.ndarray] | None = None
        self._early_timer: asyncio.TimerHandle | None = None
        self._audio_drops_reported = 0  # inbound.frames_dropped at the last `audio_too_fast` report
        self._audio_gaps_reported = 0.0  # inbound.unfilled_gap_s at the last `audio_lost` report
        self._audio_report_due = 0.0  # time.monotonic() after which the next report may go
        self.units_held = 0  # units that ended early and were held until their grid line (`_hold`)

    def add_track(self, track: MediaStreamTrack) -> None:
        """A track of the caller's: the first audio track is cut into units, the first video track sampled."""
        if track.kind == "audio" and self.inbound is None:
            self.inbound = InboundAudio(track, self.cutter, self._on_unit)
            self.inbound.start()
        elif track.kind == "video" and self.video is None:
            self.video = LatestVideoFrame(track)
            self.video.start()

    async def stop(self) -> None:
        if self._early_timer is not None:
            self._early_timer.cancel()
        if self._early_frame is not None:
            self._early_frame[1].cancel()
        if self._video_task is not None:
            self._video_task.cancel()
            try:
                await self._video_task
            except asyncio.CancelledError:
                pass
        if self.inbound is not None:
            await self.inbound.stop()
        if self.video is not None:
            await self.video.stop()

    def _on_unit(self, unit: AudioUnit) -> None:
        self._report_audio_drops()
        call = self.call
        if call.phase != "active" or not call.mode_open or call.paused or call.worker_id is None:
            return  # queued, switching or paused: the caller's audio is not routed anywhere
        hold_s = self._hold(unit)
        if hold_s > 0:
            asyncio.get_running_loop().call_later(hold_s, self._route, unit)
        else:
            self._route(unit)

    def _route(self, unit: AudioUnit) -> None:
        call = self.call
        if call.phase != "active" or not call.mode_open or call.worker_id is None:
            return  # the call ended or switched modes while its unit was held
        if self.video is not None and self.video_max_side is not None:
            # The frame conversion runs off the loop; units still reach the worker in order.
            if self.video_units is None:
                self.video_units = asyncio.Queue(maxsize=VIDEO_UNITS_LIMIT)
                self._video_task = asyncio.create_task(
                    self._send_units_with_frames(), name=f"units-{call.id}"
                )
            if self.video_units.full():
                self.video_units.get_nowait()  # the snapshots fell behind: the oldest unit is dropped
                self.video_units_dropped += 1
            self.video_units.put_nowait(unit)
            self._convert_next_frame_early(unit)
            return
        self._send_unit(unit, None)

    def _convert_next_frame_early(self, unit: AudioUnit) -> None:
        """Start the next unit's frame conversion `FRAME_LEAD_S` before that unit is due to end."""
        unit_s = self.cutter.unit_samples / MODEL_INPUT_RATE
        lead_s = min(FRAME_LEAD_S, unit_s / 2)
        if self._early_timer is not None:
            self._early_timer.cancel()
        delay = max(0.0, unit.completed_at + unit_s - lead_s - time.monotonic())
        self._early_timer = asyncio.get_running_loop().call_later(
            delay, self._start_early_frame, unit.index + 1
        )

    def _start_early_frame(self, index: int) -> None:
        """Convert the frame of unit `index` now; where the mode takes frames ahead, it goes as soon as it is."""
        self._early_timer = None
        if self.video is None or self.video_max_side is None:
            return
        conversion = asyncio.ensure_future(self.video.snapshot_rgb_async(self.video_max_side, self.video_fit))
        conversion.add_done_callback(_retrieve)  # one nobody took (the call ended, or it went stale)
        if self.frames_ahead:
            conversion.add_done_callback(lambda done: self._send_frame_ahead(index, done))
        self._early_frame = (time.monotonic(), conversion)

    def _send_frame_ahead(self, index: int, conversion: asyncio.Future[np.ndarray | None]) -> None:
        """Send unit `index`'s frame to the worker before the unit (`protocol.FrameAhead`); its unit then
        carries none (`_send_unit`). A frame that could not go is sent with its unit."""
        call, worker_id = self.call, self.call.worker_id
        if conversion.cancelled() or conversion.exception() is not None or worker_id is None:
            return
        frame = conversion.result()
        if frame is None or call.phase != "active" or not call.mode_open:
            return
        shape = (int(frame.shape[0]), int(frame.shape[1]), int(frame.shape[2]))
        message = p.FrameAhead(session_id=call.id, index=index, frame_shape=shape)
        if call.manager.supervisor.send(worker_id, message, np.ascontiguousarray(frame).tobytes()):
            self._sent_ahead = (index, frame)

    async def _frame_for(self, unit: AudioUnit) -> np.ndarray | None:
        """The unit's camera frame: the one converted ahead of its end, unless none was or it is too old."""
        assert self.video is not None
        early, self._early_frame = self._early_frame, None
        if early is not None and unit.completed_at - early[0] <= FRAME_MAX_AGE_S:
            return await early[1]
        return await self.video.snapshot_rgb_async(self.video_max_side, self.video_fit)

    def _hold(self, unit: AudioUnit) -> float:
        """How long (s) to hold a unit that ended well before its tick phase's grid line, so that it reaches the
        worker with its phase's other units. A batching mode's units end on that grid by the reckoning made when
        the mode opened (the first unit's silent lead-in); audio that had queued up meanwhile (a busy loop while
        many calls set up) or a caller clock that runs fast puts a call's units early for good. Sent at once,
        such a unit starts its phase's gather early: the tick then starts without the others (and holds them up)
        or waits for them anyway. Nothing in the audio changes; a late unit goes at once."""
        grid = self.call.unit_grid
        if grid is None:
            return 0.0
        early_ms = -grid.distance_ms(unit.completed_at)
        if early_ms <= HOLD_EARLY_MS:
            return 0.0
        self.units_held += 1
        if self.units_held == 1:
            log.info(
                "session %s: units end %.0f ms before their grid line: held until it", self.call.id, early_ms
            )
        return unit.completed_at + early_ms / 1000 - time.monotonic()

    def _report_audio_drops(self) -> None:
        """Tell the caller, at most every `AUDIO_REPORT_INTERVAL_S`, about audio the model did not hear: audio
        that never arrived (`audio_lost`), or that ran ahead of real time and was dropped (`audio_too_fast`)."""
        inbound = self.inbound
        now = time.monotonic()
        if inbound is None or now < self._audio_report_due:
            return
        if inbound.unfilled_gap_s > self._audio_gaps_reported:
            lost = inbound.unfilled_gap_s - self._audio_gaps_reported
            self._audio_gaps_reported = inbound.unfilled_gap_s
            self._audio_report_due = now + AUDIO_REPORT_INTERVAL_S
            text = f"{lost:.1f} s of your audio never arrived (a jump in its timestamps): the model did not hear it"
            self.call.send_event(ev.ErrorEvent(code="audio_lost", message=text))
        if inbound.frames_dropped == self._audio_drops_reported:
            return
        dropped = inbound.frames_dropped - self._audio_drops_reported
        self._audio_drops_reported = inbound.frames_dropped
        self._audio_report_due = now + AUDIO_REPORT_INTERVAL_S
        text = f"audio arrives faster than real time: {dropped} frames dropped (the excess is not heard)"
        self.call.send_event(ev.ErrorEvent(code="audio_too_fast", message=text))

    async def _send_units_with_frames(self) -> None:
        assert self.video_units is not None and self.video is not None
        try:
            while True:
                unit = await self.video_units.get()
                frame = await self._frame_for(unit)
                if self.call.phase == "active" and self.call.mode_open:
                    self._send_unit(unit, frame)
                    recorder = self.call.recorder
                    if recorder is not None and frame is not None and recorder.wants_frame():
                        recorder.frame_jpeg(await asyncio.to_thread(encode_jpeg, frame))
        except Exception:
            log.exception("session %s: a camera frame snapshot failed", self.call.id)
            message = "the server failed to take a camera frame; the call ended"
            self.call.send_event(ev.ErrorEvent(code="internal_error", message=message))
            self.call.close_soon("frame snapshot failed")

    def _send_unit(self, unit: AudioUnit, frame: np.ndarray | None) -> None:
        worker_id = self.call.worker_id
        if worker_id is None:
            return
        payload = p.pcm_to_bytes(unit.pcm)
        frame_shape = None
        sent = self._sent_ahead
        ahead = frame is not None and sent is not None and sent[0] == unit.index and sent[1] is frame
        if ahead:
            self._sent_ahead = None  # the worker has it: the unit names it
        elif frame is not None:
            frame_shape = (int(frame.shape[0]), int(frame.shape[1]), int(frame.shape[2]))
            payload += np.ascontiguousarray(frame).tobytes()
        message = p.Unit(
            session_id=self.call.id,
            index=unit.index,
            samples=unit.pcm.size,
            completed_at=unit.completed_at,
            sent_at=time.monotonic(),
            frame_shape=frame_shape,
            frame_ahead=ahead,
        )
        manager = self.call.manager
        if manager.supervisor.send(worker_id, message, payload):
            manager.stats.units_sent += 1
            recorder = self.call.recorder
            if recorder is not None:
                recorder.caller_audio(unit.pcm, unit.completed_at)


def _retrieve(conversion: asyncio.Future[np.ndarray | None]) -> None:
    """Take a finished early conversion's exception, if any, so that an unused one is not logged as never
    retrieved (a used one raised where it was awaited)."""
    if not conversion.cancelled():
        conversion.exception()
