"""The sync counter of the capacity benchmark: it attributes each sync warning to this repository's innermost
line and leaves other warnings alone. (Real CUDA syncs need a GPU; here the warning is raised by hand, with the
text PyTorch's sync debug mode uses.)"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from bench.capacity import main
from bench.host_syncs import REPO, SyncSites, repo_site


def _waits_for_the_device() -> int:
    warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
    return _line_of_warn


_line_of_warn = _waits_for_the_device.__code__.co_firstlineno + 1


def test_sync_warnings_are_counted_by_repo_line() -> None:
    sites = SyncSites()
    with sites.watching(cuda=False):
        for _ in range(3):
            line = _waits_for_the_device()
    with sites.watching(cuda=False):
        _waits_for_the_device()
    here = Path(__file__).resolve().relative_to(REPO)
    assert sites.counts == {f"{here}:{line}": 4}
    assert sites.total == 4
    assert sites.per(2) == {f"{here}:{line}": 2.0}


def test_other_warnings_pass_through() -> None:
    sites = SyncSites()
    with pytest.warns(DeprecationWarning, match="something else"):
        with sites.watching(cuda=False):
            warnings.warn("something else", DeprecationWarning, stacklevel=1)
    assert sites.total == 0


def test_a_site_outside_the_repo_is_elsewhere(tmp_path: Path) -> None:
    import traceback

    stack = traceback.extract_stack()
    assert repo_site(stack, root=tmp_path) == "elsewhere"


def test_count_syncs_needs_cuda(tiny_model_dir: Path, tmp_path: Path) -> None:
    argv = ["--tiny", "--config", str(tiny_model_dir / "config.json"), "--tokenizer", str(tiny_model_dir)]
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        main(argv + ["--out", str(tmp_path), "--count-syncs"])
