"""Mask outlines follow pixel edges: rasterising them with pixel-centre sampling gives the mask back."""

import numpy as np
import pytest

from napari_medplib.io.outlines import mask_to_polygons, rasterize_polygons


@pytest.mark.parametrize("seed", range(8))
def test_random_masks_round_trip(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((31, 27)) > 0.55  # many parts, holes, diagonal contacts
    polygons = mask_to_polygons(mask)
    np.testing.assert_array_equal(rasterize_polygons(polygons, mask.shape), mask)


def test_square_outline_vertices_are_pixel_corners():
    mask = np.zeros((6, 8), bool)
    mask[1:3, 2:5] = True  # rows 1-2, cols 2-4
    ((exterior, holes),) = mask_to_polygons(mask)
    assert holes == []
    # (x, y) pixel corners, collinear points dropped
    assert sorted(map(tuple, exterior)) == [(2, 1), (2, 3), (5, 1), (5, 3)]


def test_ring_has_a_hole_and_empty_mask_has_nothing():
    mask = np.ones((5, 5), bool)
    mask[2, 2] = False
    ((_exterior, holes),) = mask_to_polygons(mask)
    assert len(holes) == 1 and sorted(map(tuple, holes[0])) == [(2, 2), (2, 3), (3, 2), (3, 3)]
    assert mask_to_polygons(np.zeros((3, 3), bool)) == []
    with pytest.raises(ValueError, match="2-D"):
        mask_to_polygons(np.zeros((2, 2, 2), bool))
