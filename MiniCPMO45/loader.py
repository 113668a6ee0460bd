"""Checkpoint loading: official tensor names, single-file or sharded safetensors.

`read_checkpoint` returns the raw tensors by official name; `load_weights` copies them into a module tree whose
parameter names are the official ones under a prefix, and fails with one error that names every missing and
every unexpected tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be loaded as asked; the message says why."""


def checkpoint_files(model_dir: str | Path) -> dict[str, Path]:
    """Map each tensor name to the file that holds it."""
    model_dir = Path(model_dir)
    index = model_dir / SHARD_INDEX
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid shard index: {exc}") from exc
        files = {name: model_dir / fname for name, fname in weight_map.items()}
        missing = sorted({str(p) for p in files.values() if not p.is_file()})
        if missing:
            raise CheckpointError(f"shard files listed in {index.name} are missing: {', '.join(missing)}")
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    raise CheckpointError(f"no {SINGLE_FILE} or {SHARD_INDEX} in {model_dir}")


def read_checkpoint(
    model_dir: str | Path,
    prefixes: Iterable[str] | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Read tensors (optionally only those under `prefixes`) converted to `dtype` on `device`."""
    wanted = tuple(prefixes) if prefixes is not None else None
    by_file: dict[Path, list[str]] = {}
    for name, path in checkpoint_files(model_dir).items():
        if wanted is None or name.startswith(wanted):
            by_file.setdefault(path, []).append(name)
    out: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in names:
                t = f.get_tensor(name)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                out[name] = t
    return out


def load_weights(
    module: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    prefix: str = "",
    ignore: Iterable[str] = (),
) -> None:
    """Copy `tensors[prefix + name]` into every parameter and persistent buffer of `module`.

    Tensors under `prefix` that the module does not have, and module entries with no tensor, are both errors,
    except names that start with one of `ignore` (checkpoint entries the runtime does not use).
    """
    ignored = tuple(ignore)
    targets = dict(module.state_dict())
    provided = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing = sorted(prefix + k for k in targets if k not in provided)
    unexpected = sorted(prefix + k for k in provided if k not in targets and not k.startswith(ignored))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {', '.join(unexpected)}")
        raise CheckpointError("; ".join(parts))
    with torch.no_grad():
        for name, dest in targets.items():
            src = provided[name]
            if tuple(src.shape) != tuple(dest.shape):
                raise CheckpointError(
                    f"tensor {prefix + name} has shape {tuple(src.shape)}, expected {tuple(dest.shape)}"
                )
            dest.copy_(src.to(dtype=dest.dtype, device=dest.device))
