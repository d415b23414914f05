"""napari's own Shapes/Points CSV files are read by napari's builtins, not by us; their layer data
is plain napari data that our GeoJSON writer accepts like any other layer."""

import numpy as np
from napari_builtins.io import csv_to_layer_data, napari_write_points, napari_write_shapes

from napari_medplib.io import read_geojson
from napari_medplib.io.napari_io import write_points_geojson, write_shapes_geojson

SHAPES = [
    np.array([[1.0, 2.0], [1.0, 9.0], [6.0, 9.0], [6.0, 2.0]]),
    np.array([[10.5, 10.0], [20.0, 15.25], [12.0, 30.0]]),
    np.array([[0.0, 0.0], [3.0, 4.0], [8.0, 1.0]]),
]
TYPES = ["rectangle", "polygon", "path"]


def test_builtin_shapes_csv_is_plain_layer_data(tmp_path):
    csv = tmp_path / "shapes.csv"
    napari_write_shapes(str(csv), SHAPES, {"shape_type": TYPES})
    data, meta, kind = csv_to_layer_data(str(csv))
    assert kind == "shapes"
    assert meta["shape_type"] == TYPES
    assert all(isinstance(d, np.ndarray) and d.shape[1] == 2 for d in data)
    for read, original in zip(data, SHAPES, strict=True):
        np.testing.assert_array_equal(read, original)
    # ... and it converts to GeoJSON and back unchanged
    out = tmp_path / "shapes.geojson"
    write_shapes_geojson(str(out), data, meta)
    ((again, again_meta, _),) = read_geojson(out)
    assert again_meta["shape_type"] == TYPES
    for read, original in zip(again, SHAPES, strict=True):
        np.testing.assert_array_equal(read, original)


def test_builtin_points_csv_with_properties(tmp_path):
    points = np.array([[5.0, 6.0], [7.5, 8.25]])
    csv = tmp_path / "points.csv"
    napari_write_points(str(csv), points, {"properties": {"label": np.array([1, 0])}})
    data, meta, kind = csv_to_layer_data(str(csv))
    assert kind == "points"
    np.testing.assert_array_equal(data, points)
    assert list(meta["properties"]["label"]) == [1, 0]
    out = tmp_path / "points.geojson"
    write_points_geojson(str(out), data, meta)
    ((again, again_meta, _),) = read_geojson(out)
    np.testing.assert_array_equal(again, points)
    assert again_meta["features"]["label"] == [1, 0]
