"""One call: its peer connection, media tracks, data channel, worker slot and cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcdatachannel import RTCDataChannel
from aiortc.sdp import candidate_from_sdp
from pydantic import BaseModel

from inference import protocol as p
from media_shard.messages import CallSnapshot
from media_tracks import AudioUnit, InboundAudio, LatestVideoFrame, SpeechTrack, UnitCutter, grid_lead_in
from MiniCPMO45.audio.rates import SPEECH_RATE
from rtc_server import events as ev
from rtc_server.client_limits import Client
from rtc_server.heard import HeardTracker
from rtc_server.metrics import percentile
from rtc_server.offer_check import offer_problem
from rtc_server.recordings import CallRecorder, encode_jpeg, recordings_dir

if TYPE_CHECKING:
    from rtc_server.manager import SessionManager
    from rtc_server.realtime.webrtc import RtcPort

log = logging.getLogger("rtc_server.session")
OUTBOX_LIMIT = 200  # events kept until the data channel opens
# Events larger than this are dropped: 64 KiB is the SCTP message size every peer takes (RFC 8841).
MAX_EVENT_BYTES = 65536
VIDEO_UNITS_LIMIT = 8  # units waiting for their camera frame snapshot
AUDIO_REPORT_INTERVAL_S = 5.0  # how often a caller whose audio runs too fast hears about it
FATAL_WORKER_ERRORS = {"mode_error", "unknown_mode"}


class BadOffer(ValueError):
    """The caller's SDP offer cannot be answered."""


class BadCandidate(ValueError):
    """A trickled ICE candidate cannot be parsed."""


def user_turn_event(message: p.UserTurnOut) -> ev.UserTurnEvent:
    return ev.UserTurnEvent(
        turn=message.turn, seconds=message.seconds, text=message.text, started=message.started
    )


def open_message(
    session_id: str, mode: str, options: dict[str, Any], system_prompt: str | None, voice: str | None
) -> p.OpenSession:
    """The worker's `open` for a session: its mode options plus the call's prompt and voice, when set."""
    merged: dict[str, Any] = dict(options)
    if system_prompt:
        merged["system_prompt"] = system_prompt
    if voice:
        merged["voice"] = voice
    return p.OpenSession(session_id=session_id, mode=mode, options=merged)


def new_session_id() -> str:
    """192 random bits: the session URL is the caller's capability (RFC 9725), so it must not be guessable."""
    return secrets.token_urlsafe(24)


class CallSession:
    def __init__(
        self,
        manager: SessionManager,
        mode: str,
        system_prompt: str | None,
        voice: str | None = None,
        options: dict[str, Any] | None = None,
        client: Client | None = None,
        session_id: str | None = None,
    ) -> None:
        self.manager = manager
        self.id = session_id or new_session_id()
        self.client = client  # who offered the call (per-client limits on pending calls)
        self.mode = mode
        self.system_prompt = system_prompt
        self.recorder: CallRecorder | None = None  # from the call's first admission (`recording.enabled`)
        self.voice = voice
        self.options = options or {}
        self._pause_timer: asyncio.TimerHandle | None = None
        self._switch_pending = False
        self.phase: ev.SessionPhase = "connecting"  # no slot or queue place until ICE+DTLS connect
        self.state: ev.TalkState = "listening"
        self.created_at = time.monotonic()
        self.worker_id: int | None = None
        self.paused = False
        self.mode_open = False  # the worker said `opened` for the current mode
        self.video_max_side: int | None = None
        self.pc = RTCPeerConnection(
            RTCConfiguration(iceServers=[RTCIceServer(url) for url in manager.config.rtc.ice_servers])
        )
        self.speech = SpeechTrack(input_rate=SPEECH_RATE, encode=True)
        self.cutter = UnitCutter()
        self.inbound: InboundAudio | None = None
        self.video: LatestVideoFrame | None = None
        self.channel: RTCDataChannel | None = None
        self._outbox: list[str] = []
        self._timers: set[asyncio.TimerHandle] = set()
        self._close_task: asyncio.Task[None] | None = None
        self._connect_timer: asyncio.TimerHandle | None = None
        self._video_units: asyncio.Queue[AudioUnit] | None = None
        self._video_task: asyncio.Task[None] | None = None
        self.video_units_dropped = 0  # units whose frame snapshot fell behind (the oldest waiting is dropped)
        self._audio_drops_reported = 0  # inbound.frames_dropped at the last `audio_too_fast` report
        self._audio_gaps_reported = 0.0  # inbound.unfilled_gap_s at the last `audio_lost` report
        self._audio_report_due = 0.0  # time.monotonic() after which the next report may go
        self.closed = asyncio.Event()
        self.unit_roundtrip_ms: deque[float] = deque(maxlen=600)  # recent units, for the admin dashboard
        # A Realtime API call (POST /v1/realtime/calls): its `oai-events` channel speaks that protocol instead
        self.realtime: RtcPort | None = None
        self.heard = HeardTracker()  # how much of the current reply was played (heard-only context)
        # the speech track's turn = the mode's turn + this; it moves up when a mode (re)opens (set_mode,
        # session.update), since every mode counts its turns from 0 and the track drops older turns as stale
        self.track_turn_base = 0
        self._opened_once = False

    # ---- signalling ----

    async def answer(self, offer_sdp: str) -> str:
        """Apply the caller's offer and return our answer (audio is sendrecv: the caller hears us)."""
        problem = offer_problem(offer_sdp)
        if problem is not None:
            raise BadOffer(problem)
        pc = self.pc
        pc.on("track", self._on_track)
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_connection_state)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except Exception as exc:
            raise BadOffer(f"cannot apply the SDP offer: {exc or type(exc).__name__}") from None
        if not any(t.kind == "audio" for t in pc.getTransceivers()):
            raise BadOffer("the SDP offer has no audio section")
        pc.addTrack(self.speech)
        try:
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:
            raise BadOffer(f"cannot answer the SDP offer: {exc or type(exc).__name__}") from None
        loop = asyncio.get_running_loop()
        self._connect_timer = loop.call_later(
            self.manager.config.rtc.connect_timeout_s, self._connect_timeout
        )
        return pc.localDescription.sdp

    @property
    def answer_sdp(self) -> str:
        return self.pc.localDescription.sdp

    async def add_candidates(self, candidates: list[tuple[str | None, str]], end: bool) -> None:
        """Trickled ICE candidates ((mid, `candidate:...` line) pairs), then end-of-candidates if `end`."""
        for mid, line in candidates:
            try:
                candidate = candidate_from_sdp(line.split(":", 1)[1])
            except (ValueError, IndexError, AssertionError):  # aiortc asserts on too few fields
                raise BadCandidate(f"cannot parse ICE candidate {line[:80]!r}") from None
            candidate.sdpMid = mid
            if mid is None:
                candidate.sdpMLineIndex = 0
            await self.pc.addIceCandidate(candidate)
        if end:
            await self.pc.addIceCandidate(None)

    def _connect_timeout(self) -> None:
        if self.phase == "connecting":
            log.info("session %s: not connected in time", self.id)
            self.close_soon("connect timeout")

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and self.inbound is None:
            self.inbound = InboundAudio(track, self.cutter, self._on_unit)
            self.inbound.start()
        elif track.kind == "video" and self.video is None:
            self.video = LatestVideoFrame(track)
            self.video.start()

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if self.realtime is not None:
            if channel.label == "oai-events" and self.channel is None:
                self.channel = channel
                channel.on("message", self.realtime.on_client_data)
                self.realtime.on_channel_open()
            return
        if channel.label != "events" or self.channel is not None:
            return
        self.channel = channel
        channel.on("message", self._on_client_message)
        self.send_event(
            ev.SessionEvent(
                session_id=self.id, mode=self.mode, phase=self.phase, recording=self.recorder is not None
            )
        )
        outbox, self._outbox = self._outbox, []
        for data in outbox:
            self._send_data(data)

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        log.info("session %s: connection %s", self.id, state)
        if state == "connected" and self.phase == "connecting":
            if self._connect_timer is not None:
                self._connect_timer.cancel()
            self.phase = "queued"
            self.manager.connected(self)  # only now does the call ask for a worker slot
        elif state in ("failed", "closed"):
            self.close_soon(f"connection {state}")

    # ---- events to the caller ----

    def send_event(self, event: BaseModel) -> None:
        """Send `event` to the caller, or hold it until the channel opens. Never raises: what cannot be sent
        is logged and dropped."""
        try:
            data = event.model_dump_json()
        except Exception:
            log.exception("session %s: cannot serialise a %s event", self.id, type(event).__name__)
            return
        if len(data.encode()) > MAX_EVENT_BYTES:
            name = type(event).__name__
            log.warning("session %s: dropped a %s event of %d bytes", self.id, name, len(data))
            return
        if self.recorder is not None:
            self.recorder.event(data)  # the JSON the caller gets: serialised once
        if self.realtime is not None:
            self.realtime.on_call_event(event)  # translated into Realtime server events
            return
        channel = self.channel
        if channel is not None and channel.readyState == "open":
            self._send_data(data)
        elif len(self._outbox) < OUTBOX_LIMIT:
            self._outbox.append(data)

    def _send_data(self, data: str) -> None:
        assert self.channel is not None
        try:
            self.channel.send(data)
        except Exception as exc:  # e.g. the channel closed under us
            log.warning("session %s: cannot send an event: %s", self.id, exc or type(exc).__name__)

    def _on_client_message(self, data: str | bytes) -> None:
        """The data channel's message handler. Nothing may escape it: aiortc would end the call."""
        try:
            message = self._parse_client_message(data)
            if message is not None:
                self._handle_client_message(message)
        except Exception:
            log.exception("session %s: a client message failed", self.id)
            self.send_event(ev.ErrorEvent(code="internal_error", message="the server failed on this message"))

    def _parse_client_message(self, data: str | bytes) -> ev.ClientMessage | None:
        """The message, or None after telling the caller what is wrong with it."""
        limit = self.manager.config.session.max_message_bytes
        size = len(data) if isinstance(data, bytes) else len(data.encode())
        if size > limit:
            text = f"a client message may have at most {limit} bytes; this one had {size}"
            self.send_event(ev.ErrorEvent(code="message_too_large", message=text))
            return None
        try:
            return ev.client_message_adapter.validate_python(json.loads(data))
        except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deeply
            detail = ev.invalid_message_detail(exc)
            self.send_event(ev.ErrorEvent(code="bad_message", message=f"invalid client message: {detail}"))
            return None

    def _handle_client_message(self, message: ev.ClientMessage) -> None:
        if isinstance(message, ev.SetModeMessage):
            self._set_mode(message.mode, message.system_prompt)
            return
        if isinstance(message, ev.InterruptMessage):
            self._cancel_timers()
            self.flush_speech()
        elif isinstance(message, ev.PauseMessage):
            self._pause()
        elif isinstance(message, ev.ResumeMessage):
            self._resume()
        elif isinstance(message, ev.SystemPromptMessage):
            self.system_prompt = message.text
        if self.phase == "active" and self.worker_id is not None:
            self.manager.supervisor.send(
                self.worker_id, p.Control(session_id=self.id, message=message.model_dump())
            )

    def _pause(self) -> None:
        self.paused = True
        timeout = self.manager.config.session.pause_timeout_s
        if self._pause_timer is not None:
            self._pause_timer.cancel()
        self._pause_timer = asyncio.get_running_loop().call_later(timeout, self._pause_expired)
        self.send_event(ev.PausedEvent(timeout_s=timeout))

    def _resume(self) -> None:
        if self._pause_timer is not None:
            self._pause_timer.cancel()
            self._pause_timer = None
        was_paused, self.paused = self.paused, False
        if was_paused:
            self.send_event(ev.ResumedEvent())

    def _pause_expired(self) -> None:
        self._pause_timer = None
        timeout = self.manager.config.session.pause_timeout_s
        self.send_event(
            ev.ErrorEvent(
                code="pause_timeout",
                message=f"paused for {timeout:g} s without resume: the call ended and its slot was released",
            )
        )
        self.close_soon("pause timeout")

    def reconfigure(self, mode: str, system_prompt: str, voice: str | None, options: dict[str, Any]) -> None:
        """Re-open the call's mode with these settings (a Realtime `session.update`), or, before admission,
        open with them."""
        self.voice = voice
        self.options = dict(options)
        self._set_mode(mode, system_prompt)

    def send_control(self, message: dict[str, Any]) -> bool:
        """A control for the worker's mode (Realtime calls); False if the call holds no worker slot."""
        if self.phase != "active" or self.worker_id is None:
            return False
        return self.manager.supervisor.send(self.worker_id, p.Control(session_id=self.id, message=message))

    def _set_mode(self, mode: str, system_prompt: str | None = None) -> None:
        if mode not in self.manager.known_modes():
            self.send_event(ev.ErrorEvent(code="unknown_mode", message=f"unknown mode {mode!r}"))
            return
        self.mode = mode
        if system_prompt is not None:  # "" opens the new mode with its own default prompt
            self.system_prompt = system_prompt or None
        self.manager.admission.switch(self, mode)
        if self.phase == "active" and self.worker_id is not None:
            self.mode_open = False
            self._switch_pending = True
            self._cancel_timers()
            self.speech.flush()
            self._open_on_worker()

    # ---- admission (called by rtc_server.admission) ----

    def admit(self, worker_id: int) -> None:
        self.phase = "active"
        self.worker_id = worker_id
        self._start_recording()
        self.manager.supervisor.attach(worker_id, self.id, self)
        self._open_on_worker()

    def _start_recording(self) -> None:
        settings = self.manager.config.recording
        if not settings.enabled or self.recorder is not None:
            return
        try:
            self.recorder = CallRecorder(recordings_dir(self.manager.config), self.id, self.mode)
        except OSError:
            log.exception("session %s: cannot record this call", self.id)
            return
        self.speech.tap = self.recorder.assistant_frame

    def queue_update(self, position: int, eta_s: float) -> None:
        self.send_event(ev.QueueEvent(position=position, eta_s=eta_s))

    def reject(self, code: str, message: str) -> None:
        """Admission has no place for the call (a full queue when it connected): tell the caller and end it."""
        self.send_event(ev.ErrorEvent(code=code, message=message))
        self.close_soon(code)

    def _open_on_worker(self) -> None:
        assert self.worker_id is not None
        message = open_message(self.id, self.mode, self.options, self.system_prompt, self.voice)
        if not self.manager.supervisor.send(self.worker_id, message):
            self.on_worker_lost("worker unavailable")

    # ---- media to the worker ----

    def _on_unit(self, unit: AudioUnit) -> None:
        self._report_audio_drops()
        if self.phase != "active" or not self.mode_open or self.paused or self.worker_id is None:
            return  # queued, switching or paused: the caller's audio is not routed anywhere
        if self.video is not None and self.video_max_side is not None:
            # The frame conversion runs off the loop; units still reach the worker in order.
            if self._video_units is None:
                self._video_units = asyncio.Queue(maxsize=VIDEO_UNITS_LIMIT)
                self._video_task = asyncio.create_task(
                    self._send_units_with_frames(), name=f"units-{self.id}"
                )
            if self._video_units.full():
                self._video_units.get_nowait()  # the snapshots fell behind: the oldest unit is dropped
                self.video_units_dropped += 1
            self._video_units.put_nowait(unit)
            return
        self._send_unit(unit, None)

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
            self.send_event(ev.ErrorEvent(code="audio_lost", message=text))
        if inbound.frames_dropped == self._audio_drops_reported:
            return
        dropped = inbound.frames_dropped - self._audio_drops_reported
        self._audio_drops_reported = inbound.frames_dropped
        self._audio_report_due = now + AUDIO_REPORT_INTERVAL_S
        text = f"audio arrives faster than real time: {dropped} frames dropped (the excess is not heard)"
        self.send_event(ev.ErrorEvent(code="audio_too_fast", message=text))

    async def _send_units_with_frames(self) -> None:
        assert self._video_units is not None and self.video is not None
        try:
            while True:
                unit = await self._video_units.get()
                frame = await self.video.snapshot_rgb_async(self.video_max_side)
                if self.phase == "active" and self.mode_open:
                    self._send_unit(unit, frame)
                    recorder = self.recorder
                    if recorder is not None and frame is not None and recorder.wants_frame():
                        recorder.frame_jpeg(await asyncio.to_thread(encode_jpeg, frame))
        except Exception:
            log.exception("session %s: a camera frame snapshot failed", self.id)
            message = "the server failed to take a camera frame; the call ended"
            self.send_event(ev.ErrorEvent(code="internal_error", message=message))
            self.close_soon("frame snapshot failed")

    def _send_unit(self, unit: AudioUnit, frame: np.ndarray | None) -> None:
        if self.worker_id is None:
            return
        payload = p.pcm_to_bytes(unit.pcm)
        frame_shape = None
        if frame is not None:
            frame_shape = (int(frame.shape[0]), int(frame.shape[1]), int(frame.shape[2]))
            payload += np.ascontiguousarray(frame).tobytes()
        message = p.Unit(
            session_id=self.id,
            index=unit.index,
            samples=unit.pcm.size,
            completed_at=unit.completed_at,
            sent_at=time.monotonic(),
            frame_shape=frame_shape,
        )
        if self.manager.supervisor.send(self.worker_id, message, payload):
            self.manager.stats.units_sent += 1
            if self.recorder is not None:
                self.recorder.caller_audio(unit.pcm, unit.completed_at)

    # ---- worker messages (called by inference.supervisor) ----

    def on_worker_message(self, message: p.Message, payload: bytes) -> None:
        if self.phase == "closed":
            return
        if isinstance(message, p.Opened):
            self._on_opened(message)
        elif isinstance(message, p.AudioOut):
            self._on_audio(message, payload)
        elif isinstance(message, p.TextOut):
            self.send_event(ev.TextEvent(text=message.text, turn=message.turn))
        elif isinstance(message, p.UserTurnOut):
            self.send_event(user_turn_event(message))
        elif isinstance(message, p.StateOut):
            self.state = message.state
            self.send_event(ev.StateEvent(state=message.state))
        elif isinstance(message, p.FlushOut):
            self._cancel_timers()
            self.flush_speech(max(message.turn + self.track_turn_base, self.speech.turn))
            cut = self.heard.cut(message.turn)  # the model keeps only what the caller heard of the reply
            if cut is not None:
                self.send_control(cut)
            if self.realtime is not None:
                self.realtime.on_flush(message.turn)
        elif isinstance(message, p.UnitDone):
            self._on_unit_done(message)
        elif isinstance(message, p.ErrorOut):
            self.send_event(ev.ErrorEvent(code=message.code, message=message.message))
            if message.code in FATAL_WORKER_ERRORS:
                self.close_soon(f"worker error {message.code}")
        elif isinstance(message, p.Closed):
            self.close_soon("closed by the worker")

    def _on_unit_done(self, message: p.UnitDone) -> None:
        roundtrip_ms = (time.monotonic() - message.completed_at) * 1000
        self.manager.stats.record_unit(message.handoff_ms, roundtrip_ms)
        self.unit_roundtrip_ms.append(roundtrip_ms)
        t = message.timings

        def ms(key: str) -> float | None:
            return round(t[key], 2) if key in t else None

        def count(key: str) -> int | None:
            return int(t[key]) if key in t else None

        self.send_event(
            ev.MetricsEvent(
                unit=message.index,
                handoff_ms=round(message.handoff_ms, 2),
                compute_ms=round(message.compute_ms, 2),
                roundtrip_ms=round(roundtrip_ms, 2),
                queue_ms=round(message.queue_ms, 2),
                lag_ms=round(message.handoff_ms + message.queue_ms, 2),
                backlog_units=message.backlog_units,
                prefill_ms=ms("prefill_ms"),
                decide_ms=ms("decide_ms"),
                tts_ms=ms("tts_ms"),
                vocoder_ms=ms("vocoder_ms"),
                vad_ms=ms("vad_ms"),
                kv_tokens=count("kv_tokens"),
                dropped_tokens=count("dropped_tokens"),
                batch_sessions=count("batch_sessions"),
            )
        )

    def _on_opened(self, message: p.Opened) -> None:
        if message.output_rate != self.speech.input_rate:
            self.send_event(
                ev.ErrorEvent(
                    code="mode_error", message=f"mode output rate {message.output_rate} unsupported"
                )
            )
            self.close_soon("bad output rate")
            return
        self.mode = message.mode
        lead_in = 0
        if message.align_units:
            first = message.first_unit_samples or message.unit_samples
            lead_in = grid_lead_in(
                time.monotonic(), first, message.unit_samples, offset_s=message.grid_offset_s
            )
        self.cutter.reset(
            unit_samples=message.unit_samples,
            first_unit_samples=message.first_unit_samples,
            lead_in_samples=lead_in,
        )
        self.video_max_side = message.video_max_side
        self.mode_open = True
        if self._opened_once:  # a re-opened mode counts its turns from 0: keep the track's turns increasing
            self.track_turn_base = self.speech.turn + 1
            self.heard = HeardTracker()
        self._opened_once = True
        switch_ms = round(message.open_ms, 3) if self._switch_pending else None
        self._switch_pending = False
        self.send_event(
            ev.SessionEvent(
                session_id=self.id,
                mode=self.mode,
                phase=self.phase,
                switch_ms=switch_ms,
                recording=self.recorder is not None,
            )
        )

    def _on_audio(self, message: p.AudioOut, payload: bytes) -> None:
        if message.sample_rate != self.speech.input_rate:
            log.warning("session %s: dropping audio at %d Hz", self.id, message.sample_rate)
            return
        pcm = p.pcm_from_bytes(payload)
        self.heard.produced(message.turn, pcm.size / message.sample_rate)
        if self.realtime is not None:
            self.realtime.on_speech(pcm, message.turn)
        delay = 0.0 if message.play_at is None else message.play_at - time.monotonic()
        track_turn = message.turn + self.track_turn_base
        if delay <= 0:
            self.speech.push(pcm, track_turn)
            return
        handle: asyncio.TimerHandle

        def play() -> None:
            self._timers.discard(handle)
            if self.phase != "closed":
                self.speech.push(pcm, track_turn)

        handle = asyncio.get_running_loop().call_later(delay, play)
        self._timers.add(handle)

    def flush_speech(self, turn: int | None = None) -> None:
        """Drop the speech queued on the track (counted as not heard)."""
        self.heard.dropping(self.speech.buffered_s)
        self.speech.flush(turn)

    def _cancel_timers(self) -> None:
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()

    def on_worker_lost(self, reason: str) -> None:
        if self.phase == "closed":
            return
        self.worker_id = None  # the supervisor already dropped our sink
        self.send_event(ev.ErrorEvent(code="worker_failed", message=f"the inference worker failed: {reason}"))
        self.close_soon(f"worker lost: {reason}")

    # ---- teardown ----

    def close_soon(self, reason: str) -> None:
        if self._close_task is None and self.phase != "closed":
            self._close_task = asyncio.ensure_future(self.close(reason))

    async def close(self, reason: str) -> None:
        """Release everything the call holds; safe to call more than once and from several places."""
        if self.phase == "closed":
            await self.closed.wait()
            return
        log.info("session %s: closing (%s)", self.id, reason)
        self.phase = "closed"
        self.manager.admission.leave(self)
        if self.worker_id is not None:
            self.manager.supervisor.detach(self.worker_id, self.id)
        self._cancel_timers()
        if self._connect_timer is not None:
            self._connect_timer.cancel()
        if self._pause_timer is not None:
            self._pause_timer.cancel()
        try:
            # An event for the caller (e.g. `queue_full` right after connecting) waits for the events channel,
            # which opens shortly after the connection (SCTP follows DTLS).
            deadline = time.monotonic() + 1.0
            while self._outbox and self.channel is None and time.monotonic() < deadline:
                if self.pc.connectionState != "connected":
                    break
                await asyncio.sleep(0.02)
            # Let the last events (e.g. an error) leave before the transport goes away.
            channel = self.channel
            if (
                channel is not None
                and channel.readyState == "open"
                and self.pc.connectionState == "connected"
            ):
                deadline = time.monotonic() + 1.0
                while channel.bufferedAmount > 0 and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.05)
            if self._video_task is not None:
                self._video_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._video_task
            if self.inbound is not None:
                await self.inbound.stop()
            if self.video is not None:
                await self.video.stop()
            self.speech.stop()
            with contextlib.suppress(Exception):
                await self.pc.close()
        finally:
            if self.recorder is not None:
                self.recorder.close()
            self.manager.forget(self, reason)
            self.closed.set()

    def snapshot(self) -> CallSnapshot:
        """The call as the dashboard and `/metrics` see it (sent to the front by a media shard)."""
        inbound = self.inbound
        return CallSnapshot(
            session_id=self.id,
            mode=self.mode,
            phase=self.phase,
            state=self.state,
            worker_id=self.worker_id,
            age_s=round(time.monotonic() - self.created_at, 3),
            units=len(self.unit_roundtrip_ms),
            unit_latency_p50_ms=percentile(self.unit_roundtrip_ms, 50),
            unit_latency_p95_ms=percentile(self.unit_roundtrip_ms, 95),
            speech_buffered_s=round(self.speech.buffered_s, 3),
            send_lateness_p95_ms=round(self.speech.pacing.percentile(95) * 1000, 2),
            frames_in=inbound.frames_in if inbound is not None else 0,
            frames_out=self.speech.frames_out,
            frames_dropped=inbound.frames_dropped if inbound is not None else 0,
            audio_lost_s=round(inbound.unfilled_gap_s, 3) if inbound is not None else 0.0,
        )

    def info(self) -> ev.SessionInfo:
        return ev.SessionInfo(
            session_id=self.id,
            mode=self.mode,
            phase=self.phase,
            state=self.state,
            worker_id=self.worker_id,
            queue_position=self.manager.admission.position(self),
            age_s=round(time.monotonic() - self.created_at, 3),
        )
