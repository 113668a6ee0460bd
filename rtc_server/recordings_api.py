"""`/api/recordings`: list (admin), read, replay, download and delete call recordings (`rtc_server/recordings.py`).

A recording's id is its call's id, the call's capability: whoever held the call's URL may read or delete its
recording, as the page that made the call does from its history. Listing every recording is the operator's
(`X-Admin-Token`; loopback clients when no admin token is set). With `auth.api_token` set, every route needs
the bearer token as the rest of `/api` does. A background task applies the retention and size caps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from rtc_server import recordings as rec
from rtc_server.config import AppConfig
from rtc_server.signalling import MANAGER_KEY, ApiError, require_admin

log = logging.getLogger("rtc_server.recordings_api")
CONFIG_KEY = web.AppKey("recordings_config", AppConfig)
PRUNE_EVERY_S = 3600.0


def _root(request: web.Request) -> Path:
    return rec.recordings_dir(request.app[CONFIG_KEY])


def _id(request: web.Request) -> str:
    recording_id = request.match_info["recording_id"]
    if not rec.RECORDING_ID.match(recording_id) or not (_root(request) / recording_id).is_dir():
        raise ApiError(404, "unknown_recording", "no recording at this URL")
    return recording_id


async def list_recordings(request: web.Request) -> web.Response:
    require_admin(request)  # one recording per call id, and those ids are capabilities
    found = await asyncio.to_thread(rec.list_all, _root(request))
    return web.json_response(rec.RecordingList(recordings=found).model_dump())


async def get_recording(request: web.Request) -> web.Response:
    recording = await asyncio.to_thread(rec.load, _root(request), _id(request))
    if recording is None:
        raise ApiError(404, "unknown_recording", "no recording at this URL")
    return web.json_response(recording.model_dump())


async def get_audio(request: web.Request) -> web.Response:
    recording_id = _id(request)
    data = await asyncio.to_thread(rec.mixed_wav, _root(request), recording_id)
    headers = {"Content-Disposition": f'attachment; filename="call-{recording_id[:8]}.wav"'}
    return web.Response(body=data, content_type="audio/wav", headers=headers)


async def get_frame(request: web.Request) -> web.StreamResponse:
    recording_id = _id(request)
    try:
        ms = int(request.match_info["ms"])
    except ValueError:
        raise ApiError(404, "unknown_frame", "no such frame") from None
    path = rec.frame_path(_root(request), recording_id, ms)
    if path is None:
        raise ApiError(404, "unknown_frame", "no such frame")
    return web.FileResponse(path, headers={"Content-Type": "image/jpeg"})


async def delete_recording(request: web.Request) -> web.Response:
    recording_id = _id(request)
    if recording_id in request.app[MANAGER_KEY].sessions:
        raise ApiError(409, "call_running", "the call is still running: hang up first")
    await asyncio.to_thread(rec.delete, _root(request), recording_id)
    return web.Response(status=204)


async def _prune_forever(app: web.Application) -> None:
    settings = app[CONFIG_KEY].recording
    while True:
        keep = set(app[MANAGER_KEY].sessions)
        try:
            await asyncio.to_thread(
                rec.prune,
                rec.recordings_dir(app[CONFIG_KEY]),
                settings.retention_days,
                int(settings.max_gb * 2**30),
                keep,
            )
        except OSError:
            log.exception("pruning the recordings failed")
        await asyncio.sleep(PRUNE_EVERY_S)


async def _pruning(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(_prune_forever(app), name="recordings-prune")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def add_recording_routes(app: web.Application, config: AppConfig) -> None:
    app[CONFIG_KEY] = config
    app.router.add_get("/api/recordings", list_recordings)
    app.router.add_get("/api/recordings/{recording_id}", get_recording)
    app.router.add_get("/api/recordings/{recording_id}/audio", get_audio)
    app.router.add_get("/api/recordings/{recording_id}/frames/{ms}", get_frame)
    app.router.add_delete("/api/recordings/{recording_id}", delete_recording)
    app.cleanup_ctx.append(_pruning)
