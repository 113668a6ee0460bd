"""Installs `@openai/agents-realtime` (pinned in tests/realtime_js/package.json) with npm into the git-ignored
`.cache/realtime-js` and bundles tests/realtime_js/entry.mjs with esbuild for the browser test. Nothing of it is
committed; `python -m tests.realtime_js_bundle` prepares it ahead (scripts/test.sh)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCE = REPO_ROOT / "tests" / "realtime_js"
WORK = REPO_ROOT / ".cache" / "realtime-js"
BUNDLE = WORK / "bundle.js"


def _installed(package: str) -> str | None:
    manifest = WORK / "node_modules" / package / "package.json"
    return json.loads(manifest.read_text())["version"] if manifest.is_file() else None


def build_bundle() -> Path:
    """The bundled test client (an IIFE that sets `window.realtimeTest`), built when missing or stale."""
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is missing (scripts/test.sh installs Debian's npm)")
    WORK.mkdir(parents=True, exist_ok=True)
    wanted = json.loads((SOURCE / "package.json").read_text())["dependencies"]
    if any(_installed(name) != version for name, version in wanted.items()):
        shutil.copy(SOURCE / "package.json", WORK / "package.json")
        shutil.copy(SOURCE / "package-lock.json", WORK / "package-lock.json")  # the versions tested here
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=WORK,
            check=True,
            timeout=600,
        )
    entry = SOURCE / "entry.mjs"
    if not BUNDLE.is_file() or BUNDLE.stat().st_mtime < entry.stat().st_mtime:
        shutil.copy(entry, WORK / "entry.mjs")
        subprocess.run(
            [
                str(WORK / "node_modules" / ".bin" / "esbuild"),
                "entry.mjs",
                "--bundle",
                "--format=iife",
                "--platform=browser",
                "--target=chrome120",
                f"--outfile={BUNDLE.name}",
                "--log-level=warning",
            ],
            cwd=WORK,
            check=True,
            timeout=300,
        )
    return BUNDLE


if __name__ == "__main__":
    print(build_bundle())
    sys.exit(0)
