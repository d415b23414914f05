"""ImageJ ROI reader: real ImageJ files, every ROI type, subpixel, stack positions, zips, errors."""

import json
import zipfile

import numpy as np
import pytest
from io_testdata import REAL, by_type
from roifile import ROI_OPTIONS, ROI_SUBTYPE, ROI_TYPE, ImagejRoi

from napari_medplib.io import RegionFileError, read_imagej
from napari_medplib.io.napari_io import get_imagej_reader


def expected(name):
    """read-roi's expected values for its test file (an independent decoder)."""
    return next(iter(json.loads((REAL / f"readroi_{name}.expected.json").read_text()).values()))


# ----------------------------------------------------------------------------------------- real files
def test_real_rectangle():
    ((data, meta, kind),) = read_imagej(REAL / "readroi_rectangle.roi")
    e = expected("rectangle")
    assert kind == "shapes" and meta["shape_type"] == ["rectangle"]
    top, left, bottom, right = e["top"], e["left"], e["top"] + e["height"], e["left"] + e["width"]
    np.testing.assert_array_equal(
        data[0], [[top, left], [top, right], [bottom, right], [bottom, left]]
    )
    assert meta["features"]["name"] == ["rectangle"] and meta["features"]["roi_type"] == [
        "rectangle"
    ]


def test_real_oval_is_ellipse_on_its_bounding_box():
    ((data, meta, _),) = read_imagej(REAL / "readroi_oval.roi")
    e = expected("oval")
    assert meta["shape_type"] == ["ellipse"]
    assert data[0][:, 0].min() == e["top"] and data[0][:, 0].max() == e["top"] + e["height"]
    assert data[0][:, 1].min() == e["left"] and data[0][:, 1].max() == e["left"] + e["width"]


def test_real_polygon_vertices_in_row_col():
    ((data, meta, _),) = read_imagej(REAL / "readroi_polygon.roi")
    e = expected("polygon")
    assert meta["shape_type"] == ["polygon"]
    np.testing.assert_array_equal(data[0][:, 1], e["x"])
    np.testing.assert_array_equal(data[0][:, 0], e["y"])


@pytest.mark.parametrize("name", ["point", "multipoint"])
def test_real_points_subpixel(name):
    ((data, _meta, kind),) = read_imagej(REAL / f"readroi_{name}.roi")
    e = expected(name)
    assert kind == "points" and len(data) == e["n"]
    np.testing.assert_allclose(data[:, 1], e["x"], rtol=1e-6)
    np.testing.assert_allclose(data[:, 0], e["y"], rtol=1e-6)
    assert data.shape[1] == 2  # ImageJ stores c=z=t=1 for single-plane images: no extra axes


@pytest.mark.parametrize(
    ("name", "shape_type", "roi_type"),
    [
        ("freehand", "polygon", "freehand"),
        ("freeline", "path", "freeline"),
        ("polyline", "path", "polyline"),
        ("line1", "line", "line"),
        ("ellipse", "polygon", "ellipse"),
    ],
)
def test_real_other_types(name, shape_type, roi_type):
    ((data, meta, _),) = read_imagej(REAL / f"readroi_{name}.roi")
    assert meta["shape_type"] == [shape_type]
    assert meta["features"]["roi_type"] == [roi_type]
    roi = ImagejRoi.fromfile(REAL / f"readroi_{name}.roi")
    np.testing.assert_allclose(data[0][:, ::-1], roi.coordinates()[: len(data[0])])


def test_real_freehand_stroke_colour():
    ((_, meta, _),) = read_imagej(REAL / "readroi_freehand.roi")
    assert meta["features"]["stroke_color"] == ["#ffff00"]
    np.testing.assert_allclose(meta["edge_color"][0], [1, 1, 0, 1])


def test_real_composite_keeps_the_hole():
    ((data, meta, _),) = read_imagej(REAL / "readroi_composite-rect-in-rect.roi")
    assert meta["features"]["roi_type"] == ["composite", "composite"]
    hole_of = meta["features"]["hole_of"]
    # one outer rectangle, one hole pointing at it
    assert sorted(hole_of) == [-1, hole_of.index(-1)]
    outer, inner = data[hole_of.index(-1)], data[1 - hole_of.index(-1)]
    assert outer[:, 0].min() < inner[:, 0].min() and inner[:, 0].max() < outer[:, 0].max()


def test_real_roiset_zip_with_stack_positions():
    """A RoiSet saved by ImageJ's ROI Manager (subset of its members), ROIs on stack slices 209-216."""
    path = REAL / "bactunet_RoiSet_subset.zip"
    reader = get_imagej_reader(str(path))
    assert reader is not None
    ((data, meta, kind),) = reader(str(path))
    assert kind == "shapes" and len(data) == 12
    assert set(meta["shape_type"]) == {"polygon"}
    assert meta["metadata"]["axes"] == ("position", "y", "x")
    assert meta["features"]["position"][:3] == [209, 210, 211]
    assert [int(d[0, 0]) for d in data[:3]] == [208, 209, 210]  # 0-based plane
    assert meta["features"]["name"][0] == "0209-0281-0436"  # ImageJ's slice-y-x naming
    first = ImagejRoi.fromfile(path)[0]
    np.testing.assert_allclose(data[0][:, 1:], first.coordinates()[:, ::-1])
    # ImageJ names ROIs slice-y-x: the first vertex sits near y=281, x=436 (row, col)
    assert abs(data[0][:, 1].mean() - 281) < 15 and abs(data[0][:, 2].mean() - 436) < 15


# ----------------------------------------------------------------------------------------- synthetic
def rect(**kw):
    return ImagejRoi(roitype=ROI_TYPE.RECT, left=3, top=4, right=13, bottom=9, **kw)


def save_zip(path, rois):
    with zipfile.ZipFile(path, "w") as archive:
        for i, roi in enumerate(rois):
            archive.writestr(f"{i:04d}.roi", roi.tobytes())
    return path


def test_subpixel_and_rounded_rectangle(tmp_path):
    roi = ImagejRoi(
        roitype=ROI_TYPE.RECT,
        options=ROI_OPTIONS.SUB_PIXEL_RESOLUTION,
        left=3,
        top=4,
        right=14,
        bottom=10,
        xd=3.25,
        yd=4.5,
        widthd=10.5,
        heightd=5.25,
    )
    rounded = rect(rounded_rect_arc_size=6)
    ((data, meta, _),) = read_imagej(save_zip(tmp_path / "r.zip", [roi, rounded]))
    np.testing.assert_array_equal(data[0], [[4.5, 3.25], [4.5, 13.75], [9.75, 13.75], [9.75, 3.25]])
    assert meta["shape_type"] == ["rectangle", "rectangle"]
    assert meta["features"]["arc_size"] == [0, 6]


def test_each_roi_type_in_one_zip(tmp_path):
    pts = [[1.5, 2.5], [10.25, 3.75], [5.0, 9.0]]
    polyline = ImagejRoi.frompoints(pts)
    polyline.roitype = ROI_TYPE.POLYLINE
    traced = ImagejRoi.frompoints(pts)
    traced.roitype = ROI_TYPE.TRACED
    points = ImagejRoi.frompoints(pts)
    points.roitype = ROI_TYPE.POINT
    line = ImagejRoi(
        roitype=ROI_TYPE.LINE, x1=1.0, y1=2.0, x2=30.5, y2=4.0, left=1, top=2, right=31, bottom=4
    )
    oval = ImagejRoi(roitype=ROI_TYPE.OVAL, left=0, top=10, right=20, bottom=15)
    text = rect(subtype=ROI_SUBTYPE.TEXT)
    rois = [rect(name="box"), oval, line, polyline, traced, points, text]
    layers = by_type(read_imagej(save_zip(tmp_path / "RoiSet.zip", rois)))
    shapes, meta = layers["shapes"]
    assert meta["shape_type"] == ["rectangle", "ellipse", "line", "path", "polygon"]
    assert meta["features"]["roi_type"] == ["rectangle", "oval", "line", "polyline", "traced"]
    np.testing.assert_array_equal(shapes[2], [[2.0, 1.0], [4.0, 30.5]])
    np.testing.assert_allclose(shapes[3], np.array(pts)[:, ::-1])
    points_data, pmeta = layers["points"]
    np.testing.assert_allclose(points_data, np.array(pts)[:, ::-1])
    assert pmeta["features"]["feature_index"] == [5, 5, 5]
    assert meta["metadata"]["skipped_rois"] == 1  # the text ROI


def test_hyperstack_positions_prepend_t_z_axes(tmp_path):
    # frompoints takes 0-based positions and stores them 1-based, as ImageJ does
    a = ImagejRoi.frompoints([[1, 1], [5, 1], [5, 5]], z=2, t=0)
    b = ImagejRoi.frompoints([[2, 2], [6, 2], [6, 6]], z=0, t=3)
    ((data, meta, _),) = read_imagej(save_zip(tmp_path / "stack.zip", [a, b]))
    assert meta["metadata"]["axes"] == ("t", "z", "y", "x")
    np.testing.assert_array_equal(data[0][0], [0, 2, 1, 1])
    np.testing.assert_array_equal(data[1][0], [3, 0, 2, 2])
    assert meta["features"]["z_position"] == [3, 1] and meta["features"]["t_position"] == [1, 4]


def test_single_roi_file_and_reader_contract(tmp_path):
    path = tmp_path / "one.roi"
    rect(name="cell").tofile(path)
    reader = get_imagej_reader(str(path))
    ((_data, meta, _),) = reader(str(path))
    assert meta["name"] == "one" and meta["features"]["name"] == ["cell"]


def test_zip_without_rois_is_declined(tmp_path):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    assert get_imagej_reader(str(path)) is None
    not_a_zip = tmp_path / "broken.zip"
    not_a_zip.write_bytes(b"PK\x03\x04 truncated")
    assert get_imagej_reader(str(not_a_zip)) is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"not an roi file at all" * 4, "not an ImageJ ROI"),
        (b"Iout" + b"\x00\xe3\x00" + b"\xff" * 60, r"corrupt|no region"),
    ],
)
def test_bad_roi_files_raise_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.roi"
    path.write_bytes(content)
    reader = get_imagej_reader(str(path))
    assert reader is not None  # a .roi is ours: problems are reported by the reader
    with pytest.raises(RegionFileError, match=message) as info:
        reader(str(path))
    assert "bad.roi" in str(info.value)


def test_bad_member_in_zip_is_named(tmp_path):
    path = tmp_path / "set.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("good.roi", rect().tobytes())
        archive.writestr("bad.roi", b"garbage" * 20)
    with pytest.raises(RegionFileError, match=r"bad\.roi"):
        read_imagej(path)
