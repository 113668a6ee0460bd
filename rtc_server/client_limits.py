"""Per-client limits on new calls: who a client is, and a sliding-window rate limit of offers."""

from __future__ import annotations

import hashlib
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


class TooManyRequests(Exception):
    """A client is over one of its limits; it may try again after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def retry_after(self) -> str:
        """The `Retry-After` header value: whole seconds, at least 1."""
        return str(max(1, math.ceil(self.retry_after_s)))


@dataclass(frozen=True)
class Client:
    """Who sent a request: its address, and a digest of its bearer token when tokens are in use."""

    address: str
    token: str | None = None

    def same_as(self, other: Client) -> bool:
        """Whether requests of the two count against the same limits: same address or same bearer token."""
        return self.address == other.address or (self.token is not None and self.token == other.token)


def client_of(remote: str | None, authorization: str | None) -> Client:
    token = None
    if authorization:
        token = hashlib.sha256(authorization.encode()).hexdigest()[:32]
    return Client(address=remote or "unknown", token=token)


@dataclass
class RateWindow:
    """At most `limit` events per key within the last `window_s` seconds."""

    limit: int
    window_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    max_keys: int = 4096  # past this many keys, those with no event left in the window are dropped
    _events: dict[str, deque[float]] = field(default_factory=dict)

    def acquire(self, key: str) -> float:
        """Record an event for `key` and return 0, or return the seconds until one is allowed (nothing recorded)."""
        now = self.clock()
        if len(self._events) > self.max_keys:
            self._forget_idle(now)
        events = self._events.setdefault(key, deque())
        while events and events[0] <= now - self.window_s:
            events.popleft()
        if len(events) >= self.limit:
            return events[0] + self.window_s - now
        events.append(now)
        return 0.0

    def _forget_idle(self, now: float) -> None:
        idle = [
            key for key, events in self._events.items() if not events or events[-1] <= now - self.window_s
        ]
        for key in idle:
            del self._events[key]
