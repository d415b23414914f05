"""Region constructors and rasterisation: exact pixels on small images, pixel-centre convention."""

import numpy as np
import pytest
from skimage.draw import polygon2mask

from napari_medplib.regions import PATH_RADIUS, POINT_SPAN, Region, RegionError


def _grid(shape):
    return np.indices(shape)


def test_box_is_inclusive_and_corner_order_free():
    expected = np.zeros((6, 7), bool)
    expected[1:4, 2:5] = True  # rows 1..3, cols 2..4 inclusive
    assert np.array_equal(Region.box(1, 2, 3, 4).to_mask((6, 7)), expected)
    assert np.array_equal(Region.box(3, 4, 1, 2).to_mask((6, 7)), expected)
    assert Region.box(1, 2, 3, 4).bbox == (1, 2, 3, 4)  # unbound: the unclipped box


def test_box_with_fractional_corners_keeps_pixels_whose_centres_are_inside():
    rows, cols = _grid((8, 8))
    y0, x0, y1, x1 = 0.5, 1.2, 4.5, 3.0
    expected = (rows >= y0) & (rows <= y1) & (cols >= x0) & (cols <= x1)
    mask = Region.box(y0, x0, y1, x1).to_mask((8, 8))
    assert np.array_equal(mask, expected)
    assert Region.box(y0, x0, y1, x1, image_shape=(8, 8)).bbox == (1, 2, 4, 3)


def test_box_equals_the_polygon_of_its_corners():
    corners = [(1.5, 2.25), (1.5, 9.0), (7.0, 9.0), (7.0, 2.25)]
    box = Region.box(1.5, 2.25, 7.0, 9.0).to_mask((10, 12))
    assert np.array_equal(Region.polygon(corners).to_mask((10, 12)), box)


def test_polygon_orientation_does_not_matter_and_follows_centre_rule():
    tri = [(0, 0), (0, 4), (4, 0)]
    rows, cols = _grid((6, 6))
    expected = (rows >= 0) & (cols >= 0) & (rows + cols <= 4)  # closed triangle
    assert np.array_equal(Region.polygon(tri).to_mask((6, 6)), expected)
    assert np.array_equal(Region.polygon(tri[::-1]).to_mask((6, 6)), expected)


def _distance_to_outline(points, v):
    a, b = v, np.roll(v, -1, axis=0)
    d = b - a
    t = np.clip(((points[:, None] - a) * d).sum(-1) / (d * d).sum(-1), 0, 1)
    return np.linalg.norm(points[:, None] - (a + t[..., None] * d), axis=-1).min(axis=1)


@pytest.mark.parametrize("seed", range(4))
def test_polygon_fill_matches_skimage_polygon2mask_on_random_star_polygons(seed):
    """Same pixels as skimage (napari's rasteriser) except centres on the outline (rounding)."""
    rng = np.random.default_rng(seed)
    for _ in range(50):
        n = rng.integers(3, 20)
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        rad = rng.uniform(1, 12, n)
        v = rng.uniform(0, 30, 2) + np.stack([rad * np.sin(ang), rad * np.cos(ang)], 1)
        if seed % 2:
            v = np.round(v * 2) / 2  # vertices and edges through pixel centres
        ours, ref = Region.polygon(v).to_mask((31, 33)), polygon2mask((31, 33), v)
        differ = np.argwhere(ours != ref).astype(float)
        assert differ.shape[0] <= 2
        if differ.size:
            assert _distance_to_outline(differ, v).max() < 1e-6
            assert ours[tuple(differ.astype(int).T)].all()  # the outline counts as inside


def test_point_is_the_reference_41_square_clipped_at_borders():
    rows, cols = _grid((100, 100))
    mask = Region.point(50, 60).to_mask((100, 100))
    assert np.array_equal(mask, (abs(rows - 50) <= 20) & (abs(cols - 60) <= 20))
    assert mask.sum() == (2 * POINT_SPAN + 1) ** 2 == 41 * 41
    corner = Region.point(3, 97, image_shape=(100, 100))
    assert corner.bbox == (0, 77, 23, 99)
    assert corner.area == 24 * 23
    assert np.array_equal(corner.to_mask(), (rows <= 23) & (cols >= 77))


def test_point_rounds_to_the_pixel_that_contains_it_and_has_prompt_fields():
    p = Region.point(10.5, 7.49, positive=False, span=2)
    assert p.to_mask((20, 20)).nonzero()[0].min() == 11 - 2  # 10.5 -> pixel 11 (half up)
    assert p.to_mask((20, 20)).nonzero()[1].max() == 7 + 2
    assert np.array_equal(p.points, [[10.5, 7.49]])
    assert p.point_labels.tolist() == [0]
    assert Region.point(1, 1).point_labels.tolist() == [1]
    assert Region.box(0, 0, 1, 1).points is None and Region.box(0, 0, 1, 1).point_labels is None


def test_path_is_a_widened_polyline():
    mask = Region.path([(5, 2), (5, 12)]).to_mask((11, 15))
    expected = np.zeros((11, 15), bool)
    expected[5 - PATH_RADIUS : 5 + PATH_RADIUS + 1, 2 - PATH_RADIUS : 12 + PATH_RADIUS + 1] = True
    assert np.array_equal(mask, expected)
    diag = Region.path([(0, 0), (6, 6)]).to_mask((9, 9))
    assert all(diag[i, i] for i in range(7)) and not diag[8, 0]
    dot = Region.path([(4, 4)]).to_mask((9, 9))
    assert dot.sum() == (2 * PATH_RADIUS + 1) ** 2


def test_path_partly_outside_is_clipped_not_lost():
    mask = Region.path([(2, -1000.0), (2, 1000.0)]).to_mask((5, 6))
    assert mask[1:4].all() and not mask[0].any() and not mask[4].any()


def test_mask_round_trip_crop_and_offset():
    rng = np.random.default_rng(0)
    full = np.zeros((20, 30), bool)
    full[5:9, 10:22] = rng.random((4, 12)) > 0.5
    full[5, 10] = full[8, 21] = True
    region = Region.mask(full)
    assert region.image_shape == (20, 30)
    assert np.array_equal(region.to_mask(), full)
    assert region.bbox == (5, 10, 8, 21)
    crop, (r0, c0) = region.crop()
    assert (r0, c0) == (5, 10) and np.array_equal(crop, full[5:9, 10:22])
    moved = Region.mask(full[5:9, 10:22], offset=(1, 2))
    assert moved.bbox == (1, 2, 4, 13)
    assert np.array_equal(moved.to_mask((20, 30))[1:5, 2:14], full[5:9, 10:22])


def test_clipping_to_image_shape():
    region = Region.box(-5, -5, 2, 40, image_shape=(10, 10))
    assert region.bbox == (0, 0, 2, 9)
    assert region.to_mask().sum() == 3 * 10
    assert Region.box(20, 20, 30, 30, image_shape=(10, 10)).bbox is None
    assert Region.box(20, 20, 30, 30, image_shape=(10, 10)).area == 0


def test_empty_mask_and_crop_are_cheap_for_far_away_geometry():
    far = Region.polygon([(1e7, 1e7), (1e7, 2e7), (2e7, 1e7)], image_shape=(64, 64))
    crop, _ = far.crop()
    assert crop.size == 0 and far.bbox is None
    assert not far.to_mask().any()


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: Region.polygon([(0, 0), (1, 1)]), "at least 3"),
        (lambda: Region.polygon([(0, 0, 0), (1, 1, 1), (2, 2, 2)]), "(N, 2)"),
        (lambda: Region.polygon([(0, 0), (1, np.nan), (2, 2)]), "finite"),
        (lambda: Region.point("a", 1), "numbers"),
        (lambda: Region.mask(np.zeros((2, 2, 2))), "2-D"),
        (lambda: Region.box(0, 0, 1, 1).to_mask(), "to_mask(shape="),
        (lambda: Region.point(1, 1, span=-1), "span"),
    ],
)
def test_bad_input_gives_region_error_naming_the_problem(make, words):
    with pytest.raises(RegionError, match=None) as info:
        make()
    assert words in str(info.value)
    assert isinstance(info.value, ValueError)


def test_regions_are_immutable_and_describe_themselves():
    region = Region.polygon([(0, 0), (0, 4), (4, 0)], label="tumour", source="Shapes", index=3)
    with pytest.raises(AttributeError):
        region.kind = "box"
    with pytest.raises(ValueError):
        region.coords[0, 0] = 5
    assert region.describe() == "polygon 3 'tumour' of 'Shapes'"
    assert "negative" in Region.point(1, 1, positive=False).describe()
    bound = region.with_image_shape((2, 5))
    rows, cols = _grid((2, 5))
    assert bound.image_shape == (2, 5) and region.image_shape is None
    assert bound.area == int((rows + cols <= 4).sum())
