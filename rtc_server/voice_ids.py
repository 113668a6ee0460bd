"""Voice ids and whether a voice exists: what signalling and the Realtime API check of a caller's `voice`,
without importing the upload API (`rtc_server/voices.py`, which answers with signalling's errors)."""

from __future__ import annotations

import re
from pathlib import Path

from aiohttp import web

VOICE_ID = re.compile(r"^[0-9a-f]{24}$")  # a voice is named by the hash of its content
DIR_KEY = web.AppKey("voices_dir", Path)  # the folder of the uploaded voices (`voices.dir`)


def voice_exists(app: web.Application, voice_id: str) -> bool:
    return bool(VOICE_ID.match(voice_id)) and (app[DIR_KEY] / f"{voice_id}.wav").is_file()
