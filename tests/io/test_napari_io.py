"""npe2 entry points: the get_reader contract (never raises, None when not ours) and the writers."""

import json
import zipfile

import numpy as np
import pytest
from io_testdata import REAL

from napari_medplib.io.napari_io import (
    get_coco_reader,
    get_geojson_reader,
    get_imagej_reader,
    write_labels_geojson,
    write_points_geojson,
    write_shapes_geojson,
)

GET_READERS = [get_geojson_reader, get_imagej_reader, get_coco_reader]
POLYGON = {
    "type": "Feature",
    "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [2, 3], [0, 0]]]},
    "properties": {},
}


@pytest.mark.parametrize("get_reader", GET_READERS)
@pytest.mark.parametrize(
    "odd", ["missing.geojson", "missing.roi", "missing.json", "", ".", [], None, 42, [None]]
)
def test_get_reader_never_raises(tmp_path, get_reader, odd):
    path = str(tmp_path / odd) if isinstance(odd, str) and odd else odd
    assert get_reader(path) is None


@pytest.mark.parametrize("get_reader", GET_READERS)
def test_directory_and_wrong_extension_are_declined(tmp_path, get_reader):
    folder = tmp_path / "folder.geojson"
    folder.mkdir()
    other = tmp_path / "image.tif"
    other.write_bytes(b"II*\x00")
    assert get_reader(str(folder)) is None
    assert get_reader(str(other)) is None


def test_each_reader_claims_only_its_files(tmp_path):
    geo = tmp_path / "a.geojson"
    geo.write_text(json.dumps([POLYGON]))
    assert get_geojson_reader(str(geo)) is not None
    assert get_imagej_reader(str(geo)) is None and get_coco_reader(str(geo)) is None
    roi = str(REAL / "readroi_polygon.roi")
    assert get_imagej_reader(roi) is not None and get_geojson_reader(roi) is None
    coco = str(REAL / "pycococreator_coco_example.json")
    assert get_coco_reader(coco) is not None and get_geojson_reader(coco) is None


def test_malformed_geojson_is_claimed_and_reported_by_the_reader(tmp_path):
    """Policy: a .geojson is ours, so get_reader accepts it and the reader raises a clear error."""
    empty = tmp_path / "empty.geojson"
    empty.write_text("")
    reader = get_geojson_reader(str(empty))
    assert reader is not None
    with pytest.raises(ValueError, match=r"empty\.geojson: the file is empty"):
        reader(str(empty))


def test_list_of_paths(tmp_path):
    a, b = tmp_path / "a.geojson", tmp_path / "b.geojson"
    a.write_text(json.dumps([POLYGON]))
    b.write_text(json.dumps([POLYGON, POLYGON]))
    reader = get_geojson_reader([str(a), str(b)])
    layers = reader([str(a), str(b)])
    assert [len(data) for data, _, _ in layers] == [1, 2]
    assert get_geojson_reader([str(a), str(tmp_path / "c.txt")]) is None


def test_zip_with_rois_among_other_files(tmp_path):
    path = tmp_path / "mixed.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "x")
        archive.writestr("cell.roi", (REAL / "readroi_rectangle.roi").read_bytes())
    ((_data, meta, _),) = get_imagej_reader(str(path))(str(path))
    assert meta["shape_type"] == ["rectangle"]


def test_writers_return_the_written_path(tmp_path):
    shapes = [np.array([[0.0, 0.0], [0.0, 5.0], [5.0, 5.0]])]
    out = write_shapes_geojson(str(tmp_path / "s.geojson"), shapes, {"shape_type": ["polygon"]})
    assert out == [str(tmp_path / "s.geojson")]
    assert write_points_geojson(str(tmp_path / "p.geojson"), np.array([[1.0, 2.0]]), {}) == [
        str(tmp_path / "p.geojson")
    ]
    labels = np.zeros((4, 4), int)
    labels[1, 1] = 1
    assert write_labels_geojson(str(tmp_path / "l.geojson"), labels, {}) == [
        str(tmp_path / "l.geojson")
    ]
    for name in ("s", "p", "l"):
        assert json.loads((tmp_path / f"{name}.geojson").read_text())["type"] == "FeatureCollection"
