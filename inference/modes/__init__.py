"""Registry of worker modes by name. Engine modes register themselves here without touching the server."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

from inference.modes.base import WorkerMode
from inference.settings import WorkerSettings

ModeFactory = Callable[[WorkerSettings], WorkerMode]
EXTRA_MODES_ENV = "MINICPMO45_EXTRA_MODES"  # comma-separated modules that register more modes (worker side)

_REGISTRY: dict[str, ModeFactory] = {}


def register_mode(name: str, factory: ModeFactory) -> None:
    """`factory(settings)` builds one mode instance per session from the worker's settings."""
    if name in _REGISTRY:
        raise ValueError(f"mode {name!r} is already registered")
    _REGISTRY[name] = factory


def mode_names() -> list[str]:
    return list(_REGISTRY)


def create_mode(name: str, settings: WorkerSettings) -> WorkerMode:
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown mode {name!r}; known: {', '.join(_REGISTRY)}") from None
    return factory(settings)


def _loopback(settings: WorkerSettings) -> WorkerMode:
    from inference.modes.loopback import LoopbackMode

    return LoopbackMode(settings.loopback)


register_mode("loopback", _loopback)


def _chat(settings: WorkerSettings) -> WorkerMode:
    from inference.modes.chat import ChatMode  # lazy: torch is imported only when a model mode is used

    return ChatMode(settings)


def _duplex(name: str) -> ModeFactory:
    def factory(settings: WorkerSettings) -> WorkerMode:
        from inference.modes.duplex import DuplexMode

        return DuplexMode(name, settings)

    return factory


register_mode("chat", _chat)
register_mode("audio_duplex", _duplex("audio_duplex"))
register_mode("omni_duplex", _duplex("omni_duplex"))


def load_extra_modes() -> None:
    """Import the modules named in $MINICPMO45_EXTRA_MODES; each registers its modes on import."""
    for name in filter(None, (part.strip() for part in os.environ.get(EXTRA_MODES_ENV, "").split(","))):
        importlib.import_module(name)
