"""COCO annotation JSON -> napari Shapes (boxes, segmentations) and Points (keypoints) layer data.

A file is COCO when its top level is an object with ``images``, ``annotations`` and ``categories``
lists (:func:`is_coco`); anything else is declined. Per annotation:

* ``bbox`` [x, y, w, h] -> a ``rectangle`` in the *boxes* layer;
* polygon ``segmentation`` (list of flat [x0, y0, x1, y1, ...] lists) -> one ``polygon`` per list in
  the *segmentation* layer;
* RLE ``segmentation`` (``counts`` a list = uncompressed, or a string = compressed) -> decoded to a
  mask, outlined along pixel edges (holes as ``hole_of`` shapes, see :mod:`._common`);
* ``keypoints`` [x, y, v] * K -> rows of a Points layer for every labelled keypoint (v > 0), with
  features ``keypoint`` (name from the category's ``keypoints`` list) and ``visibility`` (1 = labelled
  but hidden, 2 = visible).

Features: ``class`` (category name), ``category_id``, ``annotation_id``, ``image_id``, ``image``
(file name), ``iscrowd``, ``score`` where present, ``feature_index`` (annotation index).
Colours: one per category.

Several images in one file: all annotations are returned in one layer set with a leading image axis
(plane index of each image with images sorted by ``file_name``, as a folder of images opens as a
stack in napari), and the ``image``/``image_id`` features; a single-image file stays 2-D.
Coordinates: COCO (x, y) -> napari (row, col), unchanged otherwise.

Limits: RLE masks as in :mod:`.coco_rle` (outlined from their runs, so memory follows the file);
ids must be numbers or text. Shapes napari cannot draw are dropped with a warning (see
:mod:`._common`); every other problem raises :class:`RegionFileError` naming the file.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._common import (
    FeatureTable,
    LayerData,
    file_error,
    finish_layers,
    layer_name,
    palette_rgb,
    points_layer,
    prepend_axes,
    reading,
    shapes_layer,
)
from .coco_rle import rle_boxes, rle_runs

REQUIRED_KEYS = ("images", "annotations", "categories")
FIX = "Export the COCO annotations again"


def is_coco(document: Any) -> bool:
    """True for a parsed JSON document with the three COCO lists."""
    return isinstance(document, Mapping) and all(
        isinstance(document.get(k), list) for k in REQUIRED_KEYS
    )


def load_json(path: str | Path) -> Any:
    """Parse a JSON file; raises :class:`RegionFileError` naming the problem."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise file_error(
            path, f"cannot be read ({exc.strerror})", "Check the path and permissions"
        ) from exc
    except UnicodeDecodeError as exc:
        raise file_error(path, f"is not UTF-8 text (byte {exc.start})", FIX) from None
    if not text.strip():
        raise file_error(path, "the file is empty", "Export the COCO annotations again")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise file_error(
            path,
            f"is not valid JSON ({exc.msg} at line {exc.lineno}); the file may be truncated",
            "Export the COCO annotations again",
        ) from exc
    except RecursionError:
        raise file_error(path, "is nested too deeply to be an annotation file", FIX) from None


def read_coco(path: str | Path) -> list[LayerData]:
    """Read a COCO annotation file into up to three layers: boxes, segmentation, keypoints.

    Raises only :class:`RegionFileError` (naming the file).
    """
    with reading(path, FIX):
        document = load_json(path)
        if not is_coco(document):
            raise file_error(
                path,
                "is JSON but not a COCO annotation file (needs 'images', 'annotations' and "
                "'categories' lists)",
                "Open a COCO instances/keypoints file",
            )
        return coco_to_layers(document, path)


def _id(value: Any, what: str, path: str | Path) -> Any:
    """An id as a dict key: numbers and text only (a list or object cannot be looked up)."""
    if value is None or isinstance(value, int | float | str):
        return value
    raise file_error(
        path, f"{what} id {str(value)[:40]} is a {type(value).__name__}", "Ids must be numbers or text"
    )


def coco_to_layers(
    document: Mapping[str, Any], path: str | Path = "annotations.json"
) -> list[LayerData]:
    """Convert a parsed COCO document (see module docs) into napari layer data."""
    categories = {
        _id(c.get("id"), "category", path): c for c in document["categories"] if isinstance(c, Mapping)
    }
    colours = {cid: palette_rgb(i) for i, cid in enumerate(categories)}
    images = {
        _id(im.get("id"), "image", path): im for im in document["images"] if isinstance(im, Mapping)
    }
    order = sorted(images, key=lambda i: (str(images[i].get("file_name", "")), str(i)))
    plane = {image_id: i for i, image_id in enumerate(order)} if len(images) > 1 else {}

    boxes, segs, kps = _Shapes(), _Shapes(), _Points()
    for index, ann in enumerate(document["annotations"]):
        if not isinstance(ann, Mapping):
            raise file_error(path, f"annotation {index} is not an object", "Export the file again")
        image_id = _id(ann.get("image_id"), "image", path)
        category_id = _id(ann.get("category_id"), "category", path)
        if images and image_id not in images:
            raise file_error(
                path,
                f"annotation {ann.get('id', index)} refers to image_id {image_id!r}, which is not "
                "in 'images'",
                "Export the file again with its image list",
            )
        category = categories.get(category_id, {})
        if not isinstance(category, Mapping):
            category = {}
        row = {
            "class": str(category.get("name", "")),
            "category_id": ann.get("category_id"),
            "annotation_id": ann.get("id", index),
            "image_id": image_id,
            "image": str(images.get(image_id, {}).get("file_name", "")),
            "iscrowd": _flag(ann.get("iscrowd", 0)),
            "feature_index": index,
        }
        if "score" in ann:
            row["score"] = ann["score"]
        rgb = colours.get(category_id)
        leading = [float(plane[image_id])] if plane else []
        try:
            _add_annotation(ann, category, row, rgb, leading, boxes, segs, kps)
        except (ValueError, TypeError, KeyError, IndexError, OverflowError, AttributeError) as exc:
            raise file_error(
                path,
                f"annotation {ann.get('id', index)} is malformed ({exc})",
                "bbox must be [x, y, w, h]; segmentation a list of [x, y, ...] lists or an RLE "
                "{'size', 'counts'}; keypoints [x, y, v] triples",
            ) from exc

    metadata = {
        "source": str(path),
        "format": "coco",
        "axes": ("image", "y", "x") if plane else ("y", "x"),
        "images": [str(images[i].get("file_name", "")) for i in order],
        "categories": [str(c.get("name", "")) for c in categories.values()],
    }
    if not (boxes.shapes or segs.shapes or kps.points):
        raise file_error(
            path,
            f"has {len(document['annotations'])} annotation(s) but no box, segmentation or keypoint",
            "Open a COCO instances or keypoints file that has annotations",
        )
    name = layer_name(path)
    if plane:  # say which plane is which image: napari shows plane 0 over whatever image is open
        name = f"{name} ({len(order)} images, plane = image)"
        listed = ", ".join(f"{k}: {metadata['images'][k] or order[k]}" for k in range(min(len(order), 8)))
        more = f", ... ({len(order) - 8} more)" if len(order) > 8 else ""
        warnings.warn(
            f"{Path(path).name} annotates {len(order)} images; they open as planes of one stack, sorted by "
            f"file name ({listed}{more}). Open the images as a stack (a folder of images, same order) to see "
            "each image with its annotations, or use the slider to pick the plane of the image you have open.",
            UserWarning, stacklevel=2)
    out = []
    if boxes.shapes:
        out.append(boxes.layer(f"{name} boxes", metadata))
    if segs.shapes:
        out.append(segs.layer(f"{name} segmentation", metadata))
    if kps.points:
        out.append(
            points_layer(
                f"{name} keypoints", np.asarray(kps.points, float), kps.rows, kps.rgb, metadata
            )
        )
    return finish_layers(path, out, FIX)


def _flag(value: Any) -> int:
    """COCO 0/1 flags (iscrowd): anything not a finite whole number reads as 0."""
    try:
        number = float(value or 0)
    except (TypeError, ValueError):
        return 0
    return int(number) if number == number and abs(number) < 2**31 else 0


def _add_annotation(ann, category, row, rgb, leading, boxes, segs, kps) -> None:
    bbox = ann.get("bbox")
    if bbox is not None and len(bbox) == 4 and float(bbox[2]) > 0 and float(bbox[3]) > 0:
        x, y, w, h = (float(v) for v in bbox)
        corners = np.array([[y, x], [y, x + w], [y + h, x + w], [y + h, x]], float)
        boxes.add(prepend_axes(corners, leading), "rectangle", row, rgb)
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        for flat in seg:
            xy = np.asarray(flat, dtype=float).reshape(-1, 2)
            if len(xy) >= 3:
                segs.add(prepend_axes(xy[:, ::-1].copy(), leading), "polygon", row, rgb)
    elif isinstance(seg, Mapping):
        _add_rle(seg, row, rgb, leading, segs)
    keypoints = ann.get("keypoints")
    if keypoints:
        names = category.get("keypoints") or []
        triples = np.asarray(keypoints, dtype=float).reshape(-1, 3)
        for k, (x, y, v) in enumerate(triples):
            if v > 0:
                kps.add(
                    prepend_axes(np.array([[y, x]]), leading)[0],
                    {
                        **row,
                        "keypoint": names[k] if k < len(names) else str(k),
                        "visibility": int(v),
                    },
                    rgb,
                )


def _add_rle(seg, row, rgb, leading, segs) -> None:
    from .outlines import boxes_to_polygons

    runs, height, width = rle_runs(seg)
    for exterior, holes in boxes_to_polygons(rle_boxes(runs, height, width)):
        parent = segs.add(prepend_axes(exterior[:, ::-1].copy(), leading), "polygon", row, rgb)
        for hole in holes:
            segs.add(
                prepend_axes(hole[:, ::-1].copy(), leading),
                "polygon",
                {**row, "hole_of": parent},
                rgb,
            )


class _Shapes:
    def __init__(self) -> None:
        self.shapes: list[np.ndarray] = []
        self.types: list[str] = []
        self.rgb: list[Any] = []
        self.rows = FeatureTable({"feature_index": -1, "hole_of": -1, "class": ""})

    def add(self, coords, kind, row, rgb) -> int:
        self.shapes.append(coords)
        self.types.append(kind)
        self.rgb.append(rgb)
        self.rows.add(row)
        return len(self.shapes) - 1

    def layer(self, name, metadata) -> LayerData:
        alpha = [0.0 if h >= 0 else 0.25 for h in self.rows.columns["hole_of"]]
        return shapes_layer(name, self.shapes, self.types, self.rows, self.rgb, metadata, alpha)


class _Points:
    def __init__(self) -> None:
        self.points: list[np.ndarray] = []
        self.rgb: list[Any] = []
        self.rows = FeatureTable({"feature_index": -1, "class": ""})

    def add(self, point, row, rgb) -> None:
        self.points.append(point)
        self.rgb.append(rgb)
        self.rows.add(row)
