"""Fine-tuning inputs from files: images with label images or region files -> `AnnotatedPlane`s (no torch).

What ``medplib finetune`` reads, checked before anything large is allocated:

* images: TIFF / OME-TIFF / ImageJ TIFF (one plane, or one stack axis such as Z or T: a (Z, H, W) or
  (Z, H, W, C) multi-page TIFF is a stack of planes) and PNG / JPEG. Sizes come from the file header and
  are refused above `finetune_data.MAX_SIDE` pixels a side, `finetune_data.MAX_PLANES` planes or
  `MAX_FILE_BYTES` before any pixel is read.
* labels, one per image, in the same order: a label image (TIFF/PNG of the same plane or stack shape,
  one integer id per object), or a region file our readers read (QuPath GeoJSON, ImageJ ``.roi`` /
  RoiSet ``.zip``, COCO JSON), rasterised to one id per annotation. The ``class`` of a QuPath
  classification or COCO category becomes the object's class name unless one name is given for all.

Region files put pixel corners at integer coordinates (QuPath, ImageJ and COCO alike), while a label
image's pixel centres are at integers; the readers keep the file coordinates (see ``napari_medplib.io``),
so rasterising here shifts them by half a pixel. Without the shift every object would gain a row and a
column of pixels, which fine-tuning would learn as the objects' true outline.

Every problem raises `FinetuneInputError` with the file and the fix. The module also holds the two
small pieces the command line needs around a run: `ProgressPrinter` (progress lines on stderr) and
`StopOnInterrupt` (Ctrl-C asks the run to stop at the next step, which writes its checkpoint).
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from .finetune_data import (
    MAX_PLANES,
    MAX_SIDE,
    AnnotatedPlane,
    FinetuneInputError,
    annotated_planes,
)

#: The most bytes one image or label file may decode to (the plane and plane-count limits allow more).
MAX_FILE_BYTES = 8 * 2**30
#: The most channels an image may have (what the engine composites into the model's RGB).
MAX_CHANNELS = 4
TIFF_SUFFIXES = (".ome.tiff", ".ome.tif", ".tiff", ".tif")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
REGION_SUFFIXES = (".geojson", ".json", ".roi", ".zip")
_LOSSY = (".jpg", ".jpeg")
#: Shapes whose region is an area; lines and paths outline nothing and points mark no extent.
_AREA_KINDS = ("box", "polygon", "mask")

Note = Callable[[str], None]


@dataclass
class ImageData:
    """Pixels read from one file, normalised to (H, W[, C]) or, for a stack, (Z, H, W[, C])."""

    path: Path
    data: np.ndarray
    stack: bool
    channels: int  # 0 when there is no channel axis

    @property
    def planes(self) -> int:
        return int(self.data.shape[0]) if self.stack else 1

    @property
    def plane_hw(self) -> tuple[int, int]:
        offset = 1 if self.stack else 0
        return int(self.data.shape[offset]), int(self.data.shape[offset + 1])

    def describe(self) -> str:
        """Shape in words for messages: '5 planes of 64 x 80' or '64 x 80'."""
        h, w = self.plane_hw
        return f"{self.planes} planes of {h} x {w}" if self.stack else f"one plane of {h} x {w}"


# ----------------------------------------------------------------------------------- files
def _suffix(path: Path) -> str:
    """The file type suffix, keeping '.ome.tif' together."""
    name = path.name.lower()
    for suffix in TIFF_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _require_file(path: str | Path, role: str) -> Path:
    """The path as a file, or an error naming it (checked for all files before any is read)."""
    file = Path(path).expanduser()
    if not file.exists():
        raise FinetuneInputError(f"{path}: no such {role} file; check the path")
    if not file.is_file():
        raise FinetuneInputError(f"{path}: is a folder, not a {role} file; give the file itself")
    return file


def _numpy_axes(shape: tuple[int, ...]) -> str:
    """Axis letters for a shape in numpy's convention (channels last when the last axis is short)."""
    if len(shape) >= 3 and shape[-1] <= MAX_CHANNELS:
        return "Q" * (len(shape) - 3) + "YXS"
    return "Q" * (len(shape) - 2) + "YX"


@dataclass(frozen=True)
class _Layout:
    """How to turn a decoded TIFF series into (stack, Y, X, channel) order."""

    keep: tuple[int, ...]  # axes of the series kept (size-1 axes dropped), in output order
    stack: bool
    channels: int
    shape: tuple[int, ...]  # output shape


def _tiff_layout(axes: str, shape: tuple[int, ...], name: str) -> _Layout:
    """Plane, stack and channel axes from tifffile's axis letters; refuses what is not one plane or stack."""
    if "Y" not in axes or "X" not in axes or len(axes) != len(shape):
        raise FinetuneInputError(f"{name}: unsupported TIFF layout (axes {axes}); save it as a plain "
                                 "(Z)YX or (Z)YXC TIFF")
    channel_axes = [i for i, a in enumerate(axes) if a in "SC" and shape[i] > 1]
    stack_axes = [i for i, a in enumerate(axes) if a not in "YXSC" and shape[i] > 1]
    if len(channel_axes) > 1:
        raise FinetuneInputError(f"{name}: has both colour samples and channels (axes {axes}, shape {shape}); "
                                 "save the channels to train on as one image")
    if len(stack_axes) > 1:
        sizes = ", ".join(f"{axes[i]}={shape[i]}" for i in stack_axes)
        raise FinetuneInputError(f"{name}: has several stack axes ({sizes}); fine-tuning reads one plane or one "
                                 "stack: save one time point (or one Z plane) per file")
    keep = (*stack_axes, axes.index("Y"), axes.index("X"), *channel_axes)
    channels = shape[channel_axes[0]] if channel_axes else 0
    return _Layout(keep, bool(stack_axes), channels, tuple(shape[i] for i in keep))


def _check_declared(layout: _Layout, itemsize: int, name: str) -> None:
    """Refuse sizes from the header before reading: sides, plane count, channels, bytes."""
    offset = 1 if layout.stack else 0
    h, w = layout.shape[offset], layout.shape[offset + 1]
    if max(h, w) > MAX_SIDE:
        raise FinetuneInputError(f"{name}: planes of {h} x {w} pixels are larger than the {MAX_SIDE} pixels a "
                                 "side fine-tuning reads; crop the annotated area first")
    if layout.stack and layout.shape[0] > MAX_PLANES:
        raise FinetuneInputError(f"{name}: a stack of {layout.shape[0]:,} planes is more than the {MAX_PLANES} "
                                 "fine-tuning takes; save the annotated planes as a smaller stack")
    if layout.channels > MAX_CHANNELS:
        raise FinetuneInputError(f"{name}: has {layout.channels} channels; fine-tuning takes images with up to "
                                 f"{MAX_CHANNELS} channels: save the channels to train on")
    size = math.prod(layout.shape) * itemsize
    if size > MAX_FILE_BYTES:
        raise FinetuneInputError(f"{name}: decodes to {size / 2**30:.1f} GiB, more than the "
                                 f"{MAX_FILE_BYTES / 2**30:.0f} GiB one file may take; crop it or split the stack")


def _read_tiff(path: Path) -> ImageData:
    """A TIFF's first series as a plane or a stack, its size checked from the header first."""
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:  # tifffile raises several types for damaged or non-TIFF files
        raise FinetuneInputError(f"{path.name}: not a readable TIFF file ({_first_line(exc)}); save it again as "
                                 "TIFF") from None
    with tif:
        if not tif.series or not tif.series[0].pages:
            raise FinetuneInputError(f"{path.name}: the TIFF file holds no image; save it again")
        series = tif.series[0]
        shape = tuple(int(n) for n in series.shape)
        axes = series.axes.upper()
        # tifffile's own files without axis names store the numpy shape, whose letters (Q...) say
        # nothing about which axis holds the channels: read it as numpy's (channels last)
        if tif.is_shaped and not (tif.is_ome or tif.is_imagej) and set(axes) <= set("QYXS"):
            axes = _numpy_axes(shape)
        layout = _tiff_layout(axes, shape, path.name)
        _check_declared(layout, np.dtype(series.dtype).itemsize, path.name)
        try:
            data = series.asarray()
        except Exception as exc:
            raise FinetuneInputError(f"{path.name}: cannot read the pixels ({_first_line(exc)}); the file may be "
                                     "truncated: save it again") from None
    data = data.reshape(shape)
    dropped = tuple(i for i in range(data.ndim) if i not in layout.keep)
    data = np.squeeze(data, axis=dropped) if dropped else data
    remaining = [i for i in range(len(shape)) if i in layout.keep]
    data = np.transpose(data, [remaining.index(i) for i in layout.keep])
    return ImageData(path, np.ascontiguousarray(data), layout.stack, layout.channels)


def _pil_header(path: Path) -> tuple[int, int, str]:
    """(width, height, mode) from a PNG/JPEG header, refusing planes above MAX_SIDE before decoding."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            width, height, mode = img.size[0], img.size[1], img.mode
    except Image.DecompressionBombError:
        raise FinetuneInputError(f"{path.name}: too many pixels for a PNG/JPEG reader to open safely; save it as "
                                 "TIFF, cropped to the annotated area") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise FinetuneInputError(f"{path.name}: not a readable image ({_first_line(exc)}); save it again as PNG "
                                 "or TIFF") from None
    if max(width, height) > MAX_SIDE:
        raise FinetuneInputError(f"{path.name}: {height} x {width} pixels is larger than the {MAX_SIDE} pixels a "
                                 "side fine-tuning reads; crop the annotated area first")
    return width, height, mode


def read_image(path: str | Path) -> ImageData:
    """An image file as one plane (H, W[, C]) or a stack (Z, H, W[, C]), sizes checked before reading."""
    file = _require_file(path, "image")
    suffix = _suffix(file)
    if suffix in TIFF_SUFFIXES:
        return _read_tiff(file)
    if suffix in PIL_SUFFIXES:
        from ..image_files import ImageFileError, read_plane

        _pil_header(file)
        try:
            data, _info = read_plane(file)
        except ImageFileError as exc:
            raise FinetuneInputError(f"{exc}; save it again as PNG or TIFF") from None
        return ImageData(file, data, False, data.shape[-1] if data.ndim == 3 else 0)
    raise FinetuneInputError(f"{file.name}: unsupported image type {suffix!r}; use TIFF, PNG or JPEG")


def read_label_image(path: str | Path) -> ImageData:
    """A label image file as it is stored (palette indices kept: they are the ids), sizes checked first."""
    file = _require_file(path, "labels")
    suffix = _suffix(file)
    if suffix in TIFF_SUFFIXES:
        return _read_tiff(file)
    if suffix in _LOSSY:
        raise FinetuneInputError(f"{file.name}: JPEG changes pixel values, so it cannot hold label ids; save the "
                                 "labels as PNG or TIFF")
    if suffix in PIL_SUFFIXES:
        from PIL import Image

        _pil_header(file)
        try:
            with Image.open(file) as img:
                data = np.asarray(img)
        except OSError as exc:
            raise FinetuneInputError(f"{file.name}: cannot read the pixels ({_first_line(exc)}); save it "
                                     "again") from None
        return ImageData(file, data, False, data.shape[-1] if data.ndim == 3 else 0)
    raise FinetuneInputError(f"{file.name}: unsupported labels file {suffix!r}; use a label image (TIFF, PNG) or "
                             "regions (.geojson, COCO .json, ImageJ .roi / RoiSet .zip)")


# ----------------------------------------------------------------------------------- label images
def _integer_labels(labels: ImageData) -> np.ndarray:
    """Label ids as integers: float files (Fiji writes 32-bit label maps) when every value is whole."""
    data = labels.data
    if data.dtype == bool:
        return data.astype(np.uint8)
    if np.issubdtype(data.dtype, np.integer):
        return data
    if np.issubdtype(data.dtype, np.floating):
        whole = bool(np.isfinite(data).all()) and np.array_equal(data, np.round(data))
        if whole and (data.size == 0 or float(np.abs(data).max()) < 2**31):
            return data.astype(np.int32)
        raise FinetuneInputError(f"{labels.path.name}: holds fractional values ({data.dtype}), not label ids; is "
                                 "this the image rather than its labels? Give a label image with one whole-number "
                                 "id per object")
    raise FinetuneInputError(f"{labels.path.name}: pixels of type {data.dtype} are not label ids; give a label "
                             "image with one whole-number id per object")


def check_label_image(labels: ImageData, image: ImageData) -> np.ndarray:
    """The label ids of ``labels`` for ``image``: one channel, whole numbers, the image's plane or stack shape."""
    name, image_name = labels.path.name, image.path.name
    if labels.channels:
        kind = "an RGB" if labels.channels in (3, 4) else f"a {labels.channels}-channel"
        raise FinetuneInputError(f"{name}: is {kind} image; labels must be one integer id per pixel (a label "
                                 "image, e.g. saved from a napari Labels layer), not a coloured picture of them")
    if labels.plane_hw != image.plane_hw:
        (lh, lw), (ih, iw) = labels.plane_hw, image.plane_hw
        raise FinetuneInputError(f"{name}: labels of {lh} x {lw} pixels do not match {image_name} ({ih} x {iw}); "
                                 "give the labels made on this image, in the same order as the images")
    if labels.stack != image.stack or labels.planes != image.planes:
        raise FinetuneInputError(f"{name}: holds {labels.describe()} but {image_name} holds {image.describe()}; "
                                 "give labels for every plane of the image (a label stack of the same planes)")
    return _integer_labels(labels)


# ----------------------------------------------------------------------------------- region files
def read_region_layers(path: Path) -> list[tuple[Any, dict, str]]:
    """napari layer data from a QuPath GeoJSON, COCO JSON or ImageJ .roi/.zip file (our readers)."""
    from ..io import RegionFileError, read_imagej
    from ..io.coco import coco_to_layers, is_coco, load_json
    from ..io.geojson_read import geojson_to_layers
    from ..regions import RegionError

    try:
        if path.suffix.lower() in (".roi", ".zip"):
            return read_imagej(path)
        document = load_json(path)
        if not is_coco(document):
            return geojson_to_layers(document, path)
        with warnings.catch_warnings():  # the plane-per-image notice is for the viewer: here each image's
            warnings.filterwarnings("ignore", message=".*annotates .* images")  # annotations are matched by name
            return coco_to_layers(document, path)
    except (RegionFileError, RegionError) as exc:  # their messages name the file and the fix
        raise FinetuneInputError(str(exc)) from None


def _area_layers(layers: list, name: str, note: Note) -> list[tuple[Any, dict, str]]:
    """The Shapes layers that outline objects: points ignored, COCO boxes only where no outline exists."""
    shapes = [layer for layer in layers if layer[2] == "shapes"]
    points = sum(len(layer[0]) for layer in layers if layer[2] == "points")
    if points:
        note(f"{name}: {points} point(s) ignored; fine-tuning needs outlined objects")
    coco = [layer for layer in shapes if layer[1].get("metadata", {}).get("format") == "coco"]
    boxes = [layer for layer in coco if str(layer[1].get("name", "")).endswith(" boxes")]
    if coco and len(boxes) == len(coco):
        raise FinetuneInputError(f"{name}: the COCO file holds boxes only; fine-tuning needs object outlines "
                                 "(segmentation polygons or RLE masks)")
    if boxes:  # a COCO annotation's box duplicates its segmentation
        shapes = [layer for layer in shapes if all(layer is not box for box in boxes)]
    if not shapes:
        raise FinetuneInputError(f"{name}: holds no outlined objects (polygons, rectangles, ellipses); draw area "
                                 "annotations around the objects")
    return shapes


def _plane_axis(meta: dict, ndim: int, name: str) -> tuple[list[int], str | None]:
    """(coordinate columns to keep, name of the one stack axis or None): channel positions dropped."""
    axes = list(meta.get("metadata", {}).get("axes", ()))[: ndim - 2]
    axes += ["?"] * (ndim - 2 - len(axes))
    lead = [i for i, axis in enumerate(axes) if axis != "c"]  # an ImageJ channel position is no plane
    if len(lead) > 1:
        raise FinetuneInputError(f"{name}: annotations lie on several {'/'.join(axes[i] for i in lead)} planes; "
                                 "fine-tuning reads one plane or one stack per image: export one time point")
    keep = [*lead, ndim - 2, ndim - 1]
    return keep, (axes[lead[0]] if lead else None)


def _plane_coordinates(meta: dict, axis: str | None, image: ImageData, name: str) -> list[float] | None:
    """For each image plane, the region file's coordinate on its stack axis (None: a 2-D file)."""
    if axis is None:
        return None
    if axis == "image":  # a COCO file of several images: planes by file name (one plane) or order (stack)
        names = [Path(str(n)).name for n in meta.get("metadata", {}).get("images", [])]
        if not image.stack:
            if image.path.name in names:
                return [float(names.index(image.path.name))]
            listed = ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")
            raise FinetuneInputError(f"{name}: annotates {len(names)} images ({listed}) but none named "
                                     f"{image.path.name}; give the COCO file of this image")
        if len(names) != image.planes:
            raise FinetuneInputError(f"{name}: annotates {len(names)} images but {image.path.name} has "
                                     f"{image.planes} planes; give one COCO image per plane")
    return [float(z) for z in range(image.planes)]


def _region_class(region: Any, features: dict) -> str | None:
    """The ``class`` column of the region's row (QuPath classification, COCO category), if any."""
    column = features.get("class") if isinstance(features, dict) else None
    if column is None or region.index is None or region.index >= len(column):
        return None
    value = column[region.index]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value).strip() or None


def _plane_regions(layer: tuple, keep: list[int], coordinate: float | None, plane_hw: tuple[int, int], name: str):
    """The layer's regions on one image plane, with pixel corners shifted onto pixel centres."""
    from ..regions import RegionError, regions_from_layer_data

    data, meta, kind = layer
    data = [np.asarray(s, float)[:, keep] for s in data]
    meta = dict(meta, translate=[0.0] * (len(keep) - 2) + [-0.5, -0.5])
    point = None if coordinate is None else (coordinate, 0.0, 0.0)
    try:
        return regions_from_layer_data((data, meta, kind), image_shape=plane_hw, slice_point=point)
    except RegionError as exc:
        raise FinetuneInputError(f"{name}: {exc}; export the annotations again") from None


def rasterise_regions(path: str | Path, image: ImageData, note: Note | None = None
                      ) -> tuple[np.ndarray, dict[int, str]]:
    """Instance labels of the image's plane or stack shape (one id per annotation, later ones on top) and the
    class names the file gives (QuPath classification, COCO category) by id."""
    file = _require_file(path, "regions")
    note = note or (lambda _message: None)
    name = file.name
    layers = _area_layers(read_region_layers(file), name, note)
    labels = np.zeros((image.planes, *image.plane_hw), np.int32)
    classes: dict[int, str] = {}
    ignored: dict[str, int] = {}
    next_id = 1
    for layer in layers:
        ndim = int(np.asarray(layer[0][0]).shape[1])
        keep, axis = _plane_axis(layer[1], ndim, name)
        coordinates = _plane_coordinates(layer[1], axis, image, name)
        features = layer[1].get("features") or {}
        if axis is not None and axis != "image":
            _check_planes_present(layer[0], keep[0], image, name)
        if axis is None and image.stack:
            note(f"{name}: no plane positions; its annotations are taken to lie on the first plane of "
                 f"{image.path.name}")
        for z in range(image.planes):
            if coordinates is None and z > 0:
                break  # a file without plane positions annotates the first plane
            coordinate = None if coordinates is None else coordinates[z]
            result = _plane_regions(layer, keep, coordinate, image.plane_hw, name)
            for skipped in result.problems:
                ignored[skipped.reason] = ignored.get(skipped.reason, 0) + 1
            for region in result.regions:
                if region.kind not in _AREA_KINDS:
                    ignored["line"] = ignored.get("line", 0) + 1
                    continue
                crop, (r0, c0) = region.crop(image.plane_hw)
                labels[z, r0 : r0 + crop.shape[0], c0 : c0 + crop.shape[1]][crop] = next_id
                label_class = _region_class(region, features)
                if label_class is not None:
                    classes[next_id] = label_class
                next_id += 1
    _report_ignored(ignored, name, image, next_id - 1, note)
    return (labels if image.stack else labels[0]), classes


def _check_planes_present(shapes: Sequence, column: int, image: ImageData, name: str) -> None:
    """Refuse annotations on planes the image does not have (they would be dropped without a word)."""
    highest = max(float(np.asarray(s, float)[:, column].max()) for s in shapes)
    if round(highest) >= image.planes:
        raise FinetuneInputError(f"{name}: has annotations on plane {round(highest)} but {image.path.name} holds "
                                 f"{image.describe()}; give the image (stack) they were drawn on")


def _report_ignored(ignored: dict[str, int], name: str, image: ImageData, kept: int, note: Note) -> None:
    """A note on what was left out, or an error when nothing was kept."""
    words = {"outside": "outside the image", "empty": "too small to cover a pixel", "invalid": "invalid",
             "unsupported": "of unsupported type", "line": "lines or paths (no area)"}
    parts = [f"{n} {words.get(reason, reason)}" for reason, n in sorted(ignored.items())]
    if not kept:
        detail = f" ({'; '.join(parts)})" if parts else ""
        raise FinetuneInputError(f"{name}: no annotated object lies on {image.path.name} ({image.describe()})"
                                 f"{detail}; is this the image the annotations were drawn on?")
    if parts:
        note(f"{name}: annotations left out: {'; '.join(parts)}")


# ----------------------------------------------------------------------------------- all inputs
def is_region_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in REGION_SUFFIXES


def read_labels(path: str | Path, image: ImageData, note: Note | None = None
                ) -> tuple[np.ndarray, dict[int, str]]:
    """Label ids for ``image`` from a label image or a region file, and any class names the file gives."""
    if is_region_file(path):
        return rasterise_regions(path, image, note)
    return check_label_image(read_label_image(path), image), {}


def load_annotated_planes(images: Sequence[str | Path], labels: Sequence[str | Path], class_name: str | None = None,
                          *, fully_annotated: bool = False, note: Note | None = None) -> list[AnnotatedPlane]:
    """The checked planes of image files and their labels (one labels file per image, same order).

    ``class_name`` names every object; without it, objects take the class their region file gives, else
    "object". Files are checked to exist before any is read, so a typo fails at once.
    """
    images, labels = list(images), list(labels)
    if not images:
        raise FinetuneInputError("no images were given; name at least one image file with annotated objects")
    if len(images) != len(labels):
        raise FinetuneInputError(f"{len(images)} image file(s) but {len(labels)} labels file(s); give one --labels "
                                 "file per image, in the same order")
    for image_path, labels_path in zip(images, labels, strict=True):
        _require_file(image_path, "image")
        _require_file(labels_path, "regions" if is_region_file(labels_path) else "labels")
    arrays, label_arrays, names, per_image = [], [], [], []
    for image_path, labels_path in zip(images, labels, strict=True):
        image = read_image(image_path)
        ids, classes = read_labels(labels_path, image, note)
        arrays.append(image.data)
        label_arrays.append(ids)
        names.append(image.path.name)
        per_image.append(_class_names(ids, classes))
    names = _unique_names(names)
    class_names: Any = class_name if class_name is not None else per_image
    return annotated_planes(arrays, label_arrays, class_names, fully_annotated=fully_annotated, names=names)


def _class_names(ids: np.ndarray, classes: dict[int, str]) -> str | dict[int, str]:
    """One image's class names: "object" for all, or per id where the region file named some."""
    if not classes:
        return "object"
    present = np.unique(ids)
    return {int(i): classes.get(int(i), "object") for i in present.tolist() if i > 0}


def _unique_names(names: list[str]) -> list[str]:
    """File names as plane names; the same name twice gets its position, so messages stay unambiguous."""
    return [f"{n} (image {i + 1})" if names.count(n) > 1 else n for i, n in enumerate(names)]


def check_out_folder(out: str | Path) -> Path:
    """The output folder, refused early when it holds anything but an unfinished run of fine-tuning.

    A folder with a finished model is refused too: running again would train it anew and overwrite it.
    """
    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise FinetuneInputError(f"--out {out}: is a file; give a new folder for the adapted model")
    if (folder / "DONE").exists():
        raise FinetuneInputError(f"--out {out}: already holds a finished fine-tuned model; choose a new folder "
                                 "(nothing there was changed)")
    unfinished = (folder / "finetune" / "run.json").is_file()
    if folder.is_dir() and not unfinished and any(folder.iterdir()):
        raise FinetuneInputError(f"--out {out}: exists and is not empty; choose a new folder for the adapted model "
                                 "(nothing there was changed)")
    return folder


# ----------------------------------------------------------------------------------- a run on the command line
class ProgressPrinter:
    """Progress as plain lines on a stream (stderr): one per phase and a loss line every ``every`` steps.

    Plain lines rather than a redrawn bar, so a run's progress also reads well in a log file or a job's
    output, where fine-tuning often runs.
    """

    def __init__(self, steps: int, stream: TextIO | None = None, every: int = 10) -> None:
        self.steps, self.every = steps, max(1, every)
        self.stream = stream
        self._phase: str | None = None
        self._first_step: int | None = None

    def _say(self, text: str) -> None:
        stream = self.stream or sys.stderr
        stream.write(text + "\n")
        stream.flush()

    def phase(self, message: str, done: int, total: int) -> None:
        """``on_progress`` of `finetune`: a line when the phase changes (training's loss goes to `log`)."""
        name = message.split(" (")[0]
        if name != self._phase:
            self._phase = name
            if name != "training":
                count = f" ({total} held-out objects)" if name.startswith("measuring") and total else ""
                self._say(f"{name}{count} ...")

    def log(self, record: dict) -> None:
        """``on_log`` of `finetune`: the loss of every ``every``-th step, the first and the last."""
        step = int(record["step"])
        if self._first_step is None:
            self._first_step = step
            self._say(f"training {self.steps} steps" + (f" (resuming after step {step - 1})" if step > 1 else ""))
        if step == self._first_step or step % self.every == 0 or step == self.steps:
            self._say(f"step {step}/{self.steps}: loss {record['loss']:.4f} (bce {record['bce']:.4f}, dice "
                      f"{record['dice']:.4f}), {record['seconds']:.2f} s")


class StopOnInterrupt:
    """Ctrl-C during a run asks it to stop at the next step (``should_stop``), so the run writes its
    checkpoint and can be resumed; a second Ctrl-C stops at once (KeyboardInterrupt).

    Use as a context manager; the previous SIGINT handler comes back on exit. Outside the main thread
    (where signal handlers cannot be set) it does nothing and Ctrl-C keeps its usual effect.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.requested = False
        self.stream = stream
        self._previous: Any = None
        self._installed = False

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        stream = self.stream or sys.stderr
        stream.write("stopping at the next training step to save progress (Ctrl-C again to quit at once) ...\n")
        stream.flush()

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
