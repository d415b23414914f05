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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .layers import ImagePlane

PROVENANCE_KEY = "medplib"


class OutputLayerError(ValueError):
    """The chosen output Labels layer cannot hold masks of this image; the message says why."""


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
    planes: Sequence[tuple[Sequence[int], Sequence[np.ndarray]]],
    *,
    replace: bool = False,
) -> tuple[list[int], int]:
    """Write masks on one or more image planes as one undoable step; return (ids, pixels written).

    ``planes`` is ``[(plane index, [mask, ...]), ...]``; the k-th mask of every plane gets the same
    new id (so a whole-stack answer gives 3-D objects). Empty masks get no id.
    """
    if not planes:
        return [], 0
    count = max(len(masks) for _, masks in planes)
    present = [any(k < len(m) and np.any(m[k]) for _, m in planes) for k in range(count)]
    first = next_free_id(layer)
    ids, k_to_id = [], {}
    for k in range(count):
        if present[k]:
            k_to_id[k] = first + len(ids)
            ids.append(first + len(ids))
    if not ids:
        return [], 0
    written = 0
    with layer.block_history():
        for index, masks in planes:
            if not masks:
                continue
            plane_shape = tuple(np.shape(masks[0]))
            lead = output_index(layer, index, plane_shape)
            current = np.array(layer.data[lead], copy=True)
            free = np.ones(plane_shape, dtype=bool) if replace else current == 0
            for k, mask in enumerate(masks):
                if k not in k_to_id:
                    continue
                target = np.asarray(mask, dtype=bool) & free
                rows, cols = np.nonzero(target)
                if rows.size == 0:
                    continue
                if not replace:
                    free &= ~target  # later masks of this answer keep earlier ones
                where = (*[np.full(rows.size, i, dtype=np.intp) for i in lead], rows, cols)
                layer.data_setitem(where, k_to_id[k])
                written += int(rows.size)
    return ids, written


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
    json_path.write_text(json.dumps(list(entries), indent=2, default=str))
    md_path.write_text(provenance_markdown(entries, title=f"MedPLIB log: {base.name}"))
    return [json_path, md_path]


def default_export_path(layer: Any) -> Path:
    """Next to the labels file when the layer came from one, else the current folder."""
    source = getattr(getattr(layer, "source", None), "path", None)
    folder = Path(source).parent if source else Path.cwd()
    return folder / f"{layer.name}.medplib"
