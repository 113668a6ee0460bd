"""Server configuration: `config.toml` validated by pydantic, with CLI overrides on top.

Precedence is CLI > file > the defaults below. Unknown keys are an error that names the key, so a typo in
`config.toml` never silently falls back to a default. The sections the worker uses as they are (`[model]`,
`[loopback]`) and the supervisor's and tick's keys of `[workers]` are defined in `inference/settings.py`, once.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from inference.settings import (
    LoopbackSettings,
    ModelSettings,
    StrictModel,
    SupervisorSettings,
    TickSettings,
)


class ServerSettings(StrictModel):
    host: str = "0.0.0.0"
    port: int = Field(8006, ge=0, le=65535)
    http: bool = False  # plain HTTP instead of HTTPS (tests, or behind a TLS proxy)
    certs_dir: str = "certs"
    public_dir: str = "public"
    max_body_bytes: int = Field(1 << 20, ge=1024)  # signalling bodies are SDP (a few kB); larger is a 413
    # origins (e.g. "https://app.example.org") besides the server's own that browsers may call the API from
    # (CORS, and writes with an Origin header); "*" allows any origin
    allowed_origins: list[str] = Field(default_factory=list)


class AuthSettings(StrictModel):
    api_token: str = ""  # when set, /api, /whip and /metrics need `Authorization: Bearer <token>`
    admin_token: str = ""  # when set, /api/admin/* also needs the header `X-Admin-Token: <token>`


class SessionSettings(StrictModel):
    pause_timeout_s: float = Field(60.0, gt=0)  # a paused call without `resume` ends after this long
    # a larger data-channel message from the caller is dropped with a `message_too_large` error
    max_message_bytes: int = Field(65536, ge=1024, le=262144)


class VoiceSettings(StrictModel):
    dir: str = (
        "data/voices"  # uploaded voices (16 kHz mono WAV, named by content hash); relative: to the repo
    )
    max_bytes: int = Field(10 << 20, ge=1024)  # largest upload
    min_duration_s: float = Field(1.0, gt=0)
    max_duration_s: float = Field(30.0, gt=0)


class RecordingSettings(StrictModel):
    # each call's audio (both sides), transcript, metrics and camera snapshots (rtc_server/recordings.py)
    enabled: bool = True
    dir: str = "data/recordings"  # relative: to the repo
    retention_days: float = Field(30.0, gt=0)  # older recordings are deleted
    max_gb: float = Field(5.0, gt=0)  # past this, the oldest recordings are deleted


class WorkersConfig(SupervisorSettings, TickSettings):
    """The `[workers]` section: the supervisor's settings, the worker's tick, and the media processes."""

    # media processes that own the calls' peer connections (rtc_server/shards.py); 0: the front process
    # itself (the CPU default); -1: automatic (none without GPUs, else one per 16 calls the GPUs hold, at
    # most the cores left after the workers and the front)
    media_procs: int = Field(-1, ge=-1)
    # a caller's unit waits at most this long for the others of its tick: half a second at most in a server's
    # config (the worker's own settings allow more, for tests that gather every session's unit)
    tick_gather_ms: float = Field(60.0, ge=0, le=500)


class QueueSettings(StrictModel):
    max_length: int = Field(16, ge=0)  # callers waiting for a slot; one more is a 503
    default_session_s: float = Field(120.0, gt=0)  # ETA baseline until real session lengths are known
    update_interval_s: float = Field(2.0, gt=0)  # how often a waiting caller gets a `queue` event


class RtcSettings(StrictModel):
    # ICE consent freshness (RFC 7675): a peer that stops answering for interval x failures is gone.
    # aioice's own defaults are 5 s x 6; tests use a shorter timeout to see a vanished client quickly.
    consent_interval_s: float = Field(5.0, gt=0)
    consent_failures: int = Field(6, ge=1)
    # from answer to ICE+DTLS connected; until then a call is pending and holds no slot or queue place
    connect_timeout_s: float = Field(10.0, gt=0)
    # pending calls per client address (and per bearer token when `auth.api_token` is set); more: 429
    max_pending_per_client: int = Field(4, ge=1)
    offers_per_minute: int = Field(
        30, ge=1
    )  # offers (POST /api/sessions, /whip) per client address; more: 429
    ice_servers: list[str] = Field(
        default_factory=list
    )  # e.g. ["stun:stun.example.org:3478"]; none by default
    # the address callers reach this host at behind a 1:1 NAT (a cluster node's public IP): each answer also
    # offers it, with the ports of the host's own candidates (rtc_server/ice_address.py); empty: not needed
    public_address: str = ""
    # libopus's compression level (0-10) for the speech the callers hear: 5 costs ~25 % less CPU per frame than
    # libopus's default 10 for ~0.9 dB less waveform SNR (docs/PERFORMANCE.md, bench/opus_levels.py); 10 for
    # the best quality, lower to save a media shard's CPU
    opus_compression_level: int = Field(5, ge=0, le=10)
    # the duration of each Opus packet the callers receive (ms): longer packets cost a media shard less CPU per
    # call (fewer RTP packets, SRTP operations, UDP sends and wake-ups) but add up to one packet of delay before
    # speech starts and lose more audio per lost packet (docs/PERFORMANCE.md, "Twelfth session")
    outbound_packet_ms: Literal[20, 40, 60] = 40  # = media_tracks.speech_track.DEFAULT_PACKET_MS
    # decode the callers' Opus on the event loop (~20-40 µs a frame) instead of in aiortc's decoder thread per
    # call, which hands every decoded frame back to the loop (media_tracks/inline_decode.py)
    inline_audio_decode: bool = True


class ClusterSettings(StrictModel):
    # cluster mode (cluster/, docs/CLUSTER.md): "auto" (the Ray cluster this host has joined with `ray start`),
    # HOST:PORT of its head, or ray://HOST:PORT (Ray Client); empty: the single-host server, without Ray
    address: str = ""
    namespace: str = "minicpmo-rtc"  # the Ray namespace of the registry and node agents
    node_name: str = ""  # `run.py --node`: this node's name; empty: the host name
    node_http_host: str = "127.0.0.1"  # where a node's own server listens (pages, local debugging)
    poll_interval_s: float = Field(0.5, gt=0)  # how often the registry asks each node for its status
    node_timeout_s: float = Field(5.0, gt=0)  # a node silent this long counts as down


class AppConfig(StrictModel):
    server: ServerSettings = Field(default_factory=ServerSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    rtc: RtcSettings = Field(default_factory=RtcSettings)
    loopback: LoopbackSettings = Field(default_factory=LoopbackSettings)
    session: SessionSettings = Field(default_factory=SessionSettings)
    voices: VoiceSettings = Field(default_factory=VoiceSettings)
    recording: RecordingSettings = Field(default_factory=RecordingSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names every offending key."""


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_config(file_values: dict[str, Any], overrides: dict[str, Any] | None = None) -> AppConfig:
    """Validate `file_values` with `overrides` (nested dicts, e.g. from the CLI) applied on top."""
    try:
        return AppConfig.model_validate(_merge(file_values, overrides or {}))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown key '{key}'")
            else:
                problems.append(f"'{key}': {err['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> AppConfig:
    """Read a TOML file (None or a missing default file means defaults only) and apply `overrides`."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            values = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return build_config(values, overrides)
