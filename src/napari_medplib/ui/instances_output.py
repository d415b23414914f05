"""Objects of a grounded answer -> the output Labels layer: one fresh id per object, its table in ``features``.

The engine splits each ``<SEG>`` mask into objects (``Reply.instances``, ``Reply.tables``). Here the
objects are scanned into pixel lists in the worker thread (`object_pixels`) and written on the Qt thread
by `output.write_planes`, which gives every object the next free id and never overwrites existing labels;
`append_features` adds one row per new id to ``layer.features`` (napari looks rows up by the ``index``
column, the label id), keeping the rows already there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .output import MaskPixels


def object_pixels(labels: np.ndarray) -> list[MaskPixels]:
    """Int (H, W) labels 1..n -> the pixels of each object in label order (one pass over the plane)."""
    labels = np.asarray(labels)
    rows, cols = np.nonzero(labels)
    values = labels[rows, cols]
    order = np.argsort(values, kind="stable")
    rows, cols, values = rows[order], cols[order], values[order]
    ids, starts = np.unique(values, return_index=True)
    bounds = [*starts.tolist(), len(values)]
    return [MaskPixels(labels.shape, rows[a:b], cols[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def answer_objects(reply: Any) -> tuple[list[MaskPixels], list[dict[str, Any]]] | None:
    """(pixels of every object of every ``<SEG>``, in order; their table rows as dicts of columns per
    ``<SEG>``), or None when the reply has no objects (instances switched off, or a fake session)."""
    instances = getattr(reply, "instances", None) or []
    tables = getattr(reply, "tables", None) or []
    if not instances or len(tables) != len(instances):
        return None
    pixels: list[MaskPixels] = []
    for labels in instances:
        pixels.extend(object_pixels(labels))
    return pixels, list(tables)


def table_rows_for(ids: Sequence[int] | dict[int, int], tables: Sequence[dict[str, Any]], image: str,
                   question: str):
    """A pandas DataFrame of the objects' rows with their layer ids (``index`` and ``label``) and where
    they came from; ``ids`` are in the order of the tables' rows, or {row: id} for the rows written
    (`output.write_masks`: an object whose pixels were all labelled already gets no id)."""
    import pandas as pd

    frames = [pd.DataFrame({k: np.asarray(v) for k, v in t.items()}) for t in tables if len(next(iter(t.values()), []))]
    if not frames:
        return pd.DataFrame()
    table = pd.concat(frames, ignore_index=True)
    if isinstance(ids, dict):
        rows = [k for k in sorted(ids) if k < len(table)]
        table, ids = table.iloc[rows].reset_index(drop=True), [ids[k] for k in rows]
    elif len(ids) != len(table):  # unknown which object was not written: drop by order
        table = table.iloc[: len(ids)]
    table = table.rename(columns={"label": "object"})
    table.insert(0, "index", np.asarray(ids, np.int64))
    table.insert(1, "label", np.asarray(ids, np.int64))
    table["image"] = image
    table["question"] = question
    return table


def append_features(layer: Any, rows) -> None:
    """Add ``rows`` to ``layer.features`` (rows of ids already there are replaced)."""
    import pandas as pd

    if rows is None or len(rows) == 0:
        return
    current = getattr(layer, "features", None)
    if current is None or len(current) == 0:
        layer.features = rows.reset_index(drop=True)
        return
    current = current.copy()
    if "index" not in current:  # rows without ids: napari's default is row i <-> label i
        current.insert(0, "index", np.arange(len(current), dtype=np.int64))
    kept = current[~current["index"].isin(rows["index"])]
    layer.features = pd.concat([kept, rows], ignore_index=True)


def counted_objects(reply: Any, image: Any = None, regions: Sequence[Any] = ()
                    ) -> tuple[list[MaskPixels], list[dict[str, Any]]] | None:
    """The objects a how-many answer counted (``Reply.count_labels``) as `answer_objects` gives them, so the
    count can be checked on the image; with ``regions`` only those whose centroid pixel lies in one (the
    objects the engine counted). None when nothing was counted or the labels do not fit ``image``."""
    labels = getattr(reply, "count_labels", None)
    if labels is None or getattr(reply, "measured_count", None) is None:
        return None
    labels = np.asarray(labels)
    plane = None if image is None else np.asarray(image)
    if labels.ndim != 2 or not labels.any() or (plane is not None and plane.shape[:2] != labels.shape):
        return None
    from ..engine.measure import measure

    intensity = plane if plane is not None and (plane.ndim == 2 or plane.shape[-1] <= 4) else None
    table = measure(labels.astype(np.int64, copy=False), intensity)
    if regions:
        within = np.zeros(labels.shape, bool)
        for region in regions:
            within |= region.to_mask(labels.shape)
        r = np.clip(np.rint(table["centroid_y"]).astype(int), 0, labels.shape[0] - 1)
        c = np.clip(np.rint(table["centroid_x"]).astype(int), 0, labels.shape[1] - 1)
        keep = within[r, c]
        labels = np.where(np.isin(labels, table["label"][keep]), labels, 0)
        table = {k: np.asarray(v)[keep] for k, v in table.items()}
        if not keep.any():
            return None
    return object_pixels(labels), [table]


def measured_note(reply: Any) -> str:
    """'Measured: 118 nuclei (grounded instances)' for how-many questions whose answer does not state the
    measured count already (the engine rewrites ``Reply.text`` to state it and keeps the model's words in
    ``model_text``: then ''); else ''."""
    count = getattr(reply, "measured_count", None)
    noun = getattr(reply, "count_noun", None)
    if count is None or not noun:
        return ""
    text = str(getattr(reply, "text", "") or "")
    if getattr(reply, "model_text", None) is not None or text.lstrip().startswith(f"{count} "):
        return ""
    return f"Measured: {count} {noun} (grounded instances)"


def declined_note(reply: Any) -> str:
    """What to do when the model declines ("I can't tell from this image."), else ''."""
    text = str(getattr(reply, "text", "") or "").lower()
    if "can't tell" not in text and "cannot tell" not in text:
        return ""
    return ("The model does not recognise this image well enough to answer. It knows fluorescence, H&E, "
            "immunohistochemistry, brightfield, phase-contrast and electron microscopy; check the contrast "
            "limits, or teach it your images with 'Adapt to my images'.")
