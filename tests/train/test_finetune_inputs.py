"""Fine-tuning inputs from files: images, label images and region files -> checked planes; bad input named."""

from __future__ import annotations

import json
import signal
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_medplib.io import labels_to_geojson, shapes_to_geojson, write_geojson
from napari_medplib.train.finetune_data import MAX_PLANES, MAX_SIDE, FinetuneInputError
from napari_medplib.train.finetune_inputs import (
    ProgressPrinter,
    StopOnInterrupt,
    check_out_folder,
    load_annotated_planes,
    rasterise_regions,
    read_image,
)

SIZE = 64


def blobs(n: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A grey plane with ``n`` bright squares of different sizes, and their instance labels."""
    rng = np.random.default_rng(seed)
    image = rng.normal(30, 4, (SIZE, SIZE))
    labels = np.zeros((SIZE, SIZE), np.int32)
    for i in range(n):
        r, c = 6 + 18 * (i // 3), 5 + 20 * (i % 3)
        labels[r : r + 8 + i % 3, c : c + 9] = i + 1
    image[labels > 0] += 90
    return np.clip(image, 0, 255).astype(np.uint8), labels


def write(path: Path, array: np.ndarray, **kwargs) -> Path:
    kwargs.setdefault("photometric", "minisblack")  # a (3, H, W) stack stays three planes
    tifffile.imwrite(path, array, **kwargs)
    return path


@pytest.fixture
def plane(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    image, labels = blobs()
    return write(tmp_path / "cells.tif", image), write(tmp_path / "cells_labels.tif", labels), labels


# ------------------------------------------------------------------------------------ images and label images
def test_tiff_plane_with_label_image(plane):
    image_path, labels_path, labels = plane
    planes = load_annotated_planes([image_path], [labels_path])
    assert len(planes) == 1
    assert planes[0].name == "cells.tif" and planes[0].image.shape == (SIZE, SIZE)
    np.testing.assert_array_equal(planes[0].labels, labels)
    assert set(planes[0].classes.values()) == {"object"}


def test_tiff_stack_gives_its_annotated_planes(tmp_path):
    image, labels = blobs()
    stack = write(tmp_path / "stack.tif", np.stack([image, image, image]))
    label_stack = write(tmp_path / "stack_labels.tif", np.stack([labels, np.zeros_like(labels), labels]))
    planes = load_annotated_planes([stack], [label_stack], "nucleus")
    assert [p.name for p in planes] == ["stack.tif plane 0", "stack.tif plane 2"]
    assert {c for p in planes for c in p.classes.values()} == {"nucleus"}


def test_multichannel_stacks_keep_channels_last(tmp_path):
    image, labels = blobs()
    two = np.stack([image, 255 - image], -1)
    stack = write(tmp_path / "zc.tif", np.stack([two] * 3))  # (Z, H, W, C) as numpy has it
    ome = write(tmp_path / "zc.ome.tif", np.stack([np.stack([image, image])] * 3), metadata={"axes": "ZCYX"})
    for path in (stack, ome):
        read = read_image(path)
        assert read.stack and read.channels == 2 and read.data.shape == (3, SIZE, SIZE, 2)
    label_stack = write(tmp_path / "zc_labels.tif", np.stack([labels] * 3))
    planes = load_annotated_planes([stack, ome], [label_stack, label_stack])
    assert len(planes) == 6 and planes[0].image.shape == (SIZE, SIZE, 2)


def test_png_image_and_labels(tmp_path):
    image, labels = blobs()
    Image.fromarray(np.stack([image] * 3, -1)).save(tmp_path / "rgb.png")
    Image.fromarray(labels.astype(np.uint16)).save(tmp_path / "labels16.png")
    palette = Image.fromarray(labels.astype(np.uint8), mode="L").convert("P")  # indices are the ids
    palette.save(tmp_path / "labels_p.png")
    planes = load_annotated_planes([tmp_path / "rgb.png"] * 2, [tmp_path / "labels16.png", tmp_path / "labels_p.png"])
    assert planes[0].image.shape == (SIZE, SIZE, 3)
    for p in planes:
        np.testing.assert_array_equal(p.labels, labels)


def test_whole_number_float_labels_are_read_as_ids(tmp_path, plane):
    image_path, _, labels = plane
    floats = write(tmp_path / "float_labels.tif", labels.astype(np.float32))  # as Fiji writes label maps
    np.testing.assert_array_equal(load_annotated_planes([image_path], [floats])[0].labels, labels)


# ------------------------------------------------------------------------------------ region files
def test_geojson_is_rasterised_pixel_exact_with_class_names(tmp_path, plane):
    image_path, _, labels = plane
    labels = labels.copy()
    labels[40:54, 4:18] = 7
    labels[44:50, 8:14] = 0  # a ring: its hole stays unlabelled
    labels[40:46, 30:36] = labels[50:56, 40:46] = 8  # one object in two parts
    classes = ["nucleus"] * 3 + ["Tumor: Positive"] * 3 + ["ring", "pair"]
    document = labels_to_geojson(labels, {"features": {"index": list(range(1, 9)), "class": classes}})
    write_geojson(tmp_path / "cells.geojson", document)
    (p,) = load_annotated_planes([image_path], [tmp_path / "cells.geojson"])
    np.testing.assert_array_equal(p.labels, labels)  # pixel corners -> pixel centres, no grown outlines
    assert [p.classes[i] for i in range(1, 9)] == ["nucleus"] * 3 + ["tumor: positive"] * 3 + ["ring", "pair"]
    (q,) = load_annotated_planes([image_path], [tmp_path / "cells.geojson"], "cell")
    assert set(q.classes.values()) == {"cell"}


def test_geojson_planes_land_on_their_stack_planes(tmp_path):
    image, _ = blobs()
    stack = write(tmp_path / "stack.tif", np.stack([image] * 3))
    squares = [np.array([[z, r, c], [z, r, c + 10], [z, r + 10, c + 10], [z, r + 10, c]], float)
               for z, r, c in [(1, 5, 5), (1, 30, 30), (2, 5, 30), (2, 40, 5)]]
    document = shapes_to_geojson(squares, {"shape_type": "polygon", "features": {"class": ["a", "a", "b", ""]}})
    write_geojson(tmp_path / "stack.geojson", document)
    labels, classes = rasterise_regions(tmp_path / "stack.geojson", read_image(stack))
    assert labels.shape == (3, SIZE, SIZE)
    assert [sorted(set(np.unique(labels[z])) - {0}) for z in range(3)] == [[], [1, 2], [3, 4]]
    assert np.count_nonzero(labels == 1) == 100  # corners 5..15 cover pixels 5..14
    assert classes == {1: "a", 2: "a", 3: "b"}
    planes = load_annotated_planes([stack], [tmp_path / "stack.geojson"])
    assert [p.name for p in planes] == ["stack.tif plane 1", "stack.tif plane 2"]
    assert planes[1].classes == {3: "b", 4: "object"}


def test_imagej_roiset_and_single_roi(tmp_path, plane):
    from roifile import ImagejRoi, roiwrite

    image_path, _, _ = plane
    corners = [(4, 4), (4, 30), (30, 4), (40, 40), (20, 50)]
    rois = [ImagejRoi.frompoints(np.array([[x, y], [x + 8, y], [x + 8, y + 6], [x, y + 6]], float), name=f"r{i}")
            for i, (x, y) in enumerate(corners)]
    roiwrite(tmp_path / "RoiSet.zip", rois)
    (p,) = load_annotated_planes([image_path], [tmp_path / "RoiSet.zip"])
    assert p.ids == [1, 2, 3, 4, 5] and set(p.classes.values()) == {"object"}  # ROI names are no classes
    assert np.count_nonzero(p.labels == 1) == 48 and p.labels[4:10, 4:12].all()
    rois[0].tofile(tmp_path / "one.roi")
    labels, _ = rasterise_regions(tmp_path / "one.roi", read_image(image_path))
    assert np.array_equal(labels > 0, p.labels == 1)


def coco(images: list[str], annotations: list[dict]) -> dict:
    return {"images": [{"id": i + 1, "file_name": n, "width": SIZE, "height": SIZE} for i, n in enumerate(images)],
            "categories": [{"id": 1, "name": "nucleus"}, {"id": 2, "name": "mitosis"}],
            "annotations": annotations}


def square(ann_id: int, image_id: int, category: int, x: float, y: float, side: float = 8) -> dict:
    ring = [x, y, x + side, y, x + side, y + side, x, y + side]
    return {"id": ann_id, "image_id": image_id, "category_id": category, "bbox": [x, y, side, side],
            "segmentation": [ring], "area": side * side, "iscrowd": 0}


def test_coco_outlines_with_category_names(tmp_path, plane):
    image_path, _, _ = plane
    anns = [square(1, 2, 1, 2, 2), square(2, 2, 1, 20, 2), square(3, 2, 2, 40, 2), square(4, 2, 1, 2, 30),
            square(5, 1, 2, 30, 30)]  # the last one annotates the file's other image
    (tmp_path / "coco.json").write_text(json.dumps(coco(["other.tif", "cells.tif"], anns)))
    (p,) = load_annotated_planes([image_path], [tmp_path / "coco.json"])
    assert p.classes == {1: "nucleus", 2: "nucleus", 3: "mitosis", 4: "nucleus"}
    assert all(np.count_nonzero(p.labels == i) == 64 for i in p.ids)  # the outline, not also its box
    assert p.labels[30:38, 30:38].max() == 0


def test_coco_of_one_image_stack(tmp_path):
    image, _ = blobs()
    stack = write(tmp_path / "stack.tif", np.stack([image] * 2))
    anns = [square(1, 1, 1, 2, 2), square(2, 1, 1, 20, 2), square(3, 2, 2, 40, 2), square(4, 2, 1, 2, 30)]
    (tmp_path / "coco.json").write_text(json.dumps(coco(["z0.png", "z1.png"], anns)))  # one image per plane
    planes = load_annotated_planes([stack], [tmp_path / "coco.json"])
    assert [p.classes for p in planes] == [{1: "nucleus", 2: "nucleus"}, {3: "mitosis", 4: "nucleus"}]


# ------------------------------------------------------------------------------------ bad input
def bad(tmp_path: Path, plane) -> dict:
    """Named bad inputs: (images, labels) -> part of the message."""
    image_path, labels_path, labels = plane
    (tmp_path / "garbage.tif").write_bytes(b"this is not a TIFF file at all")
    rgb = write(tmp_path / "rgb_labels.tif", np.stack([labels.astype(np.uint8)] * 3, -1), photometric="rgb")
    Image.fromarray(np.stack([labels.astype(np.uint8)] * 3, -1)).save(tmp_path / "rgb_labels.png")
    Image.fromarray(labels.astype(np.uint8)).save(tmp_path / "labels.jpg")
    small = write(tmp_path / "small_labels.tif", labels[:40])
    stack_labels = write(tmp_path / "stack_labels.tif", np.stack([labels, labels]))
    fractional = write(tmp_path / "fraction.tif", labels * 0.5)
    wide = write(tmp_path / "wide.tif", np.zeros((8, MAX_SIDE + 1), np.uint8))
    Image.new("L", (MAX_SIDE + 1, 8)).save(tmp_path / "wide.png")
    deep = write(tmp_path / "deep.tif", np.zeros((MAX_PLANES + 1, 8, 8), np.uint8))
    (tmp_path / "points.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}, "properties": {}}]}))
    far = [np.array([[100, 100], [100, 110], [110, 110], [110, 100]], float)]
    write_geojson(tmp_path / "far.geojson", shapes_to_geojson(far, {"shape_type": "polygon"}))
    on_z = [np.array([[4, 5, 5], [4, 5, 15], [4, 15, 15]], float)]
    write_geojson(tmp_path / "z4.geojson", shapes_to_geojson(on_z, {"shape_type": "polygon"}))
    (tmp_path / "boxes.json").write_text(json.dumps(coco(["cells.tif"], [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 8]}])))
    (tmp_path / "coco_other.json").write_text(json.dumps(coco(["a.tif", "b.tif"], [square(1, 1, 1, 2, 2)])))
    (tmp_path / "notes.txt").write_text("labels")
    return {
        "missing image": ([tmp_path / "nope.tif"], [labels_path], "nope.tif: no such image file"),
        "missing labels": ([image_path], [tmp_path / "nope_labels.tif"], "nope_labels.tif: no such labels file"),
        "missing regions": ([image_path], [tmp_path / "nope.geojson"], "nope.geojson: no such regions file"),
        "unreadable": ([tmp_path / "garbage.tif"], [labels_path], "garbage.tif: not a readable TIFF"),
        "unsupported labels": ([image_path], [tmp_path / "notes.txt"], "unsupported labels file"),
        "shape mismatch": ([image_path], [small], "small_labels.tif: labels of 40 x 64 pixels do not match cells.tif"),
        "stack labels": ([image_path], [stack_labels], "stack_labels.tif: holds 2 planes of 64 x 64 but cells.tif"),
        "rgb labels": ([image_path], [rgb], "rgb_labels.tif: is an RGB image"),
        "rgb png labels": ([image_path], [tmp_path / "rgb_labels.png"], "rgb_labels.png: is an RGB image"),
        "jpeg labels": ([image_path], [tmp_path / "labels.jpg"], "JPEG changes pixel values"),
        "fractional": ([image_path], [fractional], "fraction.tif: holds fractional values"),
        "count": ([image_path, image_path], [labels_path], "2 image file(s) but 1 labels file(s)"),
        "wide tiff": ([wide], [labels_path], f"larger than the {MAX_SIDE} pixels"),
        "wide png": ([tmp_path / "wide.png"], [labels_path], f"larger than the {MAX_SIDE} pixels"),
        "deep stack": ([deep], [labels_path], f"more than the {MAX_PLANES}"),
        "points only": ([image_path], [tmp_path / "points.geojson"], "points.geojson: holds no outlined objects"),
        "outside": ([image_path], [tmp_path / "far.geojson"], "far.geojson: no annotated object lies on cells.tif"),
        "other plane": ([image_path], [tmp_path / "z4.geojson"], "z4.geojson: has annotations on plane 4"),
        "coco boxes": ([image_path], [tmp_path / "boxes.json"], "boxes only"),
        "coco other image": ([image_path], [tmp_path / "coco_other.json"], "none named cells.tif"),
    }


BAD_CASES = ["missing image", "missing labels", "missing regions", "unreadable", "unsupported labels",
             "shape mismatch", "stack labels", "rgb labels", "rgb png labels", "jpeg labels", "fractional", "count",
             "wide tiff", "wide png", "deep stack", "points only", "outside", "other plane", "coco boxes",
             "coco other image"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_names_the_file_and_the_fix(tmp_path, plane, case):
    images, labels, message = bad(tmp_path, plane)[case]
    with pytest.raises(FinetuneInputError, match=_escape(message)):
        load_annotated_planes(images, labels)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_left_out_annotations_are_noted(tmp_path, plane):
    image_path, _, labels = plane
    shapes = [np.array([[2, 2], [2, 12], [12, 12], [12, 2]], float), np.array([[200, 200], [200, 210], [210, 210]]),
              np.array([[30, 30], [40, 40]], float)]
    for extra in ([20, 2], [20, 20], [30, 20]):
        shapes.append(np.array([[extra[0], extra[1]], [extra[0], extra[1] + 8], [extra[0] + 8, extra[1] + 8],
                                [extra[0] + 8, extra[1]]], float))
    document = shapes_to_geojson(shapes, {"shape_type": ["polygon", "polygon", "path", "polygon", "polygon",
                                                         "polygon"]})
    write_geojson(tmp_path / "mixed.geojson", document)
    notes: list[str] = []
    (p,) = load_annotated_planes([image_path], [tmp_path / "mixed.geojson"], note=notes.append)
    assert len(p.ids) == 4
    assert notes and "1 outside the image" in notes[0] and "1 lines or paths" in notes[0]


# ------------------------------------------------------------------------------------ output folder, run helpers
def test_output_folder_checks(tmp_path):
    assert check_out_folder(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    check_out_folder(tmp_path / "empty")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    with pytest.raises(FinetuneInputError, match="not empty"):
        check_out_folder(tmp_path / "used")
    (tmp_path / "run" / "finetune").mkdir(parents=True)
    (tmp_path / "run" / "finetune" / "run.json").write_text("{}")
    check_out_folder(tmp_path / "run")  # an interrupted run: resumed by the core
    (tmp_path / "run" / "DONE").write_text("")
    with pytest.raises(FinetuneInputError, match="finished"):
        check_out_folder(tmp_path / "run")


def test_progress_lines(capsys):
    printer = ProgressPrinter(25, every=10)
    printer.phase("loading the model", 0, 1)
    printer.phase("measuring the model before", 0, 3)
    printer.phase("measuring the model before", 1, 3)
    for step in range(3, 26):
        printer.phase(f"training (loss {1 / step:.3f})", step, 25)
        printer.log({"step": step, "loss": 1 / step, "bce": 0.1, "dice": 0.2, "seconds": 0.01})
    lines = capsys.readouterr().err.splitlines()
    assert lines[:3] == ["loading the model ...", "measuring the model before (3 held-out objects) ...",
                         "training 25 steps (resuming after step 2)"]
    assert [line.split(":")[0] for line in lines[3:]] == ["step 3/25", "step 10/25", "step 20/25", "step 25/25"]


def test_ctrl_c_asks_to_stop_then_quits(capsys):
    before = signal.getsignal(signal.SIGINT)
    with StopOnInterrupt() as stop:
        assert not stop()
        signal.raise_signal(signal.SIGINT)
        assert stop()
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    assert "Ctrl-C again" in capsys.readouterr().err


def test_zip_without_rois_is_named(tmp_path, plane):
    image_path, _, _ = plane
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as archive:
        archive.writestr("readme.txt", "no rois")
    with pytest.raises(FinetuneInputError, match="empty.zip"):
        load_annotated_planes([image_path], [tmp_path / "empty.zip"])
