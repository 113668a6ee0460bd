"""Small host values (index lists, token ids, staged inputs) to device tensors without making the host wait for
the device: a copy from pageable host memory makes CUDA drain the stream first; from pinned memory it is queued
like a kernel (PyTorch's pinned allocator keeps the buffer alive until the copy is done)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def upload(values: Sequence, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """`torch.tensor(values, dtype=dtype)` on `device`. To a GPU the copy goes through pinned memory and is
    queued asynchronously: a plain copy from pageable memory blocks the host until the device has run all the
    work queued before it, which would cost a host-device round trip per index tensor of a decode step."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype).to(device)
    if isinstance(values, np.ndarray):  # wrapped, not copied: its one copy is the one into pinned memory
        host = torch.from_numpy(np.ascontiguousarray(values)).to(dtype)
    else:
        host = torch.tensor(values, dtype=dtype)
    return host.pin_memory().to(device, non_blocking=True)


def copy_from_host(dst: torch.Tensor, src: torch.Tensor) -> None:
    """`dst.copy_(src)` for a host tensor `src`; to a GPU through pinned memory, queued without a wait. A `src`
    already on a device is copied there directly (queued like a kernel)."""
    if dst.device.type != "cuda" or src.device.type != "cpu":
        dst.copy_(src)
        return
    dst.copy_(src.pin_memory(), non_blocking=True)
