"""One call: its peer connection, data channel, worker slot, the worker's messages, and cleanup.

Its parts: the speech the caller hears (`call_speech.CallSpeech`), the caller's audio and camera on their way to
the worker (`call_uplink.CallUplink`), the operator's view of it (`call_view`); what it asks of the process that
owns it is `call_host.CallHost`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from typing import Any

from aiortc import MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcdatachannel import RTCDataChannel
from aiortc.sdp import candidate_from_sdp
from pydantic import BaseModel

from inference import protocol as p
from media_shard.messages import CallSnapshot
from media_tracks import InboundAudio, InlineAudioDecoder, LatestVideoFrame, decode_inline, grid_lead_in
from rtc_server import events as ev
from rtc_server.call_host import CallHost, RealtimePort
from rtc_server.call_speech import CallSpeech
from rtc_server.call_uplink import CallUplink
from rtc_server.call_view import call_info, call_snapshot
from rtc_server.client_limits import Client
from rtc_server.ice_address import advertise
from rtc_server.offer_check import offer_problem
from rtc_server.recordings import CallRecorder, recordings_dir

log = logging.getLogger("rtc_server.session")
OUTBOX_LIMIT = 200  # events kept until the data channel opens
# Events larger than this are dropped: 64 KiB is the SCTP message size every peer takes (RFC 8841).
MAX_EVENT_BYTES = 65536
FATAL_WORKER_ERRORS = {"mode_error", "unknown_mode"}


class BadOffer(ValueError):
    """The caller's SDP offer cannot be answered."""


class BadCandidate(ValueError):
    """A trickled ICE candidate cannot be parsed."""


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
        manager: CallHost,
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
        self.unit_grid: p.UnitGrid | None = None  # the grid the mode's units are cut on (batching modes)
        self.pc = RTCPeerConnection(
            RTCConfiguration(iceServers=[RTCIceServer(url) for url in manager.config.rtc.ice_servers])
        )
        # the speech the caller hears, and how much of each reply was heard
        self.outbound = CallSpeech(
            manager.config.rtc.opus_compression_level, manager.config.rtc.outbound_packet_ms
        )
        self.speech = self.outbound.track
        self.uplink = CallUplink(self)  # the caller's audio (and camera) to the worker, in units
        # `rtc.inline_audio_decode`: decodes the caller's audio on the loop
        self.inline_decoder: InlineAudioDecoder | None = None
        self.channel: RTCDataChannel | None = None
        self._outbox: list[str] = []
        self._close_task: asyncio.Task[None] | None = None
        self._connect_timer: asyncio.TimerHandle | None = None
        self.closed = asyncio.Event()
        self.unit_roundtrip_ms: deque[float] = deque(maxlen=600)  # recent units, for the admin dashboard
        # A Realtime API call (POST /v1/realtime/calls): its `oai-events` channel speaks that protocol instead
        self.realtime: RealtimePort | None = None

    @property
    def inbound(self) -> InboundAudio | None:
        return self.uplink.inbound

    @property
    def video(self) -> LatestVideoFrame | None:
        return self.uplink.video

    @property
    def video_max_side(self) -> int | None:
        return self.uplink.video_max_side

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
        return self.answer_sdp

    @property
    def answer_sdp(self) -> str:
        """The answer, with `rtc.public_address` advertised (rtc_server/ice_address.py)."""
        return advertise(self.pc.localDescription.sdp, self.manager.config.rtc.public_address)

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
        if track.kind == "audio" and self.manager.config.rtc.inline_audio_decode:
            # emitted while the offer is applied, before the receiver starts (its decoder thread with it)
            receiver = next(
                (t.receiver for t in self.pc.getTransceivers() if t.receiver.track is track), None
            )
            try:
                if receiver is None:
                    raise RuntimeError("no transceiver holds the track")
                self.inline_decoder = decode_inline(receiver)
            except RuntimeError as exc:  # another aiortc than the pinned one: its own decoder thread decodes
                log.warning("session %s: inbound audio decoded in aiortc's thread (%s)", self.id, exc)
        self.uplink.add_track(track)

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
        parsed = ev.parse_client_message(data, self.manager.config.session.max_message_bytes)
        if isinstance(parsed, ev.ErrorEvent):
            self.send_event(parsed)
            return None
        return parsed

    def _handle_client_message(self, message: ev.ClientMessage) -> None:
        if isinstance(message, ev.SetModeMessage):
            self._set_mode(message.mode, message.system_prompt)
            return
        if isinstance(message, ev.InterruptMessage):
            self.outbound.cancel_scheduled()
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
            self.outbound.cancel_scheduled()
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

    # ---- worker messages (called by inference.supervisor) ----

    def on_worker_message(self, message: p.Message, payload: bytes) -> None:
        if self.phase == "closed":
            return
        if isinstance(message, p.Opened):
            self._on_opened(message)
        elif isinstance(message, p.AudioOut):
            self._on_audio(message, payload)
        elif isinstance(message, p.TextOut | p.UserTurnOut):
            self.send_event(p.caller_event(message))
        elif isinstance(message, p.StateOut):
            self.state = message.state
            self.send_event(p.caller_event(message))
        elif isinstance(message, p.FlushOut):
            cut = self.outbound.model_stopped(message.turn)  # the model keeps only what the caller heard
            if cut is not None:
                self.send_control(cut)
            if self.realtime is not None:
                self.realtime.on_flush(message.turn)
        elif isinstance(message, p.UnitDone):
            self._on_unit_done(message)
        elif isinstance(message, p.ErrorOut):
            self.send_event(p.caller_event(message))
            if message.code in FATAL_WORKER_ERRORS:
                self.close_soon(f"worker error {message.code}")
        elif isinstance(message, p.Closed):
            self.close_soon("closed by the worker")

    def _on_unit_done(self, message: p.UnitDone) -> None:
        metrics = message.at_server(time.monotonic(), self.unit_grid)
        self.manager.stats.record_unit(metrics)
        self.unit_roundtrip_ms.append(metrics.roundtrip_ms)
        self.send_event(ev.MetricsEvent(unit=message.index, **metrics.rounded().model_dump()))

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
        self.unit_grid = message.unit_grid()
        self.uplink.cutter.reset(
            unit_samples=message.unit_samples,
            first_unit_samples=message.first_unit_samples,
            lead_in_samples=lead_in,
        )
        self.uplink.video_max_side = message.video_max_side
        self.uplink.video_fit = message.video_fit
        self.uplink.frames_ahead = message.frames_ahead
        self.mode_open = True
        self.outbound.mode_opened()  # a re-opened mode counts its turns from 0: the track's keep increasing
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
        if self.realtime is not None:
            self.realtime.on_speech(pcm, message.turn)
        self.outbound.play(pcm, message.turn, message.play_at, closed=lambda: self.phase == "closed")

    def flush_speech(self, turn: int | None = None) -> None:
        """Drop the speech queued on the track (counted as not heard)."""
        self.outbound.flush(turn)

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
        self.outbound.cancel_scheduled()
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
            await self.uplink.stop()
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
        return call_snapshot(self, self.speech, self.inbound)

    def info(self) -> ev.SessionInfo:
        return call_info(self, self.manager.admission.position(self))
