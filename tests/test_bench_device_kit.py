"""bench/device_kit.sh: the GPU runs' kit carries the runtime packages at the versions requirements.txt pins, and a
plan it does not know is refused before anything is installed (no device time spent on a typo)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KIT = ROOT / "bench" / "device_kit.sh"
# what the device's image lacks among the runtime's packages (it has torch, numpy, Pillow, tokenizers, safetensors,
# onnxruntime and PyYAML)
CARRIED = {"aiohttp", "aiortc", "av", "pydantic", "pyopenssl", "cryptography"}


def _name(spec: str) -> str:
    return re.split(r"[=<>\[ ]", spec, maxsplit=1)[0].lower().replace("_", "-")


def pins(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        spec = line.split("#", 1)[0].strip()
        if "==" in spec:
            out[_name(spec)] = spec.split("==", 1)[1].strip()
    return out


def kit_specs() -> dict[str, str]:
    script = KIT.read_text()
    wheels = re.search(r"^WHEELS=\((.*?)^\)", script, re.S | re.M)
    assert wheels is not None, "WHEELS=( ... ) not found"
    vad = re.search(r"^VAD_WHEEL=(\S+)", script, re.M)
    assert vad is not None, "VAD_WHEEL= not found"
    return pins("\n".join([*wheels.group(1).split(), vad.group(1)]))


def test_the_kit_carries_the_runtime_at_its_pinned_versions() -> None:
    required = pins((ROOT / "requirements.txt").read_text())
    kit = kit_specs()
    assert CARRIED | {"silero-vad"} <= set(kit), set(kit)
    stale = {
        name: (kit[name], version)
        for name, version in required.items()
        if name in kit and kit[name] != version
    }
    assert not stale, f"the kit's versions differ from requirements.txt (kit, pinned): {stale}"


def run_kit(*args: str, out: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OUT": str(out)}
    return subprocess.run(
        ["bash", str(KIT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def test_an_unknown_plan_is_refused_before_anything_is_installed(tmp_path: Path) -> None:
    done = run_kit("run", "omniab", "omni48", out=tmp_path)
    assert done.returncode == 2
    assert "unknown plan omni48" in done.stdout + done.stderr
    assert not (tmp_path / "runs.tgz").exists()
    assert "pip" not in (tmp_path / "log.txt").read_text()
    done = run_kit("run", out=tmp_path)
    assert done.returncode == 2 and "name a plan" in done.stdout + done.stderr


def test_without_a_command_it_prints_its_usage() -> None:
    done = subprocess.run(["bash", str(KIT)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "pack" in done.stdout and "run PLAN" in done.stdout
