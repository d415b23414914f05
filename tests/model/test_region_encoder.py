"""Region tokens: reference sampling geometry, empty regions, the >512-cell random subset."""

from __future__ import annotations

import warnings

import pytest
import torch

from napari_medplib.model.config import MedPLIBConfig
from napari_medplib.model.region_encoder import EmptyRegionWarning, RegionEncoder


@pytest.fixture()
def encoder() -> RegionEncoder:
    torch.manual_seed(0)
    cfg = MedPLIBConfig(hidden_size=8, num_attention_heads=2, mm_hidden_size=4, max_sample_point=512)
    enc = RegionEncoder(cfg)
    with torch.no_grad():  # identity-like adapter: the output row = the patch feature
        enc.adapter.weight.zero_()
        enc.adapter.weight[:4, :4] = torch.eye(4)
        enc.adapter.bias.zero_()
    return enc


def _features() -> torch.Tensor:
    """Patch (r, c) has features (r, c, 1, r*c): bilinear sampling is easy to predict."""
    rows, cols = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    return torch.stack([rows, cols, torch.ones_like(rows), rows * cols], dim=-1).reshape(576, 4)


def test_cell_is_sampled_up_left_as_in_the_reference(encoder):
    mask = torch.zeros(1, 24, 24, dtype=torch.uint8)
    mask[0, 10, 23] = 1
    tokens, empty = encoder(_features(), mask)
    assert not empty.any()
    # grid_sample(align_corners=True) at 2*(i/24)-1 reads grid coordinate i*23/24.
    torch.testing.assert_close(tokens[0, :3], torch.tensor([10 * 23 / 24, 23 * 23 / 24, 1.0]))
    assert tokens.shape == (1, 8)


def test_mean_over_cells_and_several_regions(encoder):
    masks = torch.zeros(2, 24, 24, dtype=torch.uint8)
    masks[0, 0, 0] = masks[0, 0, 12] = 1
    masks[1, 12:14, 0] = 1
    tokens, empty = encoder(_features(), masks)
    torch.testing.assert_close(tokens[0, :2], torch.tensor([0.0, 6 * 23 / 24]))
    torch.testing.assert_close(tokens[1, :2], torch.tensor([12.5 * 23 / 24, 0.0]))
    assert empty.tolist() == [False, False]


def test_empty_region_warns_and_is_flagged(encoder):
    masks = torch.zeros(2, 24, 24, dtype=torch.uint8)
    masks[1, 5, 5] = 1
    with pytest.warns(EmptyRegionWarning, match="region 1 covers no cell"):
        tokens, empty = encoder(_features(), masks)
    assert empty.tolist() == [True, False]
    assert (tokens[0] == 0).all()
    encoder.on_empty = "error"
    with pytest.raises(ValueError, match="covers no cell"):
        encoder(_features(), masks)
    encoder.on_empty = "zero"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder(_features(), masks)


def test_large_regions_use_a_seeded_subset(encoder):
    mask = torch.ones(1, 24, 24, dtype=torch.uint8)  # 576 cells > 512
    a, _ = encoder(_features(), mask, torch.Generator().manual_seed(42))
    b, _ = encoder(_features(), mask, torch.Generator().manual_seed(42))
    c, _ = encoder(_features(), mask, torch.Generator().manual_seed(43))
    assert torch.equal(a, b) and not torch.equal(a, c)
    encoder.max_sample_point = 1000
    full, _ = encoder(_features(), mask)
    torch.testing.assert_close(full[0, :2], torch.tensor([11.5 * 23 / 24, 11.5 * 23 / 24]))


def test_bad_grid_shape(encoder):
    with pytest.raises(ValueError, match="cell grids"):
        encoder(_features(), torch.ones(1, 16, 16))
