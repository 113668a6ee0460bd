"""System-prompt presets for each mode, in English and Chinese: `GET /api/presets[?mode=<mode>]`.

The texts are our own. The model answers in the language of its system prompt, so each preset exists in both
languages. The JSON shape is what the settings page reads (`public/js/presets.js`): `{"presets": [{id, mode,
lang, name: {en, zh}, system_prompt, voice}]}`; `voice` (optional) names a voice id of the library.
"""

from __future__ import annotations

from typing import Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict

Lang = Literal["en", "zh"]


class Preset(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    mode: str
    lang: Lang
    name: dict[str, str]
    system_prompt: str
    voice: str | None = None  # a voice id of this server's library the preset speaks in (the page selects it)


class PresetList(BaseModel):
    model_config = ConfigDict(extra="forbid")
    presets: list[Preset]


def _p(pid: str, mode: str, lang: Lang, en: str, zh: str, prompt: str) -> Preset:
    return Preset(id=pid, mode=mode, lang=lang, name={"en": en, "zh": zh}, system_prompt=prompt)


PRESETS: tuple[Preset, ...] = (
    _p(
        "chat_assistant_en",
        "chat",
        "en",
        "Voice assistant (English)",
        "语音助手（英文）",
        "You are a friendly voice assistant. Reply in spoken English, in two or three short sentences, and get "
        "to the point. If a question is unclear, ask one short question back.",
    ),
    _p(
        "chat_assistant_zh",
        "chat",
        "zh",
        "Voice assistant (Chinese)",
        "语音助手（中文）",
        "你是一位亲切的语音助手。请用口语化的中文回答，每次两三句话，直接说重点。问题不清楚时，简短地反问一句。",
    ),
    _p(
        "audio_duplex_call_en",
        "audio_duplex",
        "en",
        "Phone call (English)",
        "电话聊天（英文）",
        "You are on a live phone call and can listen while you talk. Keep your turns short and natural, react "
        "to what the caller just said, and stop talking when they cut in.",
    ),
    _p(
        "audio_duplex_call_zh",
        "audio_duplex",
        "zh",
        "Phone call (Chinese)",
        "电话聊天（中文）",
        "你正在和对方实时通话，可以一边说一边听。每次发言简短自然，回应对方刚说的话；对方插话时就停下来听。",
    ),
    _p(
        "omni_duplex_camera_en",
        "omni_duplex",
        "en",
        "Video call (English)",
        "视频通话（英文）",
        "You are on a video call and see the caller's camera once per second. Talk naturally, mention what you "
        "see only when it helps, and answer questions about what is in view.",
    ),
    _p(
        "omni_duplex_camera_zh",
        "omni_duplex",
        "zh",
        "Video call (Chinese)",
        "视频通话（中文）",
        "你正在进行视频通话，每秒能看到一次对方的摄像头画面。自然地聊天，只在有帮助时提到你看到的内容，并回答关于画面的问题。",
    ),
)


def presets_for(mode: str | None = None) -> list[Preset]:
    return [p for p in PRESETS if mode is None or p.mode == mode]


async def get_presets(request: web.Request) -> web.Response:
    mode = request.query.get("mode") or None
    return web.json_response(PresetList(presets=presets_for(mode)).model_dump())


def add_preset_routes(app: web.Application) -> None:
    app.router.add_get("/api/presets", get_presets)
