"""`GET /v1/realtime` (WebSocket upgrade): a Realtime session without WebRTC, for server-to-server clients.

The session talks to a worker directly, like a call's media side does: it takes an admission slot, opens the
mode, and cuts the client's audio (base64 PCM16 at 24 kHz in `input_audio_buffer.append`, resampled to 16 kHz)
into the mode's units. A clock fills silence when the client sends less audio than real time, so the mode's
VAD hears the end of a turn and replies advance (the modes advance on units); audio sent faster than real time
is taken at once. With `turn_detection: null` appended audio is held until `input_audio_buffer.commit`. The
model's speech goes back as `response.output_audio.delta` (PCM16 24 kHz, the model's own rate).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any

import av
import numpy as np
from aiohttp import WSMsgType, web

from inference import protocol as p
from media_shard.messages import CallSnapshot
from media_tracks import UnitCutter, grid_lead_in
from MiniCPMO45.audio.rates import MODEL_INPUT_RATE
from MiniCPMO45.audio.resample import AudioResampler
from rtc_server import events as ev
from rtc_server.admission import QueueFull
from rtc_server.call_view import call_info, call_snapshot
from rtc_server.client_limits import Client, TooManyRequests, client_of
from rtc_server.manager import ServerBusy, SessionManager
from rtc_server.realtime.conversation import RealtimeConversation
from rtc_server.realtime.session_map import Settings
from rtc_server.session import new_session_id, open_message
from rtc_server.signalling import MANAGER_KEY, ApiError
from rtc_server.voice_ids import voice_exists

log = logging.getLogger("rtc_server.realtime")
MAX_WS_MESSAGE = 2 << 20  # bytes of one WebSocket message (an append of 15 s is ~960 kB of base64)
MAX_HELD_S = 30.0  # audio held before the mode opens, or until a manual commit
OUTBOX_LIMIT = 4000  # server events waiting for a client that does not read: beyond it the session ends
CLOCK_S = 0.05
FATAL = {"mode_error", "unknown_mode", "worker_failed"}


class InputResampler:
    """PCM16 at 24 kHz (or 8 kHz, G.711) -> float32 16 kHz, streaming (the media path's thread-free PyAV
    graph, rebuilt when the input rate changes)."""

    def __init__(self) -> None:
        self.graph = AudioResampler(format="flt", layout="mono", rate=MODEL_INPUT_RATE)
        self.rate: int | None = None

    def __call__(self, pcm16: np.ndarray, rate: int) -> np.ndarray:
        if rate != self.rate:  # session.update changed the input format
            if self.rate is not None:
                self.graph.close()
                self.graph = AudioResampler(format="flt", layout="mono", rate=MODEL_INPUT_RATE)
            self.rate = rate
        frame = av.AudioFrame.from_ndarray(pcm16.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = rate
        out = [f.to_ndarray().reshape(-1) for f in self.graph.resample(frame)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


class SocketCall:
    """One WebSocket Realtime session: an admission ticket and a worker session sink."""

    transport = "websocket"
    has_video = False

    def __init__(
        self, manager: SessionManager, ws: web.WebSocketResponse, app: web.Application, client: Client
    ) -> None:
        self.manager = manager
        self.ws = ws
        self.id = new_session_id()
        self.conversation = RealtimeConversation(
            self,
            self.id,
            Settings(),
            lambda voice: voice_exists(app, voice),
            manager.config.session.max_message_bytes * 16,
        )
        self.mode, self.system_prompt, self.voice, self.options = self.conversation.worker_setup()
        self.phase = "queued"
        self.state: ev.TalkState = "listening"
        self.client = client
        self.created_at = time.monotonic()
        self.unit_roundtrip_ms: deque[float] = deque(maxlen=600)  # recent units, for the admin dashboard
        self.worker_id: int | None = None
        self.mode_open = False
        self.unit_grid: p.UnitGrid | None = None  # the grid the mode's units are cut on (batching modes)
        self.cutter = UnitCutter()
        self.resample = InputResampler()
        self.held: deque[np.ndarray] = deque()  # manual turns: appended audio until commit
        self.early: deque[np.ndarray] = deque()  # audio that came before the mode opened
        self.committed: list[np.ndarray] = []  # manual turns: committed audio until its response.create
        self.controls: list[dict[str, Any]] = []  # controls that came before the mode opened
        self.fed = 0  # samples given to the cutter since the mode opened
        self.clock_start = 0.0
        self.outbox: asyncio.Queue[str | None] = asyncio.Queue()
        self.tasks: list[asyncio.Task[None]] = []
        self.closed = asyncio.Event()

    # ---- transport ----

    def start(self) -> None:
        self.tasks = [
            asyncio.create_task(self._writer(), name=f"rt-writer-{self.id[:8]}"),
            asyncio.create_task(self._clock(), name=f"rt-clock-{self.id[:8]}"),
        ]
        self.conversation.start()

    def send_json(self, data: str) -> None:
        if self.closed.is_set():
            return
        if self.outbox.qsize() >= OUTBOX_LIMIT:
            log.warning("realtime %s: the client does not read its events; closing", self.id)
            self.close_soon()
            return
        self.outbox.put_nowait(data)

    async def _writer(self) -> None:
        while True:
            data = await self.outbox.get()
            if data is None or self.ws.closed:
                return
            try:
                await self.ws.send_str(data)
            except (ConnectionError, RuntimeError):
                return

    # ---- CallPort ----

    def control(self, message: dict[str, Any]) -> None:
        if message.get("type") == "end_turn":
            self._send_committed()  # the turn's audio reaches the mode right before its end
        if not self.mode_open or self.worker_id is None:
            self.controls.append(message)
            return
        self.manager.supervisor.send(self.worker_id, p.Control(session_id=self.id, message=message))

    def reconfigure(self, mode: str, system_prompt: str, voice: str | None, options: dict[str, Any]) -> None:
        self.mode, self.system_prompt, self.voice, self.options = mode, system_prompt, voice, options
        self.manager.admission.switch(self, mode)
        self.controls.clear()
        if self.phase == "active" and self.worker_id is not None:
            self.mode_open = False
            self._open_on_worker()

    def flush_output(self) -> None:
        """The client plays the audio: nothing is queued here."""

    def append_audio(self, pcm16: np.ndarray, rate: int) -> None:
        samples = self.resample(pcm16, rate)
        if self.conversation.settings.manual:
            self._hold(self.held, samples)
        else:
            self._feed(samples)

    def commit_audio(self) -> float:
        """Manual turns: the held audio becomes the committed turn, sent with its `end_turn` (response.create),
        so the VAD never ends it by itself meanwhile."""
        self.committed += self.held
        self.held.clear()
        return sum(a.size for a in self.committed) / MODEL_INPUT_RATE

    def _send_committed(self) -> None:
        committed, self.committed = self.committed, []
        for samples in committed:
            self._feed(samples)
        if self.mode_open and self.cutter.pending_samples:  # the turn's last partial unit goes out now
            self._feed(np.zeros(self.cutter.unit_samples - self.cutter.pending_samples, np.float32))

    def clear_audio(self) -> None:
        self.held.clear()
        self.early.clear()

    # ---- audio to the worker ----

    @staticmethod
    def _hold(store: deque[np.ndarray], samples: np.ndarray) -> None:
        store.append(samples)
        while sum(a.size for a in store) > MAX_HELD_S * MODEL_INPUT_RATE:
            store.popleft()

    def _feed(self, samples: np.ndarray) -> None:
        if not self.mode_open or self.worker_id is None:
            self._hold(self.early, samples)
            return
        self.fed += samples.size
        for unit in self.cutter.push(samples, time.monotonic()):
            message = p.Unit(
                session_id=self.id,
                index=unit.index,
                samples=unit.pcm.size,
                completed_at=unit.completed_at,
                sent_at=time.monotonic(),
            )
            if self.manager.supervisor.send(self.worker_id, message, p.pcm_to_bytes(unit.pcm)):
                self.manager.stats.units_sent += 1

    async def _clock(self) -> None:
        """Silence whenever the client's audio falls a unit behind real time."""
        while True:
            await asyncio.sleep(CLOCK_S)
            if not self.mode_open:
                continue
            due = (time.monotonic() - self.clock_start) * MODEL_INPUT_RATE
            while self.fed + self.cutter.unit_samples <= due:
                missing = self.cutter.unit_samples - self.cutter.pending_samples
                self._feed(np.zeros(missing, np.float32))

    # ---- admission (rtc_server.admission.Ticket) ----

    def admit(self, worker_id: int) -> None:
        self.phase = "active"
        self.worker_id = worker_id
        self.manager.supervisor.attach(worker_id, self.id, self)
        self._open_on_worker()

    def queue_update(self, position: int, eta_s: float) -> None:
        """The Realtime API has no queue event: a queued session waits for its slot in silence."""

    def _open_on_worker(self) -> None:
        assert self.worker_id is not None
        message = open_message(self.id, self.mode, self.options, self.system_prompt, self.voice)
        if not self.manager.supervisor.send(self.worker_id, message):
            self.on_worker_lost("worker unavailable")

    # ---- worker messages (inference.supervisor.SessionSink) ----

    def on_worker_message(self, message: p.Message, payload: bytes) -> None:
        if self.closed.is_set():
            return
        translator = self.conversation.translator
        if isinstance(message, p.Opened):
            self._on_opened(message)
        elif isinstance(message, p.AudioOut):
            translator.on_speech(p.pcm_from_bytes(payload), message.turn)
        elif isinstance(message, p.TextOut | p.UserTurnOut):
            translator.on_event(p.caller_event(message))
        elif isinstance(message, p.StateOut):
            self.state = message.state
            translator.on_event(p.caller_event(message))
        elif isinstance(message, p.FlushOut):
            translator.on_flush(message.turn)
        elif isinstance(message, p.UnitDone):
            metrics = message.at_server(time.monotonic(), self.unit_grid)
            self.manager.stats.record_unit(metrics)
            self.unit_roundtrip_ms.append(metrics.roundtrip_ms)
            if metrics.kv_tokens is not None:
                translator.kv_tokens = metrics.kv_tokens
        elif isinstance(message, p.ErrorOut):
            translator.on_event(p.caller_event(message))
            if message.code in FATAL:
                self.close_soon()
        elif isinstance(message, p.Closed):
            self.close_soon()

    def _on_opened(self, message: p.Opened) -> None:
        now = time.monotonic()
        lead_in = 0
        if message.align_units:  # batching modes: units end on the tick phase's grid, as a call's do
            first = message.first_unit_samples or message.unit_samples
            lead_in = grid_lead_in(now, first, message.unit_samples, offset_s=message.grid_offset_s)
        self.unit_grid = message.unit_grid()
        self.cutter.reset(
            unit_samples=message.unit_samples,
            first_unit_samples=message.first_unit_samples,
            lead_in_samples=lead_in,
        )
        self.mode = message.mode
        self.mode_open = True
        self.fed = lead_in  # the silent lead-in counts as audio the clock has given
        self.clock_start = now
        early = list(self.early)
        self.early.clear()
        for samples in early:
            self._feed(samples)
        controls, self.controls = self.controls, []
        for control in controls:
            self.control(control)

    def on_worker_lost(self, reason: str) -> None:
        self.worker_id = None
        self.mode_open = False
        detail = ev.ErrorEvent(code="worker_failed", message=f"the inference worker failed: {reason}")
        self.conversation.translator.on_event(detail)
        self.close_soon()

    def reject(self, code: str, message: str) -> None:
        self.conversation.translator.on_event(ev.ErrorEvent(code=code, message=message))
        self.close_soon()

    # ---- teardown ----

    def close_soon(self) -> None:
        if not self.closed.is_set():
            asyncio.ensure_future(self.close())

    def info(self) -> ev.SessionInfo:
        return call_info(self, self.manager.admission.position(self))

    def snapshot(self) -> CallSnapshot:
        return call_snapshot(self)

    async def close(self, reason: str = "the WebSocket closed") -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        self.phase = "closed"
        self.manager.forget(self, reason)  # type: ignore[arg-type]
        self.manager.admission.leave(self)
        if self.worker_id is not None:
            self.manager.supervisor.detach(self.worker_id, self.id)
            self.worker_id = None
        self.outbox.put_nowait(None)
        writer, clock = self.tasks if self.tasks else (None, None)
        if clock is not None:
            clock.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await clock
        if writer is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(writer, 2.0)
        await self.ws.close()
        self.resample.graph.close()


SOCKETS_KEY = web.AppKey("realtime_sockets", dict)


async def realtime_socket(request: web.Request) -> web.StreamResponse:
    manager = request.app[MANAGER_KEY]
    ws = web.WebSocketResponse(max_msg_size=MAX_WS_MESSAGE, heartbeat=20.0, protocols=("realtime",))
    if not ws.can_prepare(request).ok:
        raise ApiError(400, "websocket_required", "GET /v1/realtime is a WebSocket: send an Upgrade request")
    model = request.query.get("model", "")
    if len(model) > 128:
        raise ApiError(400, "bad_request", "model is too long")
    bearer = request.headers.get("Authorization") if manager.config.auth.api_token else None
    client = client_of(request.remote, bearer)
    try:
        manager.check_new_call("chat", client)
    except TooManyRequests as exc:
        raise ApiError(429, "too_many_requests", str(exc), headers={"Retry-After": exc.retry_after}) from None
    except (ServerBusy, QueueFull) as exc:
        raise ApiError(503, "server_busy", str(exc), headers={"Retry-After": "30"}) from None
    await ws.prepare(request)
    call = SocketCall(manager, ws, request.app, client)
    sockets: dict[str, SocketCall] = request.app[SOCKETS_KEY]
    sockets[call.id] = call
    manager.sessions[call.id] = call  # type: ignore[assignment]  # listed like a call (/api/sessions, /metrics)
    manager.stats.sessions_started[call.mode] = manager.stats.sessions_started.get(call.mode, 0) + 1
    call.start()
    try:
        manager.admission.request(call)
    except QueueFull as exc:
        call.reject("queue_full", str(exc))
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                call.conversation.on_client_data(msg.data)
            elif msg.type == WSMsgType.BINARY:
                call.conversation.error("invalid_event", "events are JSON text messages, not binary")
            if call.closed.is_set():
                break
    finally:
        sockets.pop(call.id, None)
        await call.close()
    return ws


async def _close_sockets(app: web.Application) -> None:
    await asyncio.gather(*(call.close() for call in list(app[SOCKETS_KEY].values())))


def add_socket_routes(app: web.Application) -> None:
    app[SOCKETS_KEY] = {}
    app.router.add_get("/v1/realtime", realtime_socket)
    app.on_shutdown.append(_close_sockets)
