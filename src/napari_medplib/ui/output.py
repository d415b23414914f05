"""Masks -> a napari Labels layer: fresh ids, the right slice, one undo step, provenance.

Writes go through ``Labels.data_setitem`` inside ``Labels.block_history()`` (both public in napari
0.9), so each answer is one step of napari's own undo (Ctrl+Z on the layer). Existing labels are
never overwritten unless ``replace=True``. Every write appends a provenance entry (question,
regions, model, answer, ids, time) to ``layer.metadata["medplib"]``; `export_provenance` saves that
list as JSON and Markdown.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .layers import ImagePlane

PROVENANCE_KEY = "medplib"


class OutputLayerError(ValueError):
    """The chosen output Labels layer cannot hold masks of this image; the message says why."""


@dataclass(frozen=True)
class MaskPixels:
    """The pixels of one mask: ``rows``, ``cols`` on a plane of ``shape``.

    Made in the worker thread (`mask_pixels`), so the Qt thread does not scan full-size masks.
    """

    shape: tuple[int, int]
    rows: np.ndarray
    cols: np.ndarray

    @property
    def size(self) -> int:
        return int(self.rows.size)


def mask_pixels(mask: np.ndarray | MaskPixels) -> MaskPixels:
    """Bool (H, W) mask -> `MaskPixels` (scans only the rows and columns the mask touches)."""
    if isinstance(mask, MaskPixels):
        return mask
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise OutputLayerError(f"a mask must be 2-D (H, W), got shape {mask.shape}")
    rows_any = np.flatnonzero(mask.any(axis=1))
    if rows_any.size == 0:
        empty = np.zeros(0, dtype=np.intp)
        return MaskPixels(mask.shape, empty, empty)
    cols_any = np.flatnonzero(mask.any(axis=0))
    r0, c0 = int(rows_any[0]), int(cols_any[0])
    rows, cols = np.nonzero(mask[r0 : rows_any[-1] + 1, c0 : cols_any[-1] + 1])
    return MaskPixels(mask.shape, rows + r0, cols + c0)


def output_name(image_name: str) -> str:
    """Name of a new output layer, derived from the image (napari adds ' [1]' on clashes)."""
    return f"{image_name} MedPLIB"


def new_output_layer(viewer: Any, image_layer: Any, plane: ImagePlane) -> Any:
    """An empty int32 Labels layer shaped like the image (no RGB axis), with its transform."""
    return viewer.add_labels(
        np.zeros(plane.spatial_shape, dtype=np.int32),
        name=output_name(image_layer.name),
        scale=plane.scale or image_layer.scale,
        translate=image_layer.translate,
        rotate=image_layer.rotate,
        shear=image_layer.shear,
        affine=image_layer.affine,
        metadata={PROVENANCE_KEY: []},
    )


def next_free_id(layer: Any) -> int:
    """One more than the largest label in the layer (0 for an empty layer gives 1)."""
    data = layer.data
    return int(np.max(data)) + 1 if data.size else 1


def output_index(layer: Any, index: Sequence[int], plane_shape: tuple[int, int]) -> tuple[int, ...]:
    """The leading indices of ``layer`` for an image plane at ``index`` (trailing axes aligned)."""
    shape = tuple(layer.data.shape)
    if len(shape) < 2 or shape[-2:] != tuple(plane_shape):
        raise OutputLayerError(
            f"output layer {layer.name!r} has shape {shape}, but the image plane is "
            f"{plane_shape[0]}x{plane_shape[1]}; choose 'New layer' as output"
        )
    lead = len(shape) - 2
    if lead > len(index):
        raise OutputLayerError(
            f"output layer {layer.name!r} has more axes ({len(shape)}) than the image "
            f"({len(index) + 2}); choose 'New layer' as output"
        )
    idx = tuple(int(i) for i in index)[len(index) - lead :] if lead else ()
    for axis, (i, size) in enumerate(zip(idx, shape[:lead], strict=True)):
        if not 0 <= i < size:
            raise OutputLayerError(
                f"output layer {layer.name!r} has {size} planes on axis {axis}, no plane {i}; "
                "choose 'New layer' as output"
            )
    return idx


def write_planes(
    layer: Any,
    planes: Sequence[tuple[Sequence[int], Sequence[np.ndarray | MaskPixels]]],
    *,
    replace: bool = False,
) -> tuple[list[int], int]:
    """`write_masks` with the ids in mask order: (ids written, pixels written)."""
    ids, written = write_masks(layer, planes, replace=replace)
    return [ids[k] for k in sorted(ids)], written


def write_masks(
    layer: Any,
    planes: Sequence[tuple[Sequence[int], Sequence[np.ndarray | MaskPixels]]],
    *,
    replace: bool = False,
) -> tuple[dict[int, int], int]:
    """Write masks on one or more image planes as one undoable step; return ({mask k: id}, pixels).

    ``planes`` is ``[(plane index, [mask, ...]), ...]`` with bool masks or `MaskPixels`; the k-th
    mask of every plane gets the same new id (so a whole-stack answer gives 3-D objects). Without
    ``replace`` only unlabelled pixels are written, so later masks of the same answer keep the
    earlier ones too. A mask that writes no pixel (empty, or wholly on labelled pixels) gets no id,
    so the ids are exactly those written.
    """
    chosen: list[tuple[tuple[int, ...], list[tuple[int, np.ndarray, np.ndarray]]]] = []
    for index, masks in planes:
        pixels = [mask_pixels(m) for m in masks]
        if not pixels:
            continue
        lead = output_index(layer, index, pixels[0].shape)
        taken = None if replace else np.asarray(layer.data[lead]) != 0
        todo = []
        for k, pix in enumerate(pixels):
            rows, cols = pix.rows, pix.cols
            if taken is not None and rows.size:
                free = ~taken[rows, cols]
                rows, cols = rows[free], cols[free]
                taken[rows, cols] = True
            if rows.size:
                todo.append((k, rows, cols))
        if todo:
            chosen.append((lead, todo))
    present = sorted({k for _, todo in chosen for k, _, _ in todo})
    if not present:
        return {}, 0
    first = next_free_id(layer)
    k_to_id = {k: first + n for n, k in enumerate(present)}
    written = 0
    with layer.block_history():
        for lead, todo in chosen:
            for k, rows, cols in todo:
                where = (*[np.full(rows.size, i, dtype=np.intp) for i in lead], rows, cols)
                layer.data_setitem(where, k_to_id[k])
                written += int(rows.size)
    return k_to_id, written


def labels_under(layer: Any, index: Sequence[int], mask: np.ndarray | MaskPixels) -> dict[int, int]:
    """{label id: pixels of ``mask`` it already covers} on the output plane of an image plane."""
    pix = mask_pixels(mask)
    if not pix.size:
        return {}
    lead = output_index(layer, index, pix.shape)
    values = np.asarray(layer.data[lead])[pix.rows, pix.cols]
    ids, counts = np.unique(values[values != 0], return_counts=True)
    return {int(i): int(c) for i, c in zip(ids, counts, strict=True)}


#: A new mask is "the same object again" when one existing label covers at least this share of it.
SAME_OBJECT = 0.5


def redraw_target(layer: Any, index: Sequence[int], mask: np.ndarray | MaskPixels) -> tuple[int, float] | None:
    """(label, share of the mask it covers) when one existing label covers at least `SAME_OBJECT` of
    ``mask``: the user segmented an already labelled object again. Else None."""
    under = labels_under(layer, index, mask)
    size = mask_pixels(mask).size
    if not under or not size:
        return None
    label, covered = max(under.items(), key=lambda item: item[1])
    share = covered / size
    return (label, share) if share >= SAME_OBJECT else None


def redraw(layer: Any, index: Sequence[int], mask: np.ndarray | MaskPixels, label: int) -> int:
    """Replace object ``label`` on this plane by ``mask`` (same id), as one undo step; return its pixels.

    The old outline's pixels outside the new mask are cleared; other labels under the mask are
    overwritten (the user drew this object there)."""
    pix = mask_pixels(mask)
    lead = output_index(layer, index, pix.shape)
    with layer.block_history():
        rows, cols = np.nonzero(np.asarray(layer.data[lead]) == label)
        if rows.size:
            where = (*[np.full(rows.size, i, dtype=np.intp) for i in lead], rows, cols)
            layer.data_setitem(where, 0)
        where = (*[np.full(pix.size, i, dtype=np.intp) for i in lead], pix.rows, pix.cols)
        layer.data_setitem(where, int(label))
    return pix.size


def stack_output_problem(layer: Any | None, plane: ImagePlane, axis: int) -> str:
    """Why ``layer`` cannot hold a whole-stack answer along spatial ``axis`` ('' when it can).

    A labels layer with fewer axes than the image keeps one plane: every plane's masks would be
    merged into it."""
    if layer is None:
        return ""
    shape = tuple(layer.data.shape)
    lead = len(shape) - 2
    offset = plane.ndim - 2 - lead  # image lead axes the layer does not have
    if axis < offset or shape[axis - offset] != plane.spatial_shape[axis]:
        return (
            f"the output layer {layer.name!r} has shape {shape}, with no axis for the "
            f"{plane.spatial_shape[axis]} planes along axis {axis}: every plane would be merged into "
            "it; choose 'New layer' as output (a labels volume is made) or a layer shaped like the stack"
        )
    return ""


def provenance_entry(
    *,
    question: str,
    answer: str,
    model: str,
    image: str,
    regions: Sequence[str] = (),
    label_ids: Sequence[int] = (),
    plane: Sequence[int] = (),
    **extra: Any,
) -> dict[str, Any]:
    """One provenance record (JSON-able)."""
    entry = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "question": question,
        "answer": answer,
        "model": model,
        "image": image,
        "regions": list(regions),
        "label_ids": [int(i) for i in label_ids],
        "plane": [int(i) for i in plane],
    }
    entry.update(extra)
    return entry


def record_provenance(layer: Any, entry: dict[str, Any]) -> None:
    """Append ``entry`` to ``layer.metadata["medplib"]`` (saved with the layer by napari)."""
    log = layer.metadata.get(PROVENANCE_KEY)
    if not isinstance(log, list):
        log = []
    log.append(entry)
    layer.metadata[PROVENANCE_KEY] = log


def provenance_markdown(entries: Sequence[dict[str, Any]], title: str = "MedPLIB log") -> str:
    """A readable Markdown rendering of provenance entries."""
    lines = [f"# {title}", ""]
    for n, e in enumerate(entries, 1):
        lines.append(f"## {n}. {e.get('question', '')}")
        lines.append("")
        meta = [f"time {e.get('time', '?')}", f"model `{e.get('model', '?')}`"]
        meta.append(f"image `{e.get('image', '?')}`")
        if e.get("plane"):
            meta.append(f"plane {tuple(e['plane'])}")
        if e.get("label_ids"):
            meta.append("labels " + ", ".join(str(i) for i in e["label_ids"]))
        lines.append("- " + "; ".join(meta))
        for region in e.get("regions", []):
            lines.append(f"- region: {region}")
        lines += ["", str(e.get("answer", "")).strip() or "_(no text)_", ""]
    return "\n".join(lines)


def export_provenance(entries: Sequence[dict[str, Any]], path: str | Path) -> list[Path]:
    """Write ``path`` with .json and .md suffixes; return both paths."""
    base = Path(path)
    if base.suffix.lower() in (".json", ".md"):
        base = base.with_suffix("")
    json_path, md_path = base.with_suffix(".json"), base.with_suffix(".md")
    from ..atomic import atomic_write_text

    atomic_write_text(json_path, json.dumps(list(entries), indent=2, default=str))
    atomic_write_text(md_path, provenance_markdown(entries, title=f"MedPLIB log: {base.name}"))
    return [json_path, md_path]


def default_export_path(layer: Any) -> Path:
    """Next to the labels file when the layer came from one, else the current folder."""
    source = getattr(getattr(layer, "source", None), "path", None)
    folder = Path(source).parent if source else Path.cwd()
    return folder / f"{layer.name}.medplib"
