"""The vision fast path (equal-size slices: no mask, cached position ids / key codes, fused SDPA) and the
ragged path (padding + key mask) against a plain reference: dense float32 scores, an explicit [B, 1, 1, L]
mask, position ids and sin-cos codes built slice by slice on the host.

Checked on the tiny checkpoint and on random layers of the real widths (SigLIP 1152/16 heads/4304, resampler
1152 -> 4096 with 32 heads) at a depth of two, in float32, to 1e-5.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from MiniCPMO45.config import VisionConfig
from MiniCPMO45.model import MiniCPMO, group_by_size
from MiniCPMO45.modules.resampler import Resampler
from MiniCPMO45.modules.siglip import SiglipVisionTransformer, navit_position_ids, pack_slices
from tests.vision_reference import ref_position_ids, ref_resampler, ref_vision_embeds, ref_vpm

ATOL = 1e-5


# ---- helpers --------------------------------------------------------------------------------------------------
def _slices(sizes: list[tuple[int, int]], patch: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, patch, r * c * patch, generator=g) * 2 - 1 for r, c in sizes]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


class _RealWidth(torch.nn.Module):
    """SigLIP + resampler of the real widths, two layers, random weights (a MiniCPMO-shaped vision half)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.cfg = VisionConfig()
        self.vpm = SiglipVisionTransformer(self.cfg, 2)
        self.resampler = Resampler(64, 4096, self.cfg.hidden_size)
        with torch.no_grad():
            self.vpm.embeddings.position_embedding.weight.mul_(0.02)
            self.resampler.query.normal_(0.0, 0.02)
            self.resampler.attn.in_proj_weight.normal_(0.0, 4096**-0.5)
            self.resampler.proj.normal_(0.0, 4096**-0.5)
            for p in self.parameters():  # non-trivial norm gains and biases
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.1)
        self.eval()


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> MiniCPMO:
    return MiniCPMO.from_pretrained(tiny_model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def real_width() -> _RealWidth:
    return _RealWidth()


class _Removable:
    def __init__(self, undo: Callable[[], None]) -> None:
        self.remove = undo


def _record_masks(vpm: SiglipVisionTransformer) -> tuple[list[torch.Tensor | None], list[_Removable]]:
    """The attention mask each layer runs with (the encoder calls `vpm.layer_fn` once per layer)."""
    seen: list[torch.Tensor | None] = []
    inner = vpm.layer_fn

    def spy(x: torch.Tensor, mask: torch.Tensor | None, *rest: object) -> torch.Tensor:
        seen.append(mask)
        return inner(x, mask, *rest)

    vpm.layer_fn = spy

    def undo() -> None:
        vpm.layer_fn = inner

    return seen, [_Removable(undo)]


# ---- tests ----------------------------------------------------------------------------------------------------
def test_position_ids_match_reference() -> None:
    sizes = [(32, 32), (23, 45), (1, 1), (70, 70), (5, 17)]
    assert torch.equal(navit_position_ids(torch.tensor(sizes), 70, 4900), ref_position_ids(sizes, 70, 4900))


def test_group_by_size_keeps_first_seen_order() -> None:
    assert group_by_size([(2, 3), (4, 4), (2, 3), (1, 1)]) == {(2, 3): [0, 2], (4, 4): [1], (1, 1): [3]}


@torch.no_grad()
@pytest.mark.parametrize("sizes", [[(4, 4)] * 5, [(4, 4), (2, 6), (4, 4), (3, 3), (2, 6)]])
def test_tiny_vision_embeds_match_reference(tiny: MiniCPMO, sizes: list[tuple[int, int]]) -> None:
    patch = tiny.config.vision.patch_size
    slices = _slices(sizes, patch, seed=1)
    got = tiny.vision_embeds(slices, torch.tensor(sizes))
    want = ref_vision_embeds(tiny, slices, sizes)
    assert got.shape == want.shape
    assert _max_diff(got, want) <= ATOL


@torch.no_grad()
def test_tiny_vision_embeds_chunking_and_order(tiny: MiniCPMO, monkeypatch: pytest.MonkeyPatch) -> None:
    """More slices of a size than one chunk holds, interleaved with another size: rows come back in order."""
    monkeypatch.setattr(tiny.config, "vision_batch_size", 2)
    sizes = [(3, 5), (4, 4), (3, 5), (3, 5), (4, 4), (3, 5), (3, 5)]
    slices = _slices(sizes, tiny.config.vision.patch_size, seed=2)
    got = tiny.vision_embeds(slices, torch.tensor(sizes))
    for i, (s, size) in enumerate(zip(slices, sizes, strict=True)):
        assert _max_diff(got[i], ref_vision_embeds(tiny, [s], [size])[0]) <= ATOL


@torch.no_grad()
def test_equal_sizes_take_the_unmasked_path(tiny: MiniCPMO) -> None:
    assert tiny.vpm is not None
    seen, hooks = _record_masks(tiny.vpm)
    try:
        tiny.vision_embeds(
            _slices([(4, 4)] * 3, tiny.config.vision.patch_size, 3), torch.tensor([(4, 4)] * 3)
        )
    finally:
        for h in hooks:
            h.remove()
    assert seen and all(m is None for m in seen)


@torch.no_grad()
@pytest.mark.parametrize("sizes", [[(8, 8)] * 3, [(5, 11)] * 2])
def test_real_width_fast_path_matches_reference(real_width: _RealWidth, sizes: list[tuple[int, int]]) -> None:
    pixels = torch.stack(_slices(sizes, 14, seed=4))
    seen, hooks = _record_masks(real_width.vpm)
    try:
        patches = real_width.vpm(pixels, torch.tensor(sizes))
    finally:
        for h in hooks:
            h.remove()
    assert all(m is None for m in seen)
    want_patches = ref_vpm(real_width.vpm, pixels, sizes)
    assert _max_diff(patches, want_patches) <= ATOL
    got = real_width.resampler(patches, torch.tensor(sizes))
    want = ref_resampler(real_width.resampler, want_patches, sizes)
    assert got.shape == (len(sizes), 64, 4096)
    assert _max_diff(got, want) <= ATOL


@torch.no_grad()
def test_real_width_ragged_path_matches_reference(real_width: _RealWidth) -> None:
    sizes = [(8, 8), (5, 11), (7, 6), (8, 8)]
    pixels = pack_slices(_slices(sizes, 14, seed=5))
    seen, hooks = _record_masks(real_width.vpm)
    try:
        patches = real_width.vpm(pixels, torch.tensor(sizes))
    finally:
        for h in hooks:
            h.remove()
    assert all(m is not None and m.shape == (4, 1, 1, 64) for m in seen)
    want_patches = ref_vpm(real_width.vpm, pixels, sizes)
    for i, (r, c) in enumerate(sizes):  # padding rows are junk by contract
        assert _max_diff(patches[i, : r * c], want_patches[i, : r * c]) <= ATOL
    got = real_width.resampler(patches, sizes)
    want = ref_resampler(real_width.resampler, want_patches, sizes)
    assert _max_diff(got, want) <= ATOL
    # a slice alone (fast path) gives what it gives padded among others
    for i, (r, c) in enumerate(sizes):
        alone = real_width.vpm(pixels[i : i + 1, ..., : r * c * 14], [(r, c)])
        assert _max_diff(alone[0], patches[i, : r * c]) <= ATOL
        assert _max_diff(real_width.resampler(alone, [(r, c)])[0], got[i]) <= ATOL


def test_resampler_rejects_size_count_mismatch(real_width: _RealWidth) -> None:
    with pytest.raises(ValueError, match="tgt_sizes"):
        real_width.resampler(torch.zeros(2, 4, 1152), [(2, 2)])
