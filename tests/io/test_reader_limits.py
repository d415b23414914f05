"""Readers bound their memory by the file, raise only RegionFileError, and drop undrawable shapes."""

import io
import json
import tracemalloc
import warnings
import zipfile

import numpy as np
import pytest
import roifile  # noqa: F401 - imported before memory is measured
import shapely  # noqa: F401

from napari_medplib.io import RegionFileError, read_coco, read_geojson, read_imagej
from napari_medplib.io.napari_csv import read_napari_csv
from napari_medplib.io.napari_io import get_coco_reader

FIXED = 2**20  # allowance for the reader's fixed costs (dicts, small arrays, module state)


def _peak(call):
    tracemalloc.start()
    try:
        try:
            result = call()
        except RegionFileError as exc:
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _coco(annotations, images=None):
    return {
        "images": images or [{"id": 1, "file_name": "a.png", "width": 30000, "height": 30000}],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "cell"}],
    }


# ---- memory bounded by the file -----------------------------------------------------------------
def test_tiny_rle_declaring_a_huge_mask_is_outlined_from_its_runs(tmp_path):
    path = tmp_path / "big.json"
    counts = [30000 * 100, 30000 * 50, 30000 * 29850]  # a band of 50 whole columns
    seg = {"size": [30000, 30000], "counts": counts}
    path.write_text(json.dumps(_coco([{"id": 1, "image_id": 1, "category_id": 1, "segmentation": seg}])))
    assert path.stat().st_size < 300
    layers, peak = _peak(lambda: read_coco(path))
    assert peak < 20 * path.stat().st_size + FIXED, peak
    ((data, _meta, kind),) = layers
    assert kind == "shapes" and len(data) == 1
    assert sorted(map(tuple, data[0].tolist())) == [(0.0, 100.0), (0.0, 150.0), (30000.0, 100.0), (30000.0, 150.0)]


@pytest.mark.parametrize("size", [[10**7, 10**7], [-1, 5], [2.5, 3], ["a", 1], [1]])
def test_rle_with_impossible_size_is_refused(tmp_path, size):
    path = tmp_path / "bad.json"
    seg = {"size": size, "counts": "0"}
    path.write_text(json.dumps(_coco([{"id": 1, "image_id": 1, "category_id": 1, "segmentation": seg}])))
    with pytest.raises(RegionFileError, match=r"bad.json: annotation 1 is malformed"):
        read_coco(path)


def test_rle_counts_string_with_endless_run_is_refused(tmp_path):
    path = tmp_path / "bad.json"
    seg = {"size": [10, 10], "counts": "o" * 100_000}  # continuation bits forever
    path.write_text(json.dumps(_coco([{"id": 1, "image_id": 1, "category_id": 1, "segmentation": seg}])))
    with pytest.raises(RegionFileError, match="longer than 13 characters"):
        read_coco(path)


def test_csv_header_with_a_huge_axis_number_is_refused_cheaply(tmp_path):
    path = tmp_path / "points.csv"
    path.write_text("index,axis-0,axis-1,axis-99999999999\n0,1,2,3\n")
    error, peak = _peak(lambda: read_napari_csv(path))
    assert isinstance(error, RegionFileError) and "at most 32 axes" in str(error)
    assert peak < FIXED


def test_roiset_member_is_checked_by_its_header_before_it_is_read(tmp_path):
    path = tmp_path / "RoiSet.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("junk.roi", b"JUNK" + bytes(900_000))
    error, peak = _peak(lambda: read_imagej(path))
    assert isinstance(error, RegionFileError) and "not an ImageJ ROI" in str(error)
    assert peak < 200_000, peak  # 4 bytes of the member, not 900 kB


@pytest.mark.parametrize("layout", ["one huge member", "many members"])
def test_roiset_zip_bomb_is_refused_before_decompressing(tmp_path, layout):
    path = tmp_path / "RoiSet.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        if layout == "one huge member":
            archive.writestr("a.roi", b"Iout" + bytes(40 * 2**20))
        else:
            for i in range(40):
                archive.writestr(f"{i}.roi", b"Iout" + bytes(2**20))
    error, peak = _peak(lambda: read_imagej(path))
    assert isinstance(error, RegionFileError)
    assert "more than" in str(error)
    assert peak < 20 * path.stat().st_size + FIXED, peak


# ---- only RegionFileError escapes ---------------------------------------------------------------
GEO_POLY = {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 0]]]}


def _feature(**changes):
    return {"type": "Feature", "geometry": GEO_POLY, "properties": {}, **changes}


def _fc(*features):
    return json.dumps({"type": "FeatureCollection", "features": list(features)})


ESCAPES = {
    "latin-1 bytes (UnicodeDecodeError)": ("a.geojson", _fc(_feature()).encode()[:-2] + b"\xe9\xff]}"),
    "deep nesting (RecursionError)": ("a.geojson", b"[" * 100_000 + b"]" * 100_000),
    "deep geometry collection (RecursionError)": (
        "a.geojson",
        ('{"type": "GeometryCollection", "geometries": [' * 900 + "]}" * 900).encode(),
    ),
    "list category id (TypeError)": (
        "a.json",
        json.dumps({"images": [], "annotations": [], "categories": [{"id": [1], "name": "x"}]}).encode(),
    ),
    "dict image id (TypeError)": (
        "a.json",
        json.dumps({"images": [{"id": {}}], "annotations": [{"image_id": {}}], "categories": []}).encode(),
    ),
    "iscrowd Infinity (OverflowError)": (
        "a.json",
        b'{"images": [], "categories": [], "annotations": [{"bbox": [1, 1, 2, 2], "iscrowd": Infinity}]}',
    ),
    "plane z NaN (ValueError from int)": (
        "a.geojson",
        _fc(_feature(geometry={**GEO_POLY, "plane": {"z": float("nan")}})).encode(),
    ),
    "plane z Infinity (OverflowError)": (
        "a.geojson",
        _fc(_feature(geometry={**GEO_POLY, "plane": {"z": float("inf")}})).encode(),
    ),
    "measurements list of non-objects": (
        "a.geojson",
        _fc(_feature(properties={"measurements": [1, [2]], "classification": {"names": {"a": 1}}})).encode(),
    ),
    "csv invalid utf-8": ("a.csv", b"index,axis-0,axis-1\n0,\xff\xfe,2\n"),
    "csv huge int feature": ("a.csv", b"index,axis-0,axis-1,f\n0,1,2," + b"9" * 5000 + b"\n"),
}


@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_malformed_files_raise_only_region_file_error(tmp_path, case):
    name, content = ESCAPES[case]
    path = tmp_path / name
    path.write_bytes(content)
    read = {".geojson": read_geojson, ".json": read_coco, ".csv": read_napari_csv}[path.suffix]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            read(path)
    except RegionFileError as exc:
        assert type(exc) is RegionFileError and str(exc).startswith(f"{name}: ")


def test_properties_that_are_not_an_object_are_ignored(tmp_path):
    path = tmp_path / "a.geojson"
    path.write_text(_fc(_feature(properties=[1, 2, 3])))
    ((data, _, kind),) = read_geojson(path)
    assert kind == "shapes" and len(data) == 1


def _zip_bytes(method):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.roi", b"Iout" + bytes(200))
    data = bytearray(buffer.getvalue())
    if method == "corrupt deflate (zlib.error)":
        start = 30 + len("a.roi")
        data[start : start + 6] = b"\xff\xff\xff\xff\xff\xff"
    else:  # an unknown compression method in both headers (NotImplementedError)
        data[8:10] = (99).to_bytes(2, "little")
        central = data.rindex(b"PK\x01\x02")
        data[central + 10 : central + 12] = (99).to_bytes(2, "little")
    return bytes(data)


@pytest.mark.parametrize("method", ["corrupt deflate (zlib.error)", "unknown method (NotImplementedError)"])
def test_damaged_zip_members_raise_region_file_error(tmp_path, method):
    path = tmp_path / "RoiSet.zip"
    path.write_bytes(_zip_bytes(method))
    with pytest.raises(RegionFileError) as info:
        read_imagej(path)
    assert type(info.value) is RegionFileError and str(info.value).startswith("RoiSet.zip: ")


# ---- undrawable shapes are dropped, with a count ------------------------------------------------
def test_geojson_drops_shapes_napari_cannot_draw(tmp_path):
    path = tmp_path / "mixed.geojson"
    features = [
        _feature(),
        _feature(geometry={"type": "Polygon", "coordinates": [[[0, 0], [float("nan"), 1], [2, 2], [0, 0]]]}),
        _feature(geometry={"type": "Polygon", "coordinates": [[[5, 5]]]}),
        _feature(geometry={"type": "LineString", "coordinates": [[1, 1]]}),
        _feature(geometry={"type": "MultiPoint", "coordinates": []}),
        _feature(geometry={"type": "Point", "coordinates": [float("inf"), 2]}),
        _feature(geometry={"type": "Point", "coordinates": [3, 2]}),
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    with pytest.warns(UserWarning) as caught:
        layers = read_geojson(path)
    text = " ".join(str(w.message) for w in caught)
    assert "mixed.geojson: dropped 3 shape(s)" in text and "dropped 1 point(s)" in text
    assert "1 shapes with NaN or infinite coordinates" in text and "polygons with fewer than 3 vertices" in text
    (shapes, smeta, _), (points, pmeta, _) = layers
    assert len(shapes) == 1 and smeta["metadata"]["dropped_shapes"] == 3
    assert smeta["shape_type"] == ["polygon"] and smeta["features"]["feature_index"] == [0]
    np.testing.assert_array_equal(points, [[2.0, 3.0]])
    assert pmeta["metadata"]["dropped_points"] == 1


def test_hole_of_a_dropped_polygon_is_dropped_and_indices_follow(tmp_path):
    path = tmp_path / "holes.geojson"
    bad = {"type": "Polygon", "coordinates": [[[0, 0], [1, 1]], [[0, 0], [1, 0], [1, 1], [0, 0]]]}
    good = {"type": "Polygon", "coordinates": [[[0, 0], [9, 0], [9, 9], [0, 9], [0, 0]], [[2, 2], [3, 2], [3, 3], [2, 2]]]}
    path.write_text(_fc(_feature(geometry=bad), _feature(geometry=good)))
    with pytest.warns(UserWarning, match="1 holes of a dropped polygon"):
        ((data, meta, _),) = read_geojson(path)
    assert len(data) == 2 and meta["features"]["hole_of"] == [-1, 0]


def test_csv_rectangle_without_four_corners_is_dropped(tmp_path):
    path = tmp_path / "shapes.csv"
    path.write_text(
        "index,shape-type,vertex-index,axis-0,axis-1\n"
        "0,rectangle,0,0,0\n0,rectangle,1,0,4\n0,rectangle,2,4,4\n"
        "1,polygon,0,0,0\n1,polygon,1,0,4\n1,polygon,2,4,4\n"
    )
    with pytest.warns(UserWarning, match="1 rectangles without 4 corners"):
        ((_data, meta, _),) = read_napari_csv(path)
    assert meta["shape_type"] == ["polygon"] and meta["features"]["feature_index"] == [1]


def test_file_with_only_undrawable_shapes_is_an_error(tmp_path):
    path = tmp_path / "nan.json"
    ann = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [float("nan"), 0, 3, 3]}]
    path.write_text(json.dumps(_coco(ann)))
    with pytest.warns(UserWarning, match="dropped 1 shape"), pytest.raises(RegionFileError, match="cannot draw"):
        read_coco(path)


# ---- get_reader for *.json reads only the beginning ---------------------------------------------
def test_coco_reader_declines_a_large_json_by_its_first_kilobytes(tmp_path):
    other = tmp_path / "measurements.json"
    other.write_text(json.dumps({"values": list(range(2_000_000)), "images": []}))
    result, peak = _peak(lambda: get_coco_reader(str(other)))
    assert result is None and peak < 1_000_000, peak
    coco = tmp_path / "instances.json"
    anns = [{"id": i, "image_id": 1, "category_id": 1, "bbox": [i % 50, 1, 2, 2]} for i in range(20_000)]
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "annotations": anns,
                                "categories": [{"id": 1, "name": "cell"}]}))
    reader, peak = _peak(lambda: get_coco_reader(str(coco)))
    assert reader is not None and peak < 1_000_000, peak
    ((data, _, _),) = reader(str(coco))
    assert len(data) == 20_000
    small = tmp_path / "small.json"
    small.write_text('{"images": {}, "annotations": [], "categories": []}')  # short files: checked exactly
    assert get_coco_reader(str(small)) is None
