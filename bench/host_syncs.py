"""Count the places where the host waits for the GPU (benchmarks: `capacity.py --count-syncs`).

PyTorch's sync debug mode warns at every synchronizing CUDA call: a read of a device value (`tolist`,
`item`), a copy from pageable host memory, `nonzero`. `SyncSites.watching()` turns it on, takes those warnings
and counts them by the innermost line of this repository's code that led to them (the engine's own line,
not torch's), so a wait that slipped into the hot path shows up with its file and line.
"""

from __future__ import annotations

import contextlib
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import torch

REPO = Path(__file__).resolve().parent.parent
SYNC_WARNING = "synchronizing CUDA operation"


def repo_site(stack: list[traceback.FrameSummary], root: Path = REPO) -> str:
    """`path:line` of the innermost frame of `stack` in `root`'s own code (not an installed package, not this
    module), or "elsewhere"."""
    for frame in reversed(stack):
        path = Path(frame.filename)
        if not path.is_relative_to(root) or path == Path(__file__).resolve():
            continue
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        return f"{path.relative_to(root)}:{frame.lineno}"
    return "elsewhere"


class SyncSites:
    """Synchronizing CUDA calls counted by call site, over any number of `watching()` blocks."""

    def __init__(self, root: Path = REPO) -> None:
        self.root = root
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @contextlib.contextmanager
    def watching(self, cuda: bool = True) -> Iterator[None]:
        """Count the syncs of the block (`cuda=False`: only warnings raised by other means, for tests)."""
        previous = warnings.showwarning

        def show(
            message: Warning | str,
            category: type[Warning],
            filename: str,
            lineno: int,
            file: TextIO | None = None,
            line: str | None = None,
        ) -> None:
            if SYNC_WARNING in str(message):
                self.counts[repo_site(traceback.extract_stack(), self.root)] += 1
            else:
                previous(message, category, filename, lineno, file, line)

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")

    def per(self, n: int, top: int = 16) -> dict[str, float]:
        """The most frequent sites, each as syncs per one of `n` (ticks)."""
        return {site: count / n for site, count in self.counts.most_common(top)} if n else {}
