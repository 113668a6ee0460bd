"""Reference voices: `POST /api/voices` uploads a WAV (`?name=` names it), `GET /api/voices` lists the stored ones,
`GET /api/voices/{id}` returns one's audio (a preview), `PATCH` renames it and `DELETE` removes it.

An upload is validated (Content-Type, size, then the RIFF/WAVE header: sample format, channels, rate and
duration, before PyAV decodes anything, since a tiny file that says "1 Hz" decodes to gigabytes), converted to
16 kHz mono and stored as a PCM16 WAV named by the SHA-256 of that normalised file, which is the voice id:
the same recording uploaded twice gives the same id, and the worker caches the voice's prompt per id.
A session uses a voice with `"voice": "<id>"` in `POST /api/sessions` (or `?voice=` on `/whip`); the worker
reads the file from the same folder (`voices.dir`) and feeds it to the LLM (reference audio) and to the
vocoder's prompt front end. A call that names a voice the server no longer has goes on with the default voice
and an `unknown_voice` error event. A voice's name and upload time sit beside its audio in `<id>.json`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import secrets
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from MiniCPMO45.audio.rates import MODEL_INPUT_RATE
from MiniCPMO45.audio.resample import TooLong, to_mono_float
from MiniCPMO45.audio.wav import pcm16_wav, wav_header
from rtc_server.config import AppConfig
from rtc_server.signalling import ApiError, require_admin, validation_problems
from rtc_server.voice_ids import DIR_KEY, VOICE_ID, voice_exists

WAV_TYPES = {"audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave"}
CONFIG_KEY = web.AppKey("voices_config", AppConfig)
PCM, FLOAT, EXTENSIBLE = 1, 3, 0xFFFE
SAMPLE_BITS = {PCM: (8, 16, 24, 32), FLOAT: (32, 64)}
SUBFORMAT_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"  # KSDATAFORMAT_SUBTYPE_*
MIN_RATE, MAX_RATE, MAX_CHANNELS = 8000, 192000, 8


class VoiceError(ValueError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


NAME_CHARS = 80
VOICE_TOKEN_HEADER = "X-Voice-Token"


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def clean_name(name: str) -> str:
    """A voice name as stored: control characters dropped, whitespace folded, at most NAME_CHARS."""
    text = " ".join("".join(c for c in name if c.isprintable()).split())
    return text[:NAME_CHARS]


class VoiceInfo(BaseModel):
    """Body of `POST /api/voices` (201) and one entry of `GET /api/voices`."""

    model_config = ConfigDict(extra="forbid")
    voice_id: str
    duration_s: float
    sample_rate: int = MODEL_INPUT_RATE
    name: str = ""
    created_at: float | None = None  # Unix time of the first upload
    # Only in the answer to the upload that stored the voice: the capability to rename or delete it (send it as
    # X-Voice-Token); an admin may do so too.
    owner_token: str | None = None


class VoicePatch(BaseModel):
    """Body of `PATCH /api/voices/{id}`."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)


class VoiceList(BaseModel):
    model_config = ConfigDict(extra="forbid")
    voices: list[VoiceInfo]


@dataclass(frozen=True)
class WavFormat:
    """What a WAV header says (the extensible format's sub-format resolved into `format_tag`)."""

    format_tag: int
    channels: int
    rate: int
    block_align: int
    bits: int
    data_bytes: int  # as far as the upload holds them (a streaming writer's size may be 0xFFFFFFFF)


def read_wav_format(data: bytes) -> WavFormat:
    """Walk the RIFF chunks up to the data chunk; nothing is decoded."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise VoiceError(400, "not_wav", "the upload is not a WAV file (RIFF/WAVE header missing)")
    fmt: tuple[int, int, int, int, int] | None = None
    pos = 12
    while pos + 8 <= len(data):
        chunk_id, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        if chunk_id == b"fmt ":
            body = data[pos + 8 : pos + 8 + min(size, 40)]
            if len(body) < 16:
                raise VoiceError(400, "bad_audio", "the WAV fmt chunk is too short")
            tag, channels, rate, _, align, bits = struct.unpack_from("<HHIIHH", body)
            if tag == EXTENSIBLE:
                tag = int.from_bytes(body[24:26], "little") if body[26:40] == SUBFORMAT_TAIL else -1
            fmt = (tag, channels, rate, align, bits)
        elif chunk_id == b"data":
            if fmt is None:
                raise VoiceError(400, "bad_audio", "the WAV data chunk comes before its fmt chunk")
            return WavFormat(*fmt, data_bytes=min(size, len(data) - pos - 8))
        pos += 8 + size + (size & 1)  # chunks are padded to an even size
    missing = "fmt" if fmt is None else "data"
    raise VoiceError(400, "bad_audio", f"the WAV file has no {missing} chunk")


def check_wav_format(fmt: WavFormat, max_s: float) -> None:
    """Refuse what PyAV should not be asked to decode: odd formats, rates, layouts, or too much audio."""
    if fmt.bits not in SAMPLE_BITS.get(fmt.format_tag, ()):
        raise VoiceError(
            400,
            "unsupported_format",
            f"the WAV file holds format {fmt.format_tag} with {fmt.bits}-bit samples; "
            "PCM (8, 16, 24 or 32-bit) or float (32 or 64-bit) is needed",
        )
    if not 1 <= fmt.channels <= MAX_CHANNELS:
        raise VoiceError(
            400, "bad_channels", f"the WAV file has {fmt.channels} channels; 1 to {MAX_CHANNELS}"
        )
    if not MIN_RATE <= fmt.rate <= MAX_RATE:
        raise VoiceError(
            400,
            "bad_sample_rate",
            f"the sample rate is {fmt.rate} Hz; {MIN_RATE} to {MAX_RATE} Hz are accepted",
        )
    if fmt.block_align != fmt.channels * fmt.bits // 8:
        raise VoiceError(400, "bad_audio", f"the WAV block align {fmt.block_align} does not fit its format")
    if fmt.data_bytes < fmt.block_align:
        raise VoiceError(400, "bad_audio", "the WAV file holds no samples")
    duration = fmt.data_bytes // fmt.block_align / fmt.rate
    if duration > max_s:
        raise VoiceError(
            400, "too_long", f"the voice is {duration:.2f} s long; at most {max_s:g} s are accepted"
        )


def decode_wav(data: bytes, max_s: float) -> np.ndarray:
    """A WAV file's audio as 16 kHz mono float32 (PyAV decodes and resamples), at most about `max_s` long."""
    check_wav_format(read_wav_format(data), max_s)
    # the header was checked, but the decoder's output is bounded too; the exact duration check follows
    limit = int(max_s * MODEL_INPUT_RATE) + MODEL_INPUT_RATE
    try:
        with av.open(io.BytesIO(data), format="wav") as container:
            if not container.streams.audio:
                raise VoiceError(400, "bad_audio", "the WAV file has no audio stream")
            try:
                pcm = to_mono_float(container.decode(audio=0), MODEL_INPUT_RATE, limit)
            except TooLong:
                raise VoiceError(400, "too_long", f"the voice is longer than {max_s:g} s") from None
    except VoiceError:
        raise
    except (av.error.FFmpegError, ValueError) as exc:
        raise VoiceError(400, "bad_audio", f"cannot decode the WAV file: {exc}") from None
    if not pcm.size:
        raise VoiceError(400, "bad_audio", "the WAV file holds no samples")
    return pcm


def _meta_path(folder: Path, voice_id: str) -> Path:
    return folder / f"{voice_id}.json"


def read_meta(folder: Path, voice_id: str) -> dict[str, object]:
    try:
        meta = json.loads(_meta_path(folder, voice_id).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def write_meta(folder: Path, voice_id: str, meta: dict[str, object]) -> None:
    tmp = _meta_path(folder, voice_id).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta), encoding="utf-8")
    tmp.replace(_meta_path(folder, voice_id))


def voice_info(folder: Path, voice_id: str) -> VoiceInfo:
    _, _, frames = wav_header(folder / f"{voice_id}.wav")
    duration = round(frames / MODEL_INPUT_RATE, 3)
    meta = read_meta(folder, voice_id)
    name = meta.get("name")
    created = meta.get("created_at")
    return VoiceInfo(
        voice_id=voice_id,
        duration_s=duration,
        name=name if isinstance(name, str) else "",
        created_at=float(created) if isinstance(created, int | float) else None,
    )


def store_voice(folder: Path, data: bytes, min_s: float, max_s: float, name: str = "") -> VoiceInfo:
    """Validate, normalise and store one upload (blocking: run it off the event loop)."""
    pcm = decode_wav(data, max_s)
    duration = pcm.size / MODEL_INPUT_RATE
    if duration < min_s:
        raise VoiceError(
            400, "too_short", f"the voice is {duration:.2f} s long; at least {min_s:g} s are needed"
        )
    if duration > max_s:
        raise VoiceError(
            400, "too_long", f"the voice is {duration:.2f} s long; at most {max_s:g} s are accepted"
        )
    if not np.isfinite(pcm).all() or float(np.abs(pcm).max()) < 1e-4:
        raise VoiceError(400, "silent", "the voice recording is silent")
    normalised = pcm16_wav(pcm, MODEL_INPUT_RATE)
    voice_id = hashlib.sha256(normalised).hexdigest()[:24]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{voice_id}.wav"
    if not path.is_file():
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(normalised)
        tmp.replace(path)
    meta = read_meta(folder, voice_id)
    token = None
    if "owner" not in meta:  # the first upload of this recording owns it
        token = secrets.token_urlsafe(18)
        meta["owner"] = _token_hash(token)
        meta["created_at"] = round(time.time(), 3)
        meta["name"] = clean_name(name) or time.strftime("Voice %Y-%m-%d %H:%M")
    write_meta(folder, voice_id, meta)
    return voice_info(folder, voice_id).model_copy(update={"owner_token": token})


async def _read_limited(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise VoiceError(413, "too_large", f"the upload is larger than {limit} bytes")
    data = bytearray()
    async for chunk in request.content.iter_chunked(1 << 16):
        data += chunk
        if len(data) > limit:
            raise VoiceError(413, "too_large", f"the upload is larger than {limit} bytes")
    return bytes(data)


async def _form_file(request: web.Request, limit: int) -> bytes:
    reader = await request.multipart()
    async for part in reader:
        if not isinstance(part, BodyPartReader) or part.name != "file":
            continue
        part_type = part.headers.get("Content-Type", "application/octet-stream").split(";")[0].strip()
        if part_type not in WAV_TYPES | {"application/octet-stream"}:
            raise VoiceError(415, "unsupported_media_type", f"the file part is {part_type}, not audio/wav")
        data = bytearray()
        while chunk := await part.read_chunk(1 << 16):
            data += chunk
            if len(data) > limit:
                raise VoiceError(413, "too_large", f"the upload is larger than {limit} bytes")
        return bytes(data)
    raise VoiceError(400, "bad_request", "the form has no `file` part")


async def _upload_bytes(request: web.Request, limit: int) -> bytes:
    """The WAV bytes of a raw `audio/wav` body or of the `file` part of a multipart form."""
    ctype = request.content_type
    if ctype in WAV_TYPES:
        return await _read_limited(request, limit)
    if ctype == "multipart/form-data":
        if request.content_length is not None and request.content_length > limit + 4096:
            raise VoiceError(413, "too_large", f"the upload is larger than {limit} bytes")
        try:
            return await _form_file(request, limit)
        except VoiceError:
            raise
        # aiohttp's multipart reader meets a missing or wrong boundary or broken part headers with these
        except (ValueError, AssertionError, RuntimeError, TypeError, LookupError, HttpProcessingError) as exc:
            message = str(exc).replace("\n", " ")[:200]
            raise VoiceError(400, "bad_request", f"the multipart form is malformed: {message}") from None
    raise VoiceError(
        415, "unsupported_media_type", f"expected audio/wav or multipart/form-data, got {ctype or 'nothing'}"
    )


async def upload_voice(request: web.Request) -> web.Response:

    config = request.app[CONFIG_KEY].voices
    try:
        data = await _upload_bytes(request, config.max_bytes)
        name = request.query.get("name", "")
        if len(name) > 200:
            raise VoiceError(400, "bad_request", "the name is longer than 200 characters")
        info = await asyncio.to_thread(
            store_voice, request.app[DIR_KEY], data, config.min_duration_s, config.max_duration_s, name
        )
    except VoiceError as exc:
        raise ApiError(exc.status, exc.code, str(exc)) from None
    return web.json_response(
        info.model_dump(), status=201, headers={"Location": f"/api/voices/{info.voice_id}"}
    )


async def list_voices(request: web.Request) -> web.Response:
    folder = request.app[DIR_KEY]
    ids = [p.stem for p in folder.glob("*.wav") if VOICE_ID.match(p.stem)] if folder.is_dir() else []
    voices = await asyncio.to_thread(lambda: [voice_info(folder, i) for i in ids])
    voices.sort(key=lambda v: (v.created_at or 0.0, v.voice_id), reverse=True)  # the newest first
    return web.json_response(VoiceList(voices=voices).model_dump())


def _voice_id(request: web.Request) -> str:

    voice_id = request.match_info["voice_id"]
    if not voice_exists(request.app, voice_id):
        raise ApiError(404, "unknown_voice", "no voice at this URL")
    return voice_id


async def get_voice_audio(request: web.Request) -> web.StreamResponse:
    """The voice as stored (16 kHz mono PCM16 WAV): a preview for the voice library."""
    voice_id = _voice_id(request)
    return web.FileResponse(
        request.app[DIR_KEY] / f"{voice_id}.wav",
        headers={"Content-Type": "audio/wav", "Cache-Control": "private, max-age=3600"},
    )


def _require_owner(request: web.Request, voice_id: str) -> None:
    """Renaming or deleting a voice takes its owner token (X-Voice-Token), or the admin's rights."""

    token = request.headers.get(VOICE_TOKEN_HEADER, "")
    owner = read_meta(request.app[DIR_KEY], voice_id).get("owner")
    if token and isinstance(owner, str) and hmac.compare_digest(_token_hash(token), owner):
        return
    try:
        require_admin(request)
    except ApiError:
        raise ApiError(
            403,
            "not_voice_owner",
            f"only the uploader of this voice ({VOICE_TOKEN_HEADER}) or an admin may change it",
        ) from None


async def rename_voice(request: web.Request) -> web.Response:

    voice_id = _voice_id(request)
    _require_owner(request, voice_id)
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "expected Content-Type application/json")
    try:
        patch = VoicePatch.model_validate_json(await _read_limited(request, 4096))
    except VoiceError as exc:
        raise ApiError(exc.status, exc.code, str(exc)) from None
    except ValidationError as exc:
        raise ApiError(400, "bad_request", validation_problems(exc)) from None
    name = clean_name(patch.name)
    if not name:
        raise ApiError(400, "bad_request", "name: the name has no printable characters")
    folder = request.app[DIR_KEY]
    meta = read_meta(folder, voice_id)
    meta["name"] = name
    await asyncio.to_thread(write_meta, folder, voice_id, meta)
    return web.json_response(voice_info(folder, voice_id).model_dump())


async def delete_voice(request: web.Request) -> web.Response:
    """Remove a voice. Calls that use it keep it (the worker holds its prompt); new calls that ask for it get
    the default voice and an `unknown_voice` event."""
    voice_id = _voice_id(request)
    _require_owner(request, voice_id)
    folder = request.app[DIR_KEY]
    for path in (folder / f"{voice_id}.wav", _meta_path(folder, voice_id)):
        path.unlink(missing_ok=True)
    return web.Response(status=204)


def add_voice_routes(app: web.Application, config: AppConfig, folder: Path) -> None:
    app[CONFIG_KEY] = config
    app[DIR_KEY] = folder
    app.router.add_post("/api/voices", upload_voice)
    app.router.add_get("/api/voices", list_voices)
    app.router.add_get("/api/voices/{voice_id}", get_voice_audio)
    app.router.add_patch("/api/voices/{voice_id}", rename_voice)
    app.router.add_delete("/api/voices/{voice_id}", delete_voice)
