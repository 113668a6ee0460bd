"""What a call needs from the server that owns it (`CallHost`), so that the call modules (`session.py`,
`remote_call.py`) do not import the manager that imports them (`rtc_server.manager.SessionManager` is the one
`CallHost`)."""

from __future__ import annotations

from typing import Any, Protocol

from inference.supervisor import WorkerSupervisor
from rtc_server.admission import Admission
from rtc_server.config import AppConfig
from rtc_server.stats import ServerStats


class CallHost(Protocol):
    config: AppConfig
    supervisor: WorkerSupervisor
    admission: Admission
    stats: ServerStats

    def known_modes(self) -> list[str]: ...

    def connected(self, session: Any) -> None:
        """The call's ICE and DTLS are up: it asks for a worker slot now."""

    def forget(self, session: Any, why: str = "", code: str = "session_ended") -> None:
        """The call ended: drop it from the tables and the admission."""
