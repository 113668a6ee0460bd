"""`StaticVision`: a tick's uint8 frames through the vision tower in padded view buckets (CUDA graphs on a GPU,
the same padded step eagerly here), against the model's eager `vision_embeds` on the same views."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from MiniCPMO45.engine.static_vision import StaticVision
from MiniCPMO45.model import MiniCPMO

MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> MiniCPMO:
    return MiniCPMO.from_pretrained(tiny_model_dir, dtype=torch.float32)


def _views(sizes: list[tuple[int, int]], patch: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 256, (3, patch, r * c * patch), generator=g, dtype=torch.uint8) for r, c in sizes
    ]


def test_padded_buckets_match_the_eager_tower(tiny: MiniCPMO) -> None:
    patch = tiny.vpm.embeddings.patch_size
    vision = StaticVision(tiny, use_graphs=False)
    assert vision.buckets == [1, 2, 4]
    # two grids, interleaved: 3 views of 2x4 (a bucket of 4, one padding view) and 2 of 4x4
    sizes = [(2, 4), (4, 4), (2, 4), (4, 4), (2, 4)]
    for seed in (0, 1):  # the second call's padding view holds the first call's pixels
        views = _views(sizes, patch, seed)
        got = vision.embeds(views, np.array(sizes), (MEAN, STD))
        want = tiny.vision_embeds(views, torch.tensor(sizes), (MEAN, STD))
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    norm = (tuple(MEAN), tuple(STD))
    assert sorted(vision.steps) == [(2, (4, 4), norm), (4, (2, 4), norm)]
    assert vision.seen[(4, (2, 4), norm)] == 2


def test_groups_past_the_largest_bucket_run_in_pieces_of_it(tiny: MiniCPMO) -> None:
    """Five views of one grid run as a piece of 4 and a piece of 1, never as one eager call of all five (on
    an H100 an eager call of 16 views allocated ~2 GiB of activations in a live tick)."""
    patch = tiny.vpm.embeddings.patch_size
    vision = StaticVision(tiny, use_graphs=False)
    sizes = [(4, 4)] * 5 + [(2, 4)]
    views = _views(sizes, patch, 4)
    got = vision.embeds(views, np.array(sizes), (MEAN, STD))
    torch.testing.assert_close(
        got, tiny.vision_embeds(views, torch.tensor(sizes), (MEAN, STD)), atol=1e-5, rtol=1e-5
    )
    assert sorted(key[:2] for key in vision.steps) == [(1, (2, 4)), (1, (4, 4)), (4, (4, 4))]


def test_warm_up_builds_every_bucket_so_live_frames_skip_the_eager_tower(
    tiny: MiniCPMO, monkeypatch: pytest.MonkeyPatch
) -> None:
    patch = tiny.vpm.embeddings.patch_size
    vision = StaticVision(tiny, use_graphs=False, capture_after=2)
    vision.capture_after = 2  # as on a GPU: a grid not warmed up runs eagerly until seen twice
    vision.warm_up([(4, 4)], (MEAN, STD))
    norm = (tuple(MEAN), tuple(STD))
    assert sorted(vision.steps) == [(1, (4, 4), norm), (2, (4, 4), norm), (4, (4, 4), norm)]
    eager_calls: list[int] = []
    eager = tiny.vision_embeds

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        eager_calls.append(len(args[0]))  # type: ignore[arg-type]
        return eager(*args, **kwargs)  # type: ignore[arg-type]

    sizes = [(4, 4)] * 6
    views = _views(sizes, patch, 5)
    monkeypatch.setattr(tiny, "vision_embeds", counted)
    got = vision.embeds(views, np.array(sizes), (MEAN, STD))
    assert eager_calls == []  # 4 + 2 views, both from the warmed-up steps
    vision.embeds(_views([(2, 4)], patch, 6), np.array([(2, 4)]), (MEAN, STD))
    assert eager_calls == [1]  # a grid not warmed up: eager until it is captured
    monkeypatch.undo()
    torch.testing.assert_close(
        got, tiny.vision_embeds(views, torch.tensor(sizes), (MEAN, STD)), atol=1e-5, rtol=1e-5
    )


def test_float_views_take_the_eager_path(tiny: MiniCPMO) -> None:
    patch = tiny.vpm.embeddings.patch_size
    vision = StaticVision(tiny, use_graphs=False)
    views = [v.float() / 255 for v in _views([(4, 4)], patch, 2)]
    got = vision.embeds(views, np.array([(4, 4)]), None)
    torch.testing.assert_close(got, tiny.vision_embeds(views, torch.tensor([(4, 4)])))
    assert not vision.steps


def test_mismatched_sizes_are_refused(tiny: MiniCPMO) -> None:
    patch = tiny.vpm.embeddings.patch_size
    vision = StaticVision(tiny, use_graphs=False)
    with pytest.raises(ValueError, match="2 views but 1 tgt_sizes"):
        vision.embeds(_views([(4, 4), (4, 4)], patch, 3), np.array([(4, 4)]), (MEAN, STD))
