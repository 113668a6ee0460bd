"""Cluster mode's start-up without a cluster: the single-host server never imports Ray, and Ray absent or out
of reach is a clear error (exit status 2) within seconds."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _run(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter that sees no Ray cluster of this host (`auto` looks for one in Ray's
    temporary folder: an empty one here)."""
    with tempfile.TemporaryDirectory(prefix="no-ray-") as lonely:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
            "RAY_TMPDIR": lonely,
            "TMPDIR": lonely,
        }
        return subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def test_single_host_server_never_imports_ray() -> None:
    done = _run(
        "import sys, contextlib, io, run, rtc_server.app\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    run.main(['--help'])\n"
        "print('ray' in sys.modules)"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_ray_absent_or_unreachable_is_a_clear_start_up_error() -> None:
    absent = _run("import sys, run\nsys.modules['ray'] = None\nsys.exit(run.main(['--cluster', 'auto']))")
    assert absent.returncode == 2, absent.stderr
    assert "needs Ray, which is not installed: pip install -r requirements-cluster.txt" in absent.stderr
    for address in ("127.0.0.1:1", "ray://127.0.0.1:1"):
        started = time.monotonic()
        unreachable = _run(f"import sys, run\nsys.exit(run.main(['--cluster', {address!r}]))")
        assert unreachable.returncode == 2, unreachable.stderr
        assert f"cannot reach the Ray cluster at {address!r}" in unreachable.stderr
        assert time.monotonic() - started < 30
    none_running = _run("import sys, run\nsys.exit(run.main(['--cluster', 'auto', '--node']))")
    assert none_running.returncode == 2, none_running.stderr
    assert "cannot reach the Ray cluster at 'auto'" in none_running.stderr
