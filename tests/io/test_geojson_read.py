"""QuPath GeoJSON reader: layouts, geometry types, axis order, properties, malformed files."""

import numpy as np
import pytest
from io_testdata import REAL, by_type

from napari_medplib.io import RegionFileError, read_geojson
from napari_medplib.io.geojson_read import geojson_to_layers


def feature(geometry_type, coordinates, **properties):
    return {
        "type": "Feature",
        "geometry": {"type": geometry_type, "coordinates": coordinates},
        "properties": properties,
    }


# An L-shaped, clearly non-square polygon: x (columns) 10..50, y (rows) 100..130.
L_SHAPE = [[10, 100], [50, 100], [50, 110], [20, 110], [20, 130], [10, 130], [10, 100]]


def test_axis_order_xy_becomes_row_col():
    ((data, meta, kind),) = geojson_to_layers(
        {"type": "FeatureCollection", "features": [feature("Polygon", [L_SHAPE])]}
    )
    assert kind == "shapes" and meta["shape_type"] == ["polygon"]
    poly = data[0]
    assert poly.shape == (6, 2)  # closing vertex dropped
    assert poly[:, 0].min() == 100 and poly[:, 0].max() == 130  # rows = y
    assert poly[:, 1].min() == 10 and poly[:, 1].max() == 50  # cols = x
    np.testing.assert_array_equal(poly[1], [100, 50])


@pytest.mark.parametrize("layout", ["collection", "list", "feature", "geometry"])
def test_accepted_layouts(layout):
    feat = feature("Polygon", [L_SHAPE], objectType="annotation")
    document = {
        "collection": {"type": "FeatureCollection", "features": [feat]},
        "list": [feat],
        "feature": feat,
        "geometry": feat["geometry"],
    }[layout]
    ((data, _, kind),) = geojson_to_layers(document)
    assert kind == "shapes" and len(data) == 1 and len(data[0]) == 6


def test_every_geometry_type():
    features = [
        feature("Polygon", [[[0, 0], [4, 0], [4, 3], [0, 3], [0, 0]]], name="box"),
        feature("Polygon", [[[0, 0], [4, 1], [2, 5], [0, 0]]], name="triangle"),
        feature(
            "MultiPolygon",
            [[[[0, 0], [1, 0], [1, 2], [0, 0]]], [[[5, 5], [6, 5], [6, 7], [5, 5]]]],
            name="multi",
        ),
        feature("LineString", [[0, 0], [3, 4]], name="line"),
        feature("LineString", [[0, 0], [3, 4], [6, 0]], name="path"),
        feature("MultiLineString", [[[0, 0], [1, 1], [2, 0]], [[5, 5], [6, 6]]], name="multiline"),
        feature("Point", [7, 8], name="pt"),
        feature("MultiPoint", [[1, 2], [3, 4]], name="mpt"),
        {
            "type": "Feature",
            "geometry": {
                "type": "GeometryCollection",
                "geometries": [
                    {"type": "Point", "coordinates": [9, 9]},
                    {"type": "LineString", "coordinates": [[0, 0], [1, 1]]},
                ],
            },
            "properties": {"name": "gc"},
        },
    ]
    layers = by_type(geojson_to_layers(features))
    shapes, smeta = layers["shapes"]
    assert smeta["shape_type"] == [
        "rectangle",
        "polygon",
        "polygon",
        "polygon",
        "line",
        "path",
        "path",
        "line",
        "line",
    ]
    assert smeta["features"]["name"] == [
        "box",
        "triangle",
        "multi",
        "multi",
        "line",
        "path",
        "multiline",
        "multiline",
        "gc",
    ]
    assert smeta["features"]["feature_index"] == [0, 1, 2, 2, 3, 4, 5, 5, 8]
    np.testing.assert_array_equal(shapes[0], [[0, 0], [0, 4], [3, 4], [3, 0]])
    points, pmeta = layers["points"]
    np.testing.assert_array_equal(points, [[8, 7], [2, 1], [4, 3], [9, 9]])
    assert pmeta["features"]["name"] == ["pt", "mpt", "mpt", "gc"]
    assert pmeta["name"].endswith("points")


def test_holes_become_flagged_shapes():
    outer = [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]
    hole = [[2, 2], [4, 2], [4, 5], [2, 2]]
    doc = [
        feature("Polygon", [[[20, 20], [21, 20], [21, 22], [20, 20]]]),
        feature("Polygon", [outer, hole], classification={"name": "Tumor", "color": [200, 0, 0]}),
    ]
    ((data, meta, _),) = geojson_to_layers(doc)
    assert meta["features"]["hole_of"] == [-1, -1, 1]
    assert meta["features"]["class"] == ["", "Tumor", "Tumor"]
    np.testing.assert_array_equal(data[2], [[2, 2], [2, 4], [5, 4]])
    assert meta["face_color"][2, 3] == 0  # holes are drawn without a face
    np.testing.assert_allclose(meta["edge_color"][1], [200 / 255, 0, 0, 1])


def test_classification_colours_and_measurements():
    doc = [
        feature(
            "Point",
            [1, 1],
            classification={"name": "A", "color": [0, 255, 0]},
            measurements={"Area": 3.5, "Count": 2},
            isLocked=True,
            score=0.25,
            tags=["x", "y"],
        ),
        feature(
            "Point",
            [2, 2],
            classification={"name": "B", "colorRGB": -65536},  # QuPath 0.2: packed ARGB
            measurements=[{"name": "Area", "value": 7.0}],
            object_type="detection",
        ),
        feature(
            "Point", [3, 3], classification={"names": ["Tumor", "Positive"], "color": [0, 0, 255]}
        ),
    ]
    ((_, meta, _),) = geojson_to_layers(doc)
    f = meta["features"]
    assert f["class"] == ["A", "B", "Tumor: Positive"]
    assert f["measurements.Area"] == [3.5, 7.0, None]
    assert f["measurements.Count"] == [2, None, None]
    assert f["isLocked"] == [True, None, None]
    assert f["objectType"] == [None, "detection", None]
    assert f["tags"][0] == '["x", "y"]'
    np.testing.assert_allclose(meta["face_color"][:, :3], [[0, 1, 0], [1, 0, 0], [0, 0, 1]])


def test_qupath_plane_adds_leading_axes():
    doc = [
        feature("Polygon", [[[0, 0], [2, 0], [2, 2], [0, 0]]]),
        {
            **feature("Point", [5, 6]),
            "geometry": {
                "type": "Point",
                "coordinates": [5, 6],
                "plane": {"c": -1, "z": 3, "t": 0},
            },
        },
    ]
    layers = by_type(geojson_to_layers(doc))
    assert layers["points"][1]["metadata"]["axes"] == ("z", "y", "x")
    np.testing.assert_array_equal(layers["points"][0], [[3, 6, 5]])
    assert layers["shapes"][0][0].shape == (3, 3) and (layers["shapes"][0][0][:, 0] == 0).all()


def test_real_qupath_export():
    """qp_all_shapes.geojson was exported by QuPath (see data/real/SOURCES.md)."""
    layers = by_type(read_geojson(REAL / "qupath_all_shapes.geojson"))
    shapes, meta = layers["shapes"]
    assert meta["name"] == "qupath_all_shapes"
    assert meta["shape_type"] == ["rectangle", "polygon", "polygon", "line", "path"]
    assert meta["features"]["objectType"] == ["annotation"] * 5  # QuPath 0.3 wrote 'object_type'
    np.testing.assert_array_equal(shapes[0], [[320, 298], [609, 298], [609, 613], [320, 613]])
    assert len(shapes[1]) == 100  # QuPath's ellipse outline, closing vertex dropped
    points, pmeta = layers["points"]
    assert len(points) == 4
    np.testing.assert_allclose(points[-1], [1421.65, 925.53])
    assert pmeta["features"]["feature_index"] == [3, 3, 3, 4]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty"),
        ("   \n", "empty"),
        ('{"type": "FeatureCollection", "features": [{"type": "Feature", "geom', "truncated"),
        ('{"type": "Topology", "objects": {}}', "not GeoJSON"),
        ("[1, 2]", "not a GeoJSON Feature"),
        (
            '{"type": "Feature", "geometry": {"type": "Circle", "coordinates": [1, 2]}, "properties": {}}',
            "Circle",
        ),
        (
            '{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[["a", "b"]]]}, "properties": {}}',
            "malformed",
        ),
        ('{"type": "FeatureCollection", "features": []}', "no Polygon"),
    ],
)
def test_malformed_files_raise_clear_errors(write_json, content, message):
    path = write_json("bad.geojson", content)
    with pytest.raises(RegionFileError, match=message) as info:
        read_geojson(path)
    assert "bad.geojson" in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("corners", "is_box"),
    [
        ([[0, 0], [0, 4], [3, 4], [3, 0]], True),
        ([[3, 0], [3, 4], [0, 4], [0, 0]], True),  # other winding
        ([[0, 0], [0, 4], [3, 4], [3, 1]], False),  # trapezoid
        ([[0, 2], [2, 4], [4, 2], [2, 0]], False),  # diamond (rotated square)
        ([[0, 0], [3, 4], [0, 4], [3, 0]], False),  # self-crossing bow tie
        ([[0, 0], [0, 0], [0, 0], [0, 0]], False),  # degenerate
    ],
)
def test_rectangle_detection(corners, is_box):
    ring = [[c, r] for r, c in corners] + [[corners[0][1], corners[0][0]]]
    ((_, meta, _),) = geojson_to_layers([feature("Polygon", [ring])])
    assert meta["shape_type"] == ["rectangle" if is_box else "polygon"]
