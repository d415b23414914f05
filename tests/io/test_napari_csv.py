"""napari's own Shapes/Points CSV files.

Inside napari they are read by napari's builtins, not by us: their layer data is plain napari data
that our GeoJSON writer accepts like any other layer (first two tests). The napari-free CLI reads
them with :func:`read_napari_csv`; those tests parse files written by napari's own writer
(``layer.save``) and compare with napari's own reader.
"""

import subprocess
import sys
from pathlib import Path

import npe2
import numpy as np
import pytest
from napari_builtins.io import csv_to_layer_data, napari_write_points, napari_write_shapes

from napari_medplib.io import RegionFileError, read_geojson
from napari_medplib.io.napari_csv import read_napari_csv
from napari_medplib.io.napari_io import write_points_geojson, write_shapes_geojson
from napari_medplib.regions import regions_from_layer_data

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


# ---- read_napari_csv: files written by napari itself ------------------------------------------------
ALL_TYPES = ["rectangle", "polygon", "path", "ellipse", "line"]
ALL_SHAPES = [
    *SHAPES,
    np.array([[20.0, 20.0], [20.0, 40.0], [30.0, 40.0], [30.0, 20.0]]),
    np.array([[2.0, 3.0], [7.0, 8.5]]),
]


@pytest.fixture(scope="module")
def napari_save():
    """``layer.save(path)`` through napari's own writer (npe2 'napari' plugin), no viewer needed."""
    npe2.PluginManager.instance().discover(include_npe1=False)

    def save(layer, path):
        assert layer.save(str(path), plugin="napari") == [str(path)]
        return path

    return save


def _same_as_napari_reader(path, layer_data):
    """Our layer data holds the same coordinates and shape types as napari's own CSV reader's."""
    data, meta, kind = csv_to_layer_data(str(path))
    assert layer_data[2] == kind
    if kind == "shapes":
        assert layer_data[1]["shape_type"] == meta["shape_type"]
        for ours, theirs in zip(layer_data[0], data, strict=True):
            np.testing.assert_array_equal(ours, theirs)
    else:
        np.testing.assert_array_equal(layer_data[0], data)
        for name, values in meta.get("properties", {}).items():
            assert layer_data[1]["features"][name] == list(values)


def test_reads_all_shape_types_napari_wrote(napari_save, tmp_path):
    from napari.layers import Shapes

    layer = Shapes(ALL_SHAPES, shape_type=ALL_TYPES)
    path = napari_save(layer, tmp_path / "drawn.csv")
    assert path.read_text().splitlines()[0] == "index,shape-type,vertex-index,axis-0,axis-1"
    (layer_data,) = read_napari_csv(path)
    data, meta, kind = layer_data
    assert kind == "shapes" and meta["shape_type"] == ALL_TYPES and meta["name"] == "drawn"
    for ours, theirs in zip(data, layer.data, strict=True):
        np.testing.assert_array_equal(ours, theirs)
    assert meta["features"] == {"feature_index": [0, 1, 2, 3, 4], "hole_of": [-1] * 5}
    assert meta["metadata"] == {"source": str(path), "format": "napari-csv", "axes": ("y", "x")}
    assert meta["edge_color"].shape == meta["face_color"].shape == (5, 4)
    _same_as_napari_reader(path, layer_data)
    # every shape becomes a region on a 64x64 image (rectangle/ellipse/polygon/path/line)
    result = regions_from_layer_data(layer_data, image_shape=(64, 64))
    assert not result.problems and len(result.regions) == 5


def test_reads_3d_shapes_with_leading_axis(napari_save, tmp_path):
    from napari.layers import Shapes

    shapes = [
        np.array([[1.0, 1, 2], [1, 1, 9], [1, 6, 9], [1, 6, 2]]),
        np.array([[0.0, 10, 10], [0, 20, 15], [0, 12, 30]]),
    ]
    path = napari_save(Shapes(shapes, shape_type=["rectangle", "polygon"]), tmp_path / "stack.csv")
    ((data, meta, _),) = read_napari_csv(path)
    assert [d.shape for d in data] == [(4, 3), (3, 3)]
    np.testing.assert_array_equal(data[1], shapes[1])
    assert meta["metadata"]["axes"] == ("axis-0", "y", "x")


def test_reads_points_with_text_and_number_features(napari_save, tmp_path):
    from napari.layers import Points

    features = {
        "label": [1, 0, 1],
        "cls": ["tumour, core", "stroma", "x"],
        "score": [0.5, 1.25, 2.0],
    }
    layer = Points(np.array([[5.0, 6.0], [7.5, 8.25], [1.0, 2.0]]), features=features)
    path = napari_save(layer, tmp_path / "clicks.csv")
    assert path.read_text().splitlines()[0] == "index,axis-0,axis-1,label,cls,score"
    (layer_data,) = read_napari_csv(path)
    data, meta, kind = layer_data
    assert kind == "points" and meta["name"] == "clicks"
    np.testing.assert_array_equal(data, layer.data)
    assert meta["features"] == features
    assert [type(v) for v in meta["features"]["label"]] == [int] * 3
    assert meta["face_color"].shape == (3, 4)
    _same_as_napari_reader(path, layer_data)
    # 'label' 1/0 is polarity: the middle point is a negative click
    regions = regions_from_layer_data(layer_data, image_shape=(32, 32)).regions
    assert [r.positive for r in regions] == [True, False, True]


def test_reads_numeric_only_points_written_as_floats(napari_save, tmp_path):
    from napari.layers import Points

    layer = Points(np.array([[1.0, 5.0, 6.0], [2.0, 7.5, 8.25]]), features={"label": [1, 0]})
    path = napari_save(layer, tmp_path / "stack_points.csv")
    assert (
        path.read_text().splitlines()[1].startswith("0.0,")
    )  # napari writes index and label as floats
    (layer_data,) = read_napari_csv(path)
    np.testing.assert_array_equal(layer_data[0], layer.data)
    assert layer_data[1]["features"] == {"label": [1.0, 0.0]}
    assert layer_data[1]["metadata"]["axes"] == ("axis-0", "y", "x")
    _same_as_napari_reader(path, layer_data)


# ---- malformed files ----------------------------------------------------------------------------------
SHAPES_HEADER = "index,shape-type,vertex-index,axis-0,axis-1\n"
BAD = {
    "empty": ("", "the file is empty"),
    "header only": (SHAPES_HEADER, "only a header row"),
    "not napari": (
        "x,y,area\n1,2,3\n",
        "expected napari's Shapes columns 'index,shape-type,vertex-index,axis-0",
    ),
    "no axis-1": ("index,axis-0\n0,1\n", "not a napari Shapes or Points CSV"),
    "axis gap": ("index,axis-0,axis-1,axis-3\n0,1,2,3\n", "no 'axis-2' column"),
    "missing column": (
        "index,shape-type,axis-0,axis-1\n0,polygon,1,2\n",
        "no 'vertex-index' column",
    ),
    "non-numeric": (
        SHAPES_HEADER + "0,line,0,1,2\n0,line,1,abc,4\n",
        "line 3, column 'axis-0': 'abc' is not a number",
    ),
    "unknown type": (SHAPES_HEADER + "0,circle,0,1,2\n", "unknown shape-type 'circle'"),
    "short row": (
        SHAPES_HEADER + "0,line,0,1,2\n0,line,1,3\n",
        "line 3 has 4 values but the header has 5",
    ),
    "split shape": (
        SHAPES_HEADER + "0,line,0,1,2\n1,line,0,3,4\n1,line,1,5,6\n0,line,1,7,8\n",
        "shape 0 are split",
    ),
    "type change": (
        SHAPES_HEADER + "0,line,0,1,2\n0,path,1,3,4\n",
        "changes type from 'line' to 'path'",
    ),
    "bad index": (SHAPES_HEADER + "a,line,0,1,2\n", "shape index 'a' is not a whole number"),
    "bad point": ("index,axis-0,axis-1\n0,1,\n", "'' is not a number"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_files_raise_region_file_error(case, tmp_path):
    text, message = BAD[case]
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(RegionFileError) as info:
        read_napari_csv(path)
    assert str(info.value).startswith("bad.csv: ")
    assert message in str(info.value)


def test_shape_type_case_and_crlf_and_bom_accepted(tmp_path):
    path = tmp_path / "hand.csv"
    path.write_bytes(
        ("\ufeff" + SHAPES_HEADER + "3,Line,0,1,2\n3,Line,1,3,4\n").replace("\n", "\r\n").encode()
    )
    ((data, meta, _),) = read_napari_csv(path)
    assert meta["shape_type"] == ["line"] and meta["features"]["feature_index"] == [3]
    np.testing.assert_array_equal(data[0], [[1, 2], [3, 4]])


# ---- napari-free and not an npe2 reader -------------------------------------------------------------
def test_reader_is_napari_free_and_not_registered():
    code = (
        "import sys; sys.modules['napari'] = None; sys.modules['napari_builtins'] = None\n"
        "import napari_medplib.io.napari_csv, napari_medplib.cli\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    import napari_medplib

    manifest = (Path(napari_medplib.__file__).parent / "napari.yaml").read_text()
    assert "napari_csv" not in manifest
