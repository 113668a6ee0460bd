"""What fronts, the registry and node agents say to each other (pydantic, sent as JSON-ready dicts)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from cluster.placement import NodeLoad


class OfferIn(BaseModel):
    """A caller's offer, as a front passes it to the node that will carry the call."""

    sdp: str
    mode: str
    system_prompt: str | None = None
    voice: str | None = None
    options: dict[str, Any] | None = None
    client_address: str = "unknown"
    client_token: str | None = None


class Reply(BaseModel):
    """A node's answer to a request: ok with data, or the HTTP status, code and message of a refusal."""

    ok: bool = True
    status: int = 200
    code: str = ""
    message: str = ""
    session_id: str = ""
    sdp: str = ""
    info: dict[str, Any] | None = None
    retry_after: str | None = None


class NodeStatus(BaseModel):
    """A node agent's report: its load for placement, its workers, calls and health for the dashboard."""

    load: NodeLoad
    ray_node_id: str
    url: str  # the node's own server (pages, local debugging)
    call_count: int = 0  # live calls
    connecting: list[str] = Field(default_factory=list)  # ids of the calls answered but not yet connected
    calls: list[dict[str, Any]] | None = None  # SessionInfo of every live call (a detailed report only)
    workers: list[dict[str, Any]] = Field(default_factory=list)  # id, device, up, restarts, capacity
    shards_up: int = 0
    shards: int = 0
    frames_in: int = 0
    frames_out: int = 0
