"""Writers replace files atomically: a failed write leaves the old file exactly as it was."""

import datetime as dt
import errno
import json

import numpy as np
import pytest

from napari_medplib import atomic
from napari_medplib.atomic import atomic_path, atomic_write, atomic_write_bytes, atomic_write_text
from napari_medplib.io import RegionFileError, read_geojson
from napari_medplib.io.napari_io import (
    write_labels_geojson,
    write_points_geojson,
    write_shapes_geojson,
)

OLD = '{"type": "FeatureCollection", "features": []}\n'
SQUARE = [np.array([[0.0, 0.0], [0.0, 4.0], [4.0, 4.0], [4.0, 0.0]])]


def _old_file(tmp_path, name="cells.geojson"):
    path = tmp_path / name
    path.write_text(OLD)
    return path


def _only_the_old_file_left(path):
    assert path.read_text() == OLD
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary left over


class _FullDisk:
    """A file object that writes part of the data, then fails as a full disk does."""

    def __init__(self, handle):
        self.handle = handle

    def write(self, data):
        self.handle.write(data[: len(data) // 2])
        self.handle.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


@pytest.fixture
def full_disk(monkeypatch):
    real_open = open
    monkeypatch.setattr(atomic, "open", lambda *a, **k: _FullDisk(real_open(*a, **k)), raising=False)


# ---- the helper ----------------------------------------------------------------------------------
def test_atomic_write_replaces_on_success_and_keeps_permissions(tmp_path):
    path = _old_file(tmp_path, "a.txt")
    path.chmod(0o640)
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and (path.stat().st_mode & 0o777) == 0o640
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"


def test_atomic_write_keeps_old_file_when_the_block_raises(tmp_path):
    path = _old_file(tmp_path)
    with pytest.raises(RuntimeError), atomic_write(path) as handle:
        handle.write("half a docu")
        raise RuntimeError("interrupted")
    _only_the_old_file_left(path)


def test_atomic_path_keeps_suffix_and_old_file_on_failure(tmp_path):
    import tifffile

    path = tmp_path / "labels.ome.tif"
    tifffile.imwrite(path, np.ones((4, 4), np.uint16))
    old = path.read_bytes()
    with pytest.raises(ValueError), atomic_path(path) as tmp:
        assert tmp.name.endswith(".labels.ome.tif") and tmp.parent == tmp_path
        tifffile.imwrite(tmp, np.zeros((4, 4), np.uint16))
        raise ValueError("stop")
    assert path.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_atomic_write_on_full_disk_keeps_old_file(tmp_path, full_disk):
    path = _old_file(tmp_path)
    with pytest.raises(OSError):
        atomic_write_text(path, "x" * 10_000)
    _only_the_old_file_left(path)


# ---- GeoJSON writers -----------------------------------------------------------------------------
def test_nan_vertex_is_refused_and_old_file_survives(tmp_path):
    path = _old_file(tmp_path)
    shapes = [SQUARE[0], np.array([[1.0, 1.0], [np.nan, 2.0], [3.0, 1.0]])]
    with pytest.raises(RegionFileError, match="shape 1 has a NaN or infinite vertex"):
        write_shapes_geojson(str(path), shapes, {"shape_type": ["rectangle", "polygon"]})
    _only_the_old_file_left(path)
    with pytest.raises(RegionFileError, match="point 1"):
        write_points_geojson(str(path), np.array([[1.0, 2.0], [np.inf, 1.0]]), {})
    _only_the_old_file_left(path)


def test_infinity_measurement_from_a_qupath_file_is_written(tmp_path):
    # QuPath writes non-finite measurements as bare NaN / Infinity tokens
    source = tmp_path / "qupath.geojson"
    source.write_text(
        '{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": '
        '"Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 0]]]}, "properties": {"objectType":'
        ' "detection", "measurements": {"Area": 8.0, "Circularity": Infinity, "Max": NaN}}}]}'
    )
    ((data, meta, _),) = read_geojson(source)
    target = _old_file(tmp_path)
    write_shapes_geojson(str(target), data, meta)
    written = json.loads(target.read_text())  # strict JSON: no Infinity/NaN tokens
    assert written["features"][0]["properties"]["measurements"] == {"Area": 8.0}


def test_datetime_feature_is_written_as_iso_text(tmp_path):
    path = _old_file(tmp_path)
    when = dt.datetime(2024, 5, 1, 12, 30)
    meta = {"shape_type": ["rectangle"], "features": {"created": [when], "day": [np.datetime64("2024-05-02")]}}
    write_shapes_geojson(str(path), SQUARE, meta)
    props = json.loads(path.read_text())["features"][0]["properties"]
    assert props["created"] == "2024-05-01T12:30:00" and props["day"] == "2024-05-02"


def test_unserialisable_nested_value_keeps_old_file(tmp_path):
    path = _old_file(tmp_path)
    meta = {"shape_type": ["rectangle"], "features": {"stats": [{"mean": float("nan")}]}}
    with pytest.raises(RegionFileError, match="existing file is unchanged"):
        write_shapes_geojson(str(path), SQUARE, meta)
    _only_the_old_file_left(path)


@pytest.mark.parametrize("writer", ["shapes", "points", "labels"])
def test_full_disk_keeps_old_file(tmp_path, full_disk, writer):
    path = _old_file(tmp_path)
    labels = np.zeros((8, 8), np.int32)
    labels[2:5, 2:5] = 1
    call = {
        "shapes": lambda: write_shapes_geojson(str(path), SQUARE, {"shape_type": ["rectangle"]}),
        "points": lambda: write_points_geojson(str(path), np.array([[1.0, 2.0]]), {}),
        "labels": lambda: write_labels_geojson(str(path), labels, {}),
    }[writer]
    with pytest.raises(RegionFileError, match=r"No space left on device.*unchanged"):
        call()
    _only_the_old_file_left(path)
