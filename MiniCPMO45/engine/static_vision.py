"""A duplex tick's camera frames through the vision tower (SigLIP + resampler) as CUDA graphs.

Eagerly, the tower is some 400 small kernel launches per call whatever the batch: at one omni session on an
H100 it took ~15 ms of the tick for ~8 ms of GPU work. Here the views of one patch grid run in padded buckets
of 1, 2 or 4 views, each a `StaticStep`: uint8 pixels in a fixed buffer, normalised, encoded and resampled
inside the graph. A larger group runs as several replays of the 4-view graph: from 8 views on the tower is
GPU-bound (16 views took 49 ms eagerly, ~3 ms a view, on an H200), so the replays cost about what one eager call
would, and they need no memory beyond the graphs' pool. An eager call of 16 views allocated some 2 GiB of
activations in the live tick, which is what ran 48 omni sessions out of memory on an H100; a graph of 16 views
would keep them for good. A (bucket, grid) seen `capture_after` times is captured (a camera sends one size for a
whole call); `warm_up` captures the usual cameras' grids before any call. Before a capture, and for float pixels,
the model's eager `vision_embeds` runs, in pieces of the same size. Padding views hold the previous call's
pixels (finite) and their outputs are dropped; the views of a grid are independent of each other in the tower.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from ..host_copy import copy_from_host, upload
from ..model import MiniCPMO, group_by_size
from ..processor.image import normalize_on_device
from .graphs import StaticStep, graphs_available, new_pool, pick_bucket

Norm = tuple[tuple[float, ...], tuple[float, ...]]


class StaticVision:
    def __init__(
        self,
        model: MiniCPMO,
        use_graphs: bool | None = None,
        capture_after: int = 2,
        max_graph_views: int = 4,
    ) -> None:
        if model.vpm is None or model.resampler is None:
            raise ValueError("the model has no vision encoder")
        self.model = model
        self.device = model.device
        self.use_graphs = graphs_available(self.device) if use_graphs is None else use_graphs
        self.capture_after = capture_after if self.use_graphs else 0
        top = min(max_graph_views, model.config.vision_batch_size)
        self.buckets = sorted({min(2**k, top) for k in range(top.bit_length() + 1)})
        self.chunk = top  # views per call: larger groups run in pieces (see the module's docstring)
        self.steps: dict[tuple[int, tuple[int, int], Norm], StaticStep] = {}
        self.seen: Counter[tuple[int, tuple[int, int], Norm]] = Counter()
        self.pool = new_pool(self.device) if self.use_graphs else None

    @torch.no_grad()
    def embeds(
        self,
        views: Sequence[torch.Tensor],
        tgt_sizes: np.ndarray,
        normalize: tuple[Sequence[float], Sequence[float]] | None,
    ) -> torch.Tensor:
        """`model.vision_embeds(views, tgt_sizes, normalize)`: `[N, query_num, D]` in the views' order."""
        if normalize is None or any(v.dtype != torch.uint8 for v in views):
            return self.model.vision_embeds(views, torch.as_tensor(tgt_sizes), normalize)
        norm: Norm = (tuple(normalize[0]), tuple(normalize[1]))
        sizes = [(int(r), int(c)) for r, c in np.asarray(tgt_sizes).reshape(-1, 2)]
        if len(sizes) != len(views):
            raise ValueError(f"{len(views)} views but {len(sizes)} tgt_sizes")
        out: torch.Tensor | None = None
        for size, members in group_by_size(sizes).items():
            for i in range(0, len(members), self.chunk):
                chunk = members[i : i + self.chunk]
                part = [views[j] for j in chunk]
                key = (pick_bucket(self.buckets, len(chunk)), size, norm)
                self.seen[key] += 1
                if key in self.steps or self.seen[key] > self.capture_after:
                    emb = self._run(key, part)
                else:
                    emb = self.model.vision_embeds(part, torch.tensor([size] * len(chunk)), normalize)
                if out is None:
                    out = emb.new_empty(len(views), *emb.shape[1:])
                out.index_copy_(0, upload(chunk, self.device), emb[: len(chunk)])
        if out is None:
            raise ValueError("no views")
        return out

    def warm_up(
        self, grids: Sequence[tuple[int, int]], normalize: tuple[Sequence[float], Sequence[float]]
    ) -> None:
        """Capture every bucket of these patch grids now (the usual cameras' grids, at start-up), so that no
        live tick captures them or runs their views eagerly."""
        norm: Norm = (tuple(normalize[0]), tuple(normalize[1]))
        assert self.model.vpm is not None
        patch = self.model.vpm.embeddings.patch_size
        for rows, cols in grids:
            shape = torch.Size((3, patch, rows * cols * patch))  # a view's uint8 patch rows
            for bucket in self.buckets:
                key = (bucket, (rows, cols), norm)
                if key not in self.steps:
                    self.steps[key] = self._build(key, shape)

    def _run(self, key: tuple[int, tuple[int, int], Norm], views: Sequence[torch.Tensor]) -> torch.Tensor:
        step = self.steps.get(key)
        if step is None:
            step = self._build(key, views[0].shape)
            self.steps[key] = step
        copy_from_host(step.inputs["pixels"][: len(views)], torch.stack(list(views)))
        return step.run()["embeds"]

    def _build(self, key: tuple[int, tuple[int, int], Norm], view_shape: torch.Size) -> StaticStep:
        bucket, size, (mean, std) = key
        model = self.model
        assert model.vpm is not None and model.resampler is not None
        vpm, resampler = model.vpm, model.resampler
        pixels = torch.zeros(bucket, *view_shape, dtype=torch.uint8, device=self.device)
        sizes = [size] * bucket

        def fn(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            staged = normalize_on_device(x["pixels"], list(mean), list(std)).to(model.dtype)
            return {"embeds": resampler(vpm(staged, sizes), sizes)}

        def idle(x: dict[str, torch.Tensor]) -> None:
            return None  # any finite pixels will do: the outputs of padding views are dropped

        return StaticStep(fn, {"pixels": pixels}, idle, self.use_graphs, self.pool)
