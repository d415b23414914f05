"""napari layer objects -> image plane and regions (no viewer needed)."""

from types import SimpleNamespace

import numpy as np
import pytest
from napari.layers import Image, Labels, Points, Shapes

from napari_medplib.imaging import ImageInputError
from napari_medplib.io import read_geojson, shapes_to_geojson, write_geojson
from napari_medplib.ui.layers import (
    collect_regions,
    fit_to_question,
    image_plane,
    layer_regions,
    region_tags,
)


def _dims(point, ndisplay=2):
    n = len(point)
    return SimpleNamespace(point=tuple(point), ndisplay=ndisplay, displayed=(n - 2, n - 1))


def test_plane_of_nd_image_follows_dims_and_scale():
    layer = Image(np.zeros((4, 6, 30, 40), np.uint16), scale=(1, 2, 1, 1), translate=(0, 10, 0, 0))
    plane = image_plane(layer, _dims((3, 14, 0, 0)))  # world z 14 -> (14 - 10) / 2 = plane 2
    assert plane.index == (3, 2) and plane.plane_shape == (30, 40)
    assert plane.read().shape == (30, 40)
    assert plane.contrast_limits == tuple(float(v) for v in layer.contrast_limits)


def test_rgb_and_multiscale_read_full_resolution():
    rgb = Image(np.zeros((20, 30, 3), np.uint8), rgb=True)
    plane = image_plane(rgb, _dims((0, 0)))
    assert plane.rgb and plane.read().shape == (20, 30, 3) and plane.contrast_limits is None
    pyramid = [np.zeros((64, 64), np.uint8), np.zeros((32, 32), np.uint8)]
    assert image_plane(Image(pyramid, multiscale=True), _dims((0, 0))).plane_shape == (64, 64)


def test_bad_view_states_are_clear_errors():
    layer = Image(np.zeros((4, 30, 40)))
    with pytest.raises(ImageInputError, match="switch to 2-D"):
        image_plane(layer, _dims((0, 0, 0), ndisplay=3))
    transposed = SimpleNamespace(point=(0, 0, 0), ndisplay=2, displayed=(0, 2))
    with pytest.raises(ImageInputError, match="axis order"):
        image_plane(layer, transposed)
    with pytest.raises(ImageInputError, match="pick an image layer"):
        image_plane(Points(), _dims((0, 0)))


def test_shapes_with_world_transform_land_in_image_pixels():
    image = Image(np.zeros((50, 60)), scale=(2, 2), translate=(10, 0))
    plane = image_plane(image, _dims((0, 0)))
    # a box in world units on a layer with scale 1: world (20..40, 10..30) -> px (5..15, 5..15)
    shapes = Shapes([np.array([[20, 10], [40, 30]])], shape_type="rectangle")
    (region,) = layer_regions(shapes, plane).regions
    assert region.bbox == (5, 5, 15, 15)


def test_selection_limits_regions_and_points_keep_polarity():
    image = Image(np.zeros((50, 60)))
    plane = image_plane(image, None)
    shapes = Shapes(
        [np.array([[1, 1], [5, 5]]), np.array([[10, 10], [20, 20]])], shape_type="rectangle"
    )
    shapes.selected_data = {1}
    assert [r.index for r in layer_regions(shapes, plane).regions] == [1]
    assert len(layer_regions(shapes, plane, only_selected=False)) == 2
    points = Points([[3, 4], [30, 40]], features={"positive": [True, False]})
    regs = layer_regions(points, plane).regions
    assert [r.positive for r in regs] == [True, False]


def test_labels_layer_regions_and_colours():
    image = Image(np.zeros((20, 20)))
    lab = np.zeros((20, 20), np.int32)
    lab[2:5, 2:5] = 3
    labels = Labels(lab)
    found = collect_regions([labels], image_plane(image, None))
    assert [r.index for r in found.regions] == [3] and found.regions[0].area == 9
    assert found.colours[0].startswith("#")


def test_polygon_with_hole_from_geojson_is_one_region_minus_hole(tmp_path):
    outer = np.array([[0, 0], [0, 20], [20, 20], [20, 0]], float)
    hole = np.array([[5, 5], [5, 15], [15, 15], [15, 5]], float)
    path = tmp_path / "donut.geojson"
    doc = shapes_to_geojson(
        [outer, hole], {"shape_type": ["polygon", "polygon"], "features": {"hole_of": [-1, 0]}}
    )
    write_geojson(path, doc)
    ((data, meta, _kind),) = [ld for ld in read_geojson(path) if ld[2] == "shapes"]
    assert list(meta["features"]["hole_of"]) == [-1, 0]
    shapes = Shapes(data, shape_type=meta["shape_type"], features=meta["features"])
    plane = image_plane(Image(np.zeros((30, 30))), None)
    (region,) = layer_regions(shapes, plane).regions
    mask = region.to_mask((30, 30))
    assert mask[2, 2] and not mask[10, 10] and not mask[25, 25]
    assert region.area == 21 * 21 - 11 * 11  # outlines are inclusive: the hole takes its rim


def test_multipolygon_parts_are_one_region():
    parts = [
        np.array([[0, 0], [0, 4], [4, 4], [4, 0]], float),
        np.array([[10, 10], [10, 14], [14, 14], [14, 10]], float),
    ]
    shapes = Shapes(
        parts, shape_type="polygon", features={"feature_index": [0, 0], "hole_of": [-1, -1]}
    )
    plane = image_plane(Image(np.zeros((20, 20))), None)
    (region,) = layer_regions(shapes, plane).regions
    assert region.area == 2 * 25


def test_region_tags_and_fitting():
    assert region_tags("What is in <region>?") == 1
    assert region_tags("Compare <region1> and <region2>") == 2
    assert region_tags("Describe this image.") == 0
    image = Image(np.zeros((50, 60)))
    shapes = Shapes(
        [np.array([[1, 1], [5, 5]]), np.array([[10, 10], [20, 20]])],
        shape_type="rectangle",
        edge_color=["red", "blue"],
    )
    found = collect_regions([shapes], image_plane(image, None))
    kept, note = fit_to_question(found, "What is in <region>?")
    assert [r.index for r in kept.regions] == [1] and kept.colours == ("#0000ff",)
    assert "last drawn" in note
    same, note = fit_to_question(found, "Compare <region1> and <region2>")
    assert len(same) == 2 and note == ""


def test_negative_points_are_no_question_regions():
    plane = image_plane(Image(np.zeros((50, 60))), None)
    points = Points([[3, 4], [30, 40]], features={"positive": [True, False]})
    assert len(collect_regions([points], plane)) == 2
    kept = collect_regions([points], plane, positive_only=True)
    assert [r.index for r in kept.regions] == [0]


def test_large_multiscale_planes_use_a_coarser_level():
    pyramid = [np.zeros((64, 80), np.uint8), np.zeros((32, 40), np.uint8)]
    layer = Image(pyramid, multiscale=True, scale=(0.5, 0.5), translate=(1, 2))
    full = image_plane(layer, None)
    assert (full.level, full.plane_shape, full.scale) == (0, (64, 80), (0.5, 0.5))
    coarse = image_plane(layer, None, max_pixels=2000)
    assert (coarse.level, coarse.plane_shape, coarse.scale) == (1, (32, 40), (1.0, 1.0))
    # world (5..13.5, 6..14.5) -> level-1 pixels ((y - 1) / 1, (x - 2) / 1) = 4..12.5
    shapes = Shapes([np.array([[5.0, 6.0], [13.5, 14.5]])], shape_type="rectangle")
    (region,) = layer_regions(shapes, coarse).regions
    assert region.bbox == (4, 4, 12, 12)
    assert layer_regions(shapes, full).regions[0].bbox == (8, 8, 25, 25)  # level 0: twice as fine
