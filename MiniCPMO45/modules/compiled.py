"""A compiled function that gives way to its eager original when it cannot run."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)


def fallback_on_error(
    compiled: Callable[..., Any], eager: Callable[..., Any], what: str
) -> Callable[..., Any]:
    """`compiled` until a call of it raises (no Triton toolchain, a compile error); from then on `eager`, after
    logging why. Out-of-memory errors are the caller's, not a reason to fall back."""
    state = {"fn": compiled}

    def call(*args: Any, **kwargs: Any) -> Any:
        fn = state["fn"]
        if fn is eager:
            return eager(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception:
            log.exception("%s failed; running it eagerly from now on", what)
            state["fn"] = eager
            return eager(*args, **kwargs)

    return call
