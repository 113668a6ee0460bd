"""Shared test fixtures: where the parity fixtures live, and the decompressed tiny checkpoint."""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def fixtures_root() -> Path:
    """`../shared/fixtures` beside the repo, or $MINICPMO45_FIXTURES. Missing is an error, not a skip."""
    root = Path(os.environ.get("MINICPMO45_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))
    if not root.is_dir():
        raise FileNotFoundError(f"parity fixtures not found at {root} (set MINICPMO45_FIXTURES)")
    return root


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare_tiny_model(cache: Path) -> Path:
    """Copy the tiny fixture model into `cache` with its weights decompressed and checked."""
    src = fixtures_root() / "minicpmo45-tiny" / "model"
    dest = cache / "minicpmo45-tiny"
    weights = dest / "model.safetensors"
    index = json.loads((src / "weights_index.json").read_text())
    expected_sha = index.get("sha256_uncompressed")
    if weights.is_file() and (expected_sha is None or _sha256(weights) == expected_sha):
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".xz":
            shutil.copy2(f, dest / f.name)
    tmp = weights.with_suffix(".tmp")
    with lzma.open(src / "model.safetensors.xz") as zin, tmp.open("wb") as zout:
        shutil.copyfileobj(zin, zout)
    if expected_sha is not None and _sha256(tmp) != expected_sha:
        raise RuntimeError("decompressed tiny weights do not match the sha256 in weights_index.json")
    tmp.rename(weights)
    return dest


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return fixtures_root()


@pytest.fixture(scope="session")
def tiny_fixture_dir() -> Path:
    return fixtures_root() / "minicpmo45-tiny"


@pytest.fixture(scope="session")
def token2wav_fixture_dir() -> Path:
    return fixtures_root() / "token2wav-tiny"


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny official-format checkpoint, decompressed once into .cache/ in the repo."""
    return prepare_tiny_model(REPO_ROOT / ".cache" / "fixtures")
