"""Per-object measurements of a label image: one row per label, as `skimage.measure.regionprops_table`.

Why: a grounded noun ("the nuclei") is a set of objects, and what users do next is count them and
compare their sizes and brightness; the table travels with the labels (napari ``layer.features``,
``Reply.tables``, the CLI's ``--json`` / ``--table``).

Columns (``COLUMNS``, all 1-D arrays of the same length, one entry per label in increasing order):

* ``label`` (int32): the label id in the label image;
* ``area`` (int64): pixels;
* ``centroid_y``, ``centroid_x`` (float64): centre of mass in (row, col) image pixels;
* ``bbox_y0``, ``bbox_x0``, ``bbox_y1``, ``bbox_x1`` (int64): bounding box, end-exclusive;
* ``mean_intensity`` (float64): mean of the intensity plane over the object (NaN without one; a
  multichannel plane is averaged over its channels first);
* ``eccentricity`` (float64): of the ellipse with the same second moments (0 a circle, towards 1 a line).
"""

from __future__ import annotations

import numpy as np

COLUMNS = ("label", "area", "centroid_y", "centroid_x", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1",
           "mean_intensity", "eccentricity")
_DTYPES = {"label": np.int32, "area": np.int64, "bbox_y0": np.int64, "bbox_x0": np.int64, "bbox_y1": np.int64,
           "bbox_x1": np.int64}


def _plane_intensity(intensity, shape: tuple[int, int]) -> np.ndarray | None:
    if intensity is None:
        return None
    array = np.asarray(intensity)
    if array.ndim == 3 and array.shape[:2] == shape:
        array = array.astype(np.float64).mean(axis=-1)
    if array.shape != shape:
        raise ValueError(
            f"the intensity image has shape {np.shape(intensity)} but the labels are {shape}; "
            "give the plane the labels were made on"
        )
    return array.astype(np.float64, copy=False)


def empty_table() -> dict[str, np.ndarray]:
    """A table with no rows (every column present, typed)."""
    return {name: np.zeros(0, _DTYPES.get(name, np.float64)) for name in COLUMNS}


def measure(labels: np.ndarray, intensity: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One row per label of an integer (H, W) label image (0 = background); see the module docstring."""
    from skimage.measure import regionprops_table

    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"measure() takes an integer (H, W) label image, got {labels.dtype} of shape {labels.shape}")
    if intensity is not None and np.shape(intensity)[:2] != labels.shape:
        _plane_intensity(intensity, labels.shape)  # raises the readable error
    rows, cols = np.flatnonzero(labels.any(axis=1)), np.flatnonzero(labels.any(axis=0))
    if not rows.size:
        return empty_table()
    # measure inside the labels' bounding box (one clicked object on a 4096-px plane: a few hundred pixels)
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    labels = labels[y0:y1, x0:x1]
    plane = None if intensity is None else _plane_intensity(np.asarray(intensity)[y0:y1, x0:x1], labels.shape)
    properties = ["label", "area", "centroid", "bbox", "eccentricity"]
    if plane is not None:
        properties.append("intensity_mean")
    raw = regionprops_table(labels, intensity_image=plane, properties=properties)
    n = len(raw["label"])
    table = {
        "label": raw["label"], "area": raw["area"],
        "centroid_y": raw["centroid-0"] + y0, "centroid_x": raw["centroid-1"] + x0,
        "bbox_y0": raw["bbox-0"] + y0, "bbox_x0": raw["bbox-1"] + x0, "bbox_y1": raw["bbox-2"] + y0,
        "bbox_x1": raw["bbox-3"] + x0,
        "mean_intensity": raw["intensity_mean"] if plane is not None else np.full(n, np.nan),
        "eccentricity": raw["eccentricity"],
    }
    return {name: np.asarray(table[name]).astype(_DTYPES.get(name, np.float64)) for name in COLUMNS}


def count_instances(labels: np.ndarray, within: np.ndarray | None = None) -> int:
    """Objects in a label image; with ``within`` (bool (H, W)), those whose centroid pixel lies in it."""
    labels = np.asarray(labels)
    if within is None:
        return int(np.count_nonzero(np.unique(labels)))
    table = measure(labels)
    within = np.asarray(within, bool)
    if within.shape != labels.shape:
        raise ValueError(f"'within' has shape {within.shape} but the labels are {labels.shape}")
    r = np.clip(np.rint(table["centroid_y"]).astype(int), 0, labels.shape[0] - 1)
    c = np.clip(np.rint(table["centroid_x"]).astype(int), 0, labels.shape[1] - 1)
    return int(within[r, c].sum())


def table_rows(table: dict[str, np.ndarray]) -> list[dict[str, float | int | None]]:
    """The table as JSON-ready rows (NaN -> None)."""
    names = [n for n in COLUMNS if n in table] + [n for n in table if n not in COLUMNS]
    n = len(table[names[0]]) if names else 0
    rows = []
    for i in range(n):
        row: dict[str, float | int | None] = {}
        for name in names:
            value = table[name][i]
            if np.issubdtype(np.asarray(value).dtype, np.integer):
                row[name] = int(value)
            else:
                value = float(value)
                row[name] = None if value != value else value
        rows.append(row)
    return rows
