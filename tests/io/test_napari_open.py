"""Open each format through a real napari viewer with our plugin (runs under Xvfb)."""

import numpy as np
import pytest
from io_testdata import REAL

pytestmark = pytest.mark.viewer


def test_open_qupath_geojson(make_napari_viewer):
    viewer = make_napari_viewer()
    layers = viewer.open(str(REAL / "qupath_all_shapes.geojson"), plugin="napari-medplib")
    assert [type(layer).__name__ for layer in layers] == ["Shapes", "Points"]
    shapes, points = layers
    assert shapes.name == "qupath_all_shapes"
    assert shapes.shape_type == ["rectangle", "polygon", "polygon", "line", "path"]
    assert list(shapes.features["objectType"]) == ["annotation"] * 5
    np.testing.assert_allclose(points.data[-1], [1421.65, 925.53])


def test_open_imagej_roi_and_roiset(make_napari_viewer):
    viewer = make_napari_viewer()
    (points,) = viewer.open(str(REAL / "readroi_multipoint.roi"), plugin="napari-medplib")
    assert type(points).__name__ == "Points" and len(points.data) == 14
    (shapes,) = viewer.open(str(REAL / "bactunet_RoiSet_subset.zip"), plugin="napari-medplib")
    assert type(shapes).__name__ == "Shapes" and shapes.ndim == 3 and shapes.nshapes == 12
    assert list(shapes.features["position"][:2]) == [209, 210]


def test_open_coco_json(make_napari_viewer):
    viewer = make_napari_viewer()
    layers = viewer.open(str(REAL / "datumaro_person_keypoints_val.json"), plugin="napari-medplib")
    assert [layer.name for layer in layers] == [
        "datumaro_person_keypoints_val boxes",
        "datumaro_person_keypoints_val segmentation",
        "datumaro_person_keypoints_val keypoints",
    ]
    assert list(layers[0].features["class"]) == ["a", "b"]
    assert list(layers[2].features["visibility"]) == [2] * 6


def test_save_shapes_with_our_writer_and_reopen(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    layer = viewer.add_shapes(
        [
            np.array([[1.0, 2.0], [1.0, 8.0], [5.0, 8.0], [5.0, 2.0]]),
            np.array([[10.0, 10.0], [20.0, 12.0], [15.0, 30.0]]),
        ],
        shape_type=["rectangle", "polygon"],
        features={"class": ["Tumor", "Stroma"]},
        name="regions",
    )
    path = tmp_path / "regions.geojson"
    written = layer.save(str(path), plugin="napari-medplib")
    assert written == [str(path)]
    (reopened,) = viewer.open(str(path), plugin="napari-medplib")
    assert reopened.shape_type == ["rectangle", "polygon"]
    assert list(reopened.features["class"]) == ["Tumor", "Stroma"]
    for a, b in zip(reopened.data, layer.data, strict=True):
        np.testing.assert_array_equal(a, b)
