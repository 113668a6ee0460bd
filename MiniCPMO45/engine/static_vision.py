"""A duplex tick's camera frames through the vision tower (SigLIP + resampler) as CUDA graphs.

Eagerly, the tower is some 400 small kernel launches per call whatever the batch: at one omni session on an
H100 it took ~15 ms of the tick for ~8 ms of GPU work. Here the views of one patch grid run in a padded bucket
of 1, 2 or 4 views as one `StaticStep`: uint8 pixels in a fixed buffer, normalised, encoded and resampled
inside the graph. From 8 views on the tower is GPU-bound (8 and 16 views took as long eagerly as replayed), and a
graph would keep that many views' activations in its pool for good (the capacity bench ran out of memory at 64
sessions when buckets up to 16 were captured), so larger groups run eagerly. A (bucket, grid) seen `capture_after` times is
captured (a camera sends one size for a whole call, so a call captures once, in its third tick); before that,
and for float pixels, the model's eager `vision_embeds` runs. Padding views hold the previous call's pixels
(finite) and their outputs are dropped; the views of a grid are independent of each other in the tower.
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
        self.chunk = model.config.vision_batch_size  # views per eager call, as `vision_embeds` groups them
        top = min(max_graph_views, self.chunk)
        self.buckets = sorted({min(2**k, top) for k in range(top.bit_length() + 1)})
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
                key = (
                    (pick_bucket(self.buckets, len(chunk)), size, norm)
                    if len(chunk) <= self.buckets[-1]
                    else None
                )
                if key is not None:
                    self.seen[key] += 1
                if key is not None and (key in self.steps or self.seen[key] > self.capture_after):
                    emb = self._run(key, part)
                else:
                    emb = self.model.vision_embeds(part, torch.tensor([size] * len(chunk)), normalize)
                if out is None:
                    out = emb.new_empty(len(views), *emb.shape[1:])
                out.index_copy_(0, upload(chunk, self.device), emb[: len(chunk)])
        if out is None:
            raise ValueError("no views")
        return out

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
