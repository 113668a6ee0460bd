"""Host-to-device copies of small index lists without a stream sync.

A copy from pageable host memory makes CUDA wait for the stream to drain first; from pinned memory it is
queued like a kernel (PyTorch's pinned allocator keeps the buffer alive until the copy is done).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def device_tensor(values: Sequence[object], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.tensor(values, dtype) on `device`; on CUDA via pinned memory and a non-blocking copy."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)
