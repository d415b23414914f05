"""GeoJSON writers: QuPath-shaped output and exact round trips through the reader."""

import json

import numpy as np
import pytest
from io_testdata import REAL, by_type

from napari_medplib.io import RegionFileError, read_geojson
from napari_medplib.io.geojson_write import labels_to_geojson, points_to_geojson, shapes_to_geojson
from napari_medplib.io.napari_io import (
    write_labels_geojson,
    write_points_geojson,
    write_shapes_geojson,
)
from napari_medplib.io.outlines import rasterize_polygons

SHAPES = [
    np.array([[1.5, 2.25], [1.5, 10.0], [8.0, 10.0], [8.0, 2.25]]),  # rectangle
    np.array([[20.0, 20.0], [20.0, 40.0], [45.5, 40.0], [45.5, 20.0]]),  # box-shaped polygon
    np.array([[25.0, 25.0], [25.0, 30.0], [30.0, 30.0]]),  # hole of shape 1
    np.array([[0.1, 0.2], [5.3, 5.7], [9.9, 1.1]]),  # path
    np.array([[3.0, 3.0], [4.0, 7.0]]),  # line
    np.array([[50.0, 50.0], [50.0, 70.0], [60.0, 70.0], [60.0, 50.0]]),  # ellipse (axis-aligned)
    np.array([[80.0, 90.0], [85.0, 95.0], [80.0, 100.0], [75.0, 95.0]]),  # rotated ellipse
    np.array([[100.0, 0.0], [101.0, 3.0], [104.0, 1.0]]),  # part 1 of a multipolygon
    np.array([[110.0, 0.0], [111.0, 3.0], [114.0, 1.0]]),  # part 2
]
TYPES = [
    "rectangle",
    "polygon",
    "polygon",
    "path",
    "line",
    "ellipse",
    "ellipse",
    "polygon",
    "polygon",
]
FEATURES = {
    "class": ["Tumor", "Stroma", "Stroma", "", "Nerve", "Tumor", "", "Immune", "Immune"],
    "score": [0.5, 1.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 6.0],
    "name": ["a", "b", "b", "c", "d", "e", "f", "g", "g"],
    "hole_of": [-1, -1, 1, -1, -1, -1, -1, -1, -1],
    "feature_index": [0, 1, 1, 2, 3, 4, 5, 6, 6],
}
RED, GREEN = [1.0, 0.0, 0.0, 0.25], [0.0, 0.8, 0.2, 0.25]
FACES = np.array([RED, GREEN, GREEN, RED, RED, RED, RED, GREEN, GREEN])


def shapes_meta():
    return {"shape_type": TYPES, "features": FEATURES, "face_color": FACES, "name": "regions"}


def test_shapes_output_is_qupath_shaped():
    doc = shapes_to_geojson(SHAPES, shapes_meta())
    assert doc["type"] == "FeatureCollection"
    features = doc["features"]
    assert len(features) == 7  # the hole joins its polygon, the two parts share a feature
    first = features[0]
    assert first["properties"]["objectType"] == "annotation"
    assert first["properties"]["classification"] == {"name": "Tumor", "color": [255, 0, 0]}
    ring = first["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and len(ring) == 5  # closed ring
    assert ring[0] == [2.25, 1.5]  # (x, y) = (col, row)
    assert [len(r) for r in features[1]["geometry"]["coordinates"]] == [5, 4]  # outer ring + hole
    assert features[2]["geometry"]["type"] == "LineString"
    assert "classification" not in features[2]["properties"]  # no class name: no classification
    ellipse = features[4]
    assert (
        ellipse["geometry"]["type"] == "Polygon"
        and len(ellipse["geometry"]["coordinates"][0]) == 65
    )
    assert ellipse["properties"]["napariEllipse"] == [
        [50.0, 50.0],
        [70.0, 50.0],
        [70.0, 60.0],
        [50.0, 60.0],
    ]
    assert features[6]["geometry"]["type"] == "MultiPolygon"
    json.dumps(doc, allow_nan=False)  # valid strict JSON


def test_ellipse_polygon_approximates_the_ellipse():
    doc = shapes_to_geojson([SHAPES[5]], {"shape_type": ["ellipse"]})
    xy = np.asarray(doc["features"][0]["geometry"]["coordinates"][0])
    # centre (x=60, y=55), semi-axes 10 (x) and 5 (y): every vertex lies on the ellipse
    np.testing.assert_allclose(((xy[:, 0] - 60) / 10) ** 2 + ((xy[:, 1] - 55) / 5) ** 2, 1.0)


def test_shapes_round_trip_is_exact(tmp_path):
    path = tmp_path / "regions.geojson"
    assert write_shapes_geojson(str(path), SHAPES, shapes_meta()) == [str(path)]
    ((data, meta, kind),) = read_geojson(path)
    assert kind == "shapes"
    assert meta["shape_type"] == TYPES
    assert len(data) == len(SHAPES)
    for read, original in zip(data, SHAPES, strict=True):
        np.testing.assert_array_equal(read, original)
    for column, values in FEATURES.items():
        assert meta["features"][column] == values, column
    np.testing.assert_allclose(meta["face_color"][FEATURES["hole_of"].index(-1), :3], RED[:3])
    np.testing.assert_allclose(meta["face_color"][1, :3], GREEN[:3], atol=1 / 255)


def test_round_trip_of_a_read_qupath_file(tmp_path):
    original = read_geojson(REAL / "qupath_all_shapes.geojson")
    by_kind = by_type(original)
    write_shapes_geojson(str(tmp_path / "s.geojson"), *by_kind["shapes"])
    write_points_geojson(str(tmp_path / "p.geojson"), *by_kind["points"])
    ((shapes, smeta, _),) = read_geojson(tmp_path / "s.geojson")
    ((points, pmeta, _),) = read_geojson(tmp_path / "p.geojson")
    assert smeta["shape_type"] == by_kind["shapes"][1]["shape_type"]
    for a, b in zip(shapes, by_kind["shapes"][0], strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(points, by_kind["points"][0])
    assert pmeta["features"]["isLocked"] == by_kind["points"][1]["features"]["isLocked"]


def test_points_round_trip_with_features(tmp_path):
    points = np.array([[10.5, 20.25], [30.0, 40.0], [50.125, 60.0]])
    meta = {
        "features": {"class": ["pos", "neg", "pos"], "label": [1, 0, 1], "note": ["x", "y", "z"]},
        "face_color": np.array([[0, 1, 0, 1], [1, 0, 0, 1], [0, 1, 0, 1]], float),
    }
    path = tmp_path / "points.geojson"
    write_points_geojson(str(path), points, meta)
    doc = json.loads(path.read_text())
    assert [f["geometry"]["type"] for f in doc["features"]] == ["Point"] * 3
    assert doc["features"][0]["geometry"]["coordinates"] == [20.25, 10.5]
    assert doc["features"][1]["properties"]["classification"] == {
        "name": "neg",
        "color": [255, 0, 0],
    }
    ((data, rmeta, kind),) = read_geojson(path)
    assert kind == "points"
    np.testing.assert_array_equal(data, points)
    for column, values in meta["features"].items():
        assert rmeta["features"][column] == values
    np.testing.assert_allclose(rmeta["face_color"], meta["face_color"])


def test_points_grouped_by_feature_index_become_multipoint():
    doc = points_to_geojson(
        np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), {"features": {"feature_index": [0, 0, 1]}}
    )
    assert [f["geometry"]["type"] for f in doc["features"]] == ["MultiPoint", "Point"]


def test_nd_shapes_store_their_plane(tmp_path):
    shapes = [np.array([[2.0, 0.0, 0.0], [2.0, 0.0, 5.0], [2.0, 5.0, 5.0]])]
    doc = shapes_to_geojson(shapes, {"shape_type": "polygon"})
    assert doc["features"][0]["geometry"]["plane"] == {"c": -1, "z": 2, "t": 0}
    path = tmp_path / "z.geojson"
    write_shapes_geojson(str(path), shapes, {"shape_type": "polygon"})
    ((data, meta, _),) = read_geojson(path)
    np.testing.assert_array_equal(data[0], shapes[0])
    assert meta["metadata"]["axes"] == ("z", "y", "x")
    with pytest.raises(RegionFileError, match="dimensions"):
        shapes_to_geojson([np.zeros((3, 5))], {"shape_type": "polygon"})


def test_features_as_dataframe_like_table():
    class Table:  # what napari hands writers: a pandas DataFrame (duck-typed here)
        columns = ("class",)

        def __getitem__(self, key):
            return ["Tumor"]

        def to_dict(self):
            return {}

    doc = shapes_to_geojson([SHAPES[1]], {"shape_type": ["polygon"], "features": Table()})
    assert doc["features"][0]["properties"]["classification"]["name"] == "Tumor"


def labels_image():
    labels = np.zeros((40, 50), dtype=np.int32)
    labels[2:20, 3:25] = 1
    labels[6:12, 8:15] = 0  # a hole in label 1
    labels[8:10, 10:12] = 1  # an island inside the hole
    labels[25:30, 5:10] = 2
    labels[25:30, 30:45] = 2  # label 2 has two components
    labels[32:38, 40:48] = 7
    labels[34:36, 42:44] = 3  # label 3 sits inside a hole of label 7
    labels[0, 49] = 5  # single pixel in the corner
    return labels


def test_labels_to_geojson_rasterises_back_exactly(tmp_path):
    labels = labels_image()
    path = tmp_path / "labels.geojson"
    write_labels_geojson(str(path), labels, {"name": "cells"})
    doc = json.loads(path.read_text())
    ids = [f["properties"]["label"] for f in doc["features"]]
    assert ids == [1, 2, 3, 5, 7]
    geometry = {f["properties"]["label"]: f["geometry"] for f in doc["features"]}
    assert geometry[1]["type"] == "MultiPolygon"  # ring with hole + the island
    assert geometry[2]["type"] == "MultiPolygon"
    assert geometry[7]["type"] == "Polygon" and len(geometry[7]["coordinates"]) == 2  # with hole
    assert doc["features"][0]["properties"]["name"] == "cells 1"
    rebuilt = np.zeros_like(labels)
    for label, geom in geometry.items():
        polygons = geom["coordinates"] if geom["type"] == "MultiPolygon" else [geom["coordinates"]]
        rings = [(np.asarray(p[0])[:-1], [np.asarray(h)[:-1] for h in p[1:]]) for p in polygons]
        rebuilt[rasterize_polygons(rings, labels.shape)] = label
    np.testing.assert_array_equal(rebuilt, labels)
    # pixel-edge outlines in QuPath's convention: label 5 is exactly the square of pixel (0, 49)
    assert sorted(map(tuple, geometry[5]["coordinates"][0][:-1])) == [
        (49, 0),
        (49, 1),
        (50, 0),
        (50, 1),
    ]


def test_labels_without_background_and_with_huge_ids():
    # find_objects on the raw ids would need 2**40 slots
    labels = np.full((4, 6), 2**40, dtype=np.int64)
    labels[:, 3:] = 9
    doc = labels_to_geojson(labels, {})
    assert [f["properties"]["label"] for f in doc["features"]] == [9, 2**40]
    ring = doc["features"][0]["geometry"]["coordinates"][0][:-1]
    assert sorted(map(tuple, ring)) == [(3, 0), (3, 4), (6, 0), (6, 4)]  # columns 3-5, all rows


def test_labels_features_and_errors():
    labels = np.zeros((5, 5), dtype=np.uint8)
    labels[1:3, 1:3] = 4
    doc = labels_to_geojson(labels, {"features": {"index": [0, 4], "class": ["", "Nucleus"]}})
    assert doc["features"][0]["properties"]["classification"] == {"name": "Nucleus"}
    with pytest.raises(RegionFileError, match="2-D"):
        labels_to_geojson(np.zeros((2, 5, 5), int), {})
    with pytest.raises(RegionFileError, match="integers"):
        labels_to_geojson(np.zeros((5, 5), float), {})
    assert labels_to_geojson(np.zeros((4, 4), int), {})["features"] == []
