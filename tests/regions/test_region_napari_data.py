"""napari's own layer data (CSV reader output, real layers' data, features) converts like ours."""

import numpy as np
import pytest

from napari_medplib.regions import (
    RegionError,
    regions_from_layer_data,
    regions_from_points,
    regions_from_shapes,
)

napari_io = pytest.importorskip("napari_builtins.io")
napari_layers = pytest.importorskip("napari.layers")

SHAPES = [
    np.array([[2.0, 10.0, 20.0], [2.0, 10.0, 40.0], [2.0, 30.0, 40.0], [2.0, 30.0, 20.0]]),
    np.array([[2.0, 40.0, 5.0], [2.0, 45.0, 30.0], [2.0, 60.0, 8.0]]),
    np.array([[3.0, 1.0, 1.0], [3.0, 1.0, 9.0], [3.0, 9.0, 9.0], [3.0, 9.0, 1.0]]),
    np.array([[2.0, 50.0, 50.0], [2.0, 60.0, 62.0]]),
]
TYPES = ["rectangle", "polygon", "ellipse", "line"]
RECT = np.array([[10.0, 20.0], [10.0, 40.0], [30.0, 40.0], [30.0, 20.0]])


def _same(a, b):
    assert [r.kind for r in a] == [r.kind for r in b]
    assert [r.index for r in a] == [r.index for r in b]
    assert [(s.index, s.reason) for s in a.skipped] == [(s.index, s.reason) for s in b.skipped]
    for ra, rb in zip(a, b, strict=True):
        assert np.array_equal(ra.to_mask(), rb.to_mask())


def test_napari_shapes_csv_round_trip(tmp_path):
    path = napari_io.napari_write_shapes(
        str(tmp_path / "shapes.csv"), SHAPES, {"shape_type": TYPES}
    )
    layer_data = napari_io.csv_to_layer_data(path)
    assert layer_data[2] == "shapes"
    from_csv = regions_from_layer_data(layer_data, image_shape=(5, 64, 64), slice_indices=(2,))
    direct = regions_from_shapes(SHAPES, TYPES, image_shape=(5, 64, 64), slice_indices=(2,))
    assert len(from_csv) == 3 and from_csv.skipped[0].reason == "other_slice"
    _same(from_csv, direct)


def test_napari_points_csv_round_trip_keeps_polarity(tmp_path):
    data = np.array([[4.0, 5.0], [10.0, 12.0], [30.0, 40.0]])
    meta = {"properties": {"label": np.array(["positive", "negative", "positive"])}}
    path = napari_io.napari_write_points(str(tmp_path / "points.csv"), data, meta)
    layer_data = napari_io.csv_to_layer_data(path)
    assert layer_data[2] == "points"
    result = regions_from_layer_data(layer_data, image_shape=(64, 64))
    assert [r.positive for r in result] == [True, False, True]
    assert np.allclose(np.concatenate([r.points for r in result]), data)


def test_real_layer_data_features_and_transforms():
    points = napari_layers.Points(
        [[5, 5], [20, 20]],
        features={"label": ["negative", "positive"]},
        scale=(2, 2),
        name="prompts",
    )
    meta = {"features": points.features, "scale": points.scale, "name": points.name}
    result = regions_from_layer_data((points.data, meta, "points"), image_shape=(64, 64))
    assert [r.positive for r in result] == [False, True] and result[0].source == "prompts"
    assert np.allclose(result[1].points, [[40.0, 40.0]])
    shapes = napari_layers.Shapes(
        [s[:, 1:] for s in SHAPES],
        shape_type=TYPES,
        features={"class": ["a", "b", "c", "d"]},
        translate=(1, 1),
    )
    direct = regions_from_shapes(
        shapes.data,
        shapes.shape_type,
        shapes.features,
        image_shape=(64, 64),
        layer_transform={"translate": shapes.translate},
    )
    assert [r.label for r in direct] == ["a", "b", "c", "d"]
    assert direct[0].bbox == (11, 21, 31, 41)
    labels = napari_layers.Labels(np.pad(np.ones((4, 4), np.int32), 2))
    via = regions_from_layer_data((labels.data, {}, "labels"), image_shape=(8, 8))
    assert via[0].bbox == (2, 2, 5, 5)
    same = regions_from_points(
        points.data, points.features, image_shape=(64, 64), layer_transform={"scale": (2, 2)}
    )
    assert [r.positive for r in same] == [False, True]


@pytest.mark.parametrize(
    ("layer_data", "words"),
    [((np.zeros((2, 2)), {}, "image"), "'image'"), ((np.zeros((2, 2)),), "1-tuple")],
)
def test_layer_data_of_other_kinds_is_refused(layer_data, words):
    with pytest.raises(RegionError) as info:
        regions_from_layer_data(layer_data, image_shape=(8, 8))
    assert words in str(info.value)


def test_current_slice_from_a_viewer_model_dims_point():
    """The UI passes viewer.dims.point; with a 4-D layer around, only its trailing axes are ours."""
    components = pytest.importorskip("napari.components")
    viewer = components.ViewerModel()
    image = viewer.add_image(np.zeros((5, 64, 64)), scale=(2.0, 1.0, 1.0))
    viewer.add_image(np.zeros((3, 10, 64, 64)))  # a (T, Z, Y, X) layer makes the world 4-D
    shapes = [np.c_[np.full(4, float(z)), RECT] for z in (4.0, 6.0)]  # world z 4 and 6
    viewer.dims.set_point(1, 6.0)
    result = regions_from_shapes(
        shapes,
        "rectangle",
        image_shape=image.data.shape,
        image_transform={"scale": image.scale, "translate": image.translate},
        slice_point=viewer.dims.point,
    )
    assert len(viewer.dims.point) == 4
    assert [r.index for r in result] == [1]
    assert np.allclose(result[0].coords, [[10.0, 20.0], [30.0, 40.0]])
