"""COCO reader: detection, boxes, polygons, RLE (both forms), keypoints, several images, errors."""

import json

import numpy as np
import pytest
from io_testdata import REAL

from napari_medplib.io import RegionFileError, read_coco
from napari_medplib.io.coco_rle import (
    decode_counts_string,
    encode_counts_string,
    mask_to_runs,
    rle_to_mask,
)
from napari_medplib.io.napari_io import get_coco_reader
from napari_medplib.io.outlines import rasterize_polygons


def layers_by_name(layers):
    return {meta["name"].split(" ")[-1]: (data, meta, kind) for data, meta, kind in layers}


def coco(annotations, images=None, categories=None):
    return {
        "images": images
        if images is not None
        else [{"id": 1, "file_name": "a.png", "height": 50, "width": 60}],
        "annotations": annotations,
        "categories": categories
        if categories is not None
        else [{"id": 1, "name": "cell"}, {"id": 2, "name": "nucleus"}],
    }


def test_bbox_and_polygon_axis_order(write_json):
    path = write_json(
        "ann.json",
        coco(
            [
                {
                    "id": 10,
                    "image_id": 1,
                    "category_id": 2,
                    "bbox": [5, 20, 30, 4],
                    "segmentation": [[5, 20, 35, 20, 35, 24], [40, 1, 41, 1, 41, 3, 40, 3]],
                },
            ]
        ),
    )
    layers = layers_by_name(get_coco_reader(str(path))(str(path)))
    boxes, bmeta, kind = layers["boxes"]
    assert kind == "shapes" and bmeta["shape_type"] == ["rectangle"]
    # x 5..35 (cols), y 20..24 (rows): a wide, flat box
    np.testing.assert_array_equal(boxes[0], [[20, 5], [20, 35], [24, 35], [24, 5]])
    segs, smeta, _ = layers["segmentation"]
    assert smeta["shape_type"] == ["polygon", "polygon"]
    np.testing.assert_array_equal(segs[0], [[20, 5], [20, 35], [24, 35]])
    f = smeta["features"]
    assert f["class"] == ["nucleus", "nucleus"] and f["annotation_id"] == [10, 10]
    assert f["image"] == ["a.png", "a.png"] and f["feature_index"] == [0, 0]


def test_uncompressed_rle_with_hole(write_json):
    mask = np.zeros((12, 10), bool)
    mask[2:10, 1:8] = True
    mask[4:7, 3:5] = False
    runs = mask_to_runs(mask)
    path = write_json(
        "rle.json",
        coco(
            [
                {
                    "id": 1,
                    "image_id": 1,
                    "category_id": 1,
                    "iscrowd": 1,
                    "segmentation": {"size": [12, 10], "counts": runs},
                }
            ]
        ),
    )
    ((segs, meta, _),) = read_coco(path)
    assert meta["features"]["hole_of"] == [-1, 0]
    rings = [(segs[0][:, ::-1], [segs[1][:, ::-1]])]
    np.testing.assert_array_equal(rasterize_polygons(rings, mask.shape), mask)


def test_compressed_rle_written_by_pycocotools():
    """The counts string was produced by pycocotools.mask.encode, the reference COCO encoder."""
    doc = json.loads((REAL / "pycocotools_compressed_rle.json").read_text())
    annotation = doc["annotations"][0]
    reference = np.load(REAL / "pycocotools_compressed_rle_mask.npy")
    mask = rle_to_mask(annotation["segmentation"])
    np.testing.assert_array_equal(mask, reference)
    assert mask.sum() == annotation["area"]  # pycocotools.mask.area
    ys, xs = np.nonzero(mask)
    assert [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1] == annotation[
        "bbox"
    ]
    assert encode_counts_string(mask_to_runs(reference)) == annotation["segmentation"]["counts"]


def test_compressed_rle_file_becomes_outlines_that_rasterise_back():
    layers = layers_by_name(read_coco(REAL / "pycocotools_compressed_rle.json"))
    segs, meta, _ = layers["segmentation"]
    hole_of = meta["features"]["hole_of"]
    polygons = [
        (s[:, ::-1], [segs[j][:, ::-1] for j, h in enumerate(hole_of) if h == i])
        for i, s in enumerate(segs)
        if hole_of[i] == -1
    ]
    reference = np.load(REAL / "pycocotools_compressed_rle_mask.npy")
    np.testing.assert_array_equal(rasterize_polygons(polygons, reference.shape), reference)
    assert meta["features"]["class"][0] == "nucleus"


@pytest.mark.parametrize("seed", range(5))
def test_rle_string_codec_round_trip(seed):
    mask = np.random.default_rng(seed).random((17, 23)) > 0.6
    runs = mask_to_runs(mask)
    assert decode_counts_string(encode_counts_string(runs)) == runs
    np.testing.assert_array_equal(
        rle_to_mask({"size": [17, 23], "counts": encode_counts_string(runs)}), mask
    )


def test_keypoints_with_names_and_visibility(write_json):
    categories = [{"id": 1, "name": "person", "keypoints": ["nose", "left_eye", "right_eye"]}]
    path = write_json(
        "kp.json",
        coco(
            [
                {
                    "id": 3,
                    "image_id": 1,
                    "category_id": 1,
                    "bbox": [0, 0, 10, 10],
                    "keypoints": [4, 2, 2, 0, 0, 0, 7, 9, 1],
                    "num_keypoints": 2,
                },
            ],
            categories=categories,
        ),
    )
    layers = layers_by_name(read_coco(path))
    points, meta, kind = layers["keypoints"]
    assert kind == "points"
    np.testing.assert_array_equal(points, [[2, 4], [9, 7]])  # unlabelled (v=0) keypoint dropped
    assert meta["features"]["keypoint"] == ["nose", "right_eye"]
    assert meta["features"]["visibility"] == [2, 1]


def test_several_images_get_a_leading_image_axis(write_json):
    images = [{"id": 5, "file_name": "b.png"}, {"id": 9, "file_name": "a.png"}]
    path = write_json(
        "multi.json",
        coco(
            [
                {"id": 1, "image_id": 5, "category_id": 1, "bbox": [1, 2, 3, 4]},
                {"id": 2, "image_id": 9, "category_id": 2, "bbox": [1, 2, 3, 4]},
            ],
            images=images,
        ),
    )
    with pytest.warns(UserWarning, match=r"annotates 2 images.*0: a\.png, 1: b\.png"):
        ((boxes, meta, _),) = read_coco(path)
    assert "2 images, plane = image" in meta["name"]  # the layer says which plane is which image
    assert meta["metadata"]["axes"] == ("image", "y", "x")
    assert meta["metadata"]["images"] == ["a.png", "b.png"]  # planes in file-name order
    assert [b[0, 0] for b in boxes] == [1, 0]
    assert meta["features"]["image"] == ["b.png", "a.png"]


def test_real_pycococreator_export():
    """coco_example.json was written by pycococreator (see data/real/SOURCES.md)."""
    layers = layers_by_name(read_coco(REAL / "pycococreator_coco_example.json"))
    boxes, bmeta, _ = layers["boxes"]
    assert len(boxes) == 3 and set(bmeta["features"]["class"]) == {"blueberry"}
    np.testing.assert_array_equal(boxes[0], [[136, 225], [136, 256], [172, 256], [172, 225]])
    segs, smeta, _ = layers["segmentation"]
    assert smeta["features"]["iscrowd"][:2] == [0, 0]
    first = segs[smeta["features"]["annotation_id"].index(1)]
    assert len(first) == 107
    # the polygon traces pixel edges of the box [x 225..256, y 136..172]
    assert first[:, 1].min() == 224.5 and first[:, 1].max() == 255 and first[:, 0].max() == 171.5


def test_real_datumaro_keypoints_file():
    layers = layers_by_name(read_coco(REAL / "datumaro_person_keypoints_val.json"))
    points, meta, _ = layers["keypoints"]
    assert len(points) == 6 and meta["features"]["class"] == ["a"] * 3 + ["b"] * 3
    np.testing.assert_array_equal(points[0], [2, 1])
    _segs, smeta, _ = layers["segmentation"]
    assert smeta["features"]["iscrowd"][-1] == 1  # the RLE annotation became outline polygons


@pytest.mark.parametrize(
    "content",
    [
        '{"type": "FeatureCollection", "features": []}',
        '{"images": [], "annotations": []}',
        '{"images": {}, "annotations": [], "categories": []}',
        '[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.9}]',  # a results file
        '{"images": [], "annotations": [',  # truncated: cannot tell it is COCO
        "",
        "not json",
    ],
)
def test_non_coco_json_is_declined(write_json, content):
    assert get_coco_reader(str(write_json("other.json", content))) is None


def test_malformed_annotation_raises_clear_error(write_json):
    path = write_json(
        "broken.json",
        coco([{"id": 4, "image_id": 1, "category_id": 1, "segmentation": [[1, 2, 3]]}]),
    )
    reader = get_coco_reader(str(path))
    with pytest.raises(RegionFileError, match="annotation 4 is malformed") as info:
        reader(str(path))
    assert "broken.json" in str(info.value)
    bad_rle = write_json(
        "rle.json",
        coco(
            [
                {
                    "id": 5,
                    "image_id": 1,
                    "category_id": 1,
                    "segmentation": {"size": [4, 4], "counts": [3, 2]},
                }
            ]
        ),
    )
    with pytest.raises(RegionFileError, match="run lengths"):
        read_coco(bad_rle)
    unknown = write_json(
        "img.json", coco([{"id": 6, "image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1]}])
    )
    with pytest.raises(RegionFileError, match="image_id 99"):
        read_coco(unknown)
