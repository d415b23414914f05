"""Shared pieces of the region-file readers and writers: the error type, layer-data builders, colours.

Everything here is napari-free: readers return napari *LayerData* tuples ``(data, meta, layer_type)``
built from plain numpy arrays and dicts, so they can be used from scripts, the CLI and the npe2 entry
points alike.

Feature tables are plain ``dict[str, list]`` (one list per column, one entry per shape/point); napari
turns them into its ``features`` table. Two columns are shared by all readers and the GeoJSON writer:

``feature_index``
    index of the source object (GeoJSON feature, ImageJ ROI, COCO annotation) the shape came from.
    Several shapes share it when one object has several parts (MultiPolygon, composite ROI, multi-part
    COCO polygon). The GeoJSON writer groups shapes by it again.
``hole_of``
    ``-1`` for an ordinary shape; for a hole of a polygon, the row of the polygon it cuts out of
    (napari Shapes cannot hold holes, so a hole is kept as its own polygon shape). A region built from
    the layer is the parent polygon minus the polygons whose ``hole_of`` points at it.
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

LayerData = tuple[Any, dict[str, Any], str]

#: Edge colour of shapes that carry no colour of their own (napari's default shapes edge is black,
#: which disappears on dark microscopy images).
DEFAULT_RGBA = (1.0, 1.0, 0.0, 1.0)
#: Faces are drawn see-through so the image stays visible under annotations.
FACE_ALPHA = 0.25


class RegionFileError(ValueError):
    """A region annotation file that cannot be read or written.

    The message names the file, what is wrong and how to fix it; napari shows it as a notification.
    """


def file_error(path: str | Path, problem: str, fix: str) -> RegionFileError:
    """Build the error raised for a malformed file: '<file>: <problem>. <fix>'."""
    return RegionFileError(f"{Path(path).name}: {problem}. {fix}")


def layer_name(path: str | Path, suffix: str = "") -> str:
    """Layer name from the file stem (``cells.geojson`` -> ``cells``)."""
    return f"{Path(path).stem} {suffix}".strip()


# ----------------------------------------------------------------------------------------- colours
def rgb_from_qupath(value: Any) -> tuple[float, float, float] | None:
    """QuPath colour ([r, g, b] 0-255, or a packed (A)RGB int, possibly negative) -> RGB in 0..1."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | np.integer):
        packed = int(value) & 0xFFFFFF
        return ((packed >> 16) & 255) / 255.0, ((packed >> 8) & 255) / 255.0, (packed & 255) / 255.0
    if isinstance(value, Sequence) and len(value) >= 3:
        try:
            r, g, b = (float(v) for v in value[:3])
        except (TypeError, ValueError):
            return None
        return r / 255.0, g / 255.0, b / 255.0
    return None


def rgb_from_hex(value: str | None) -> tuple[float, float, float] | None:
    """'#rrggbb' -> RGB in 0..1 (None for empty)."""
    if not value:
        return None
    text = value.lstrip("#")
    return int(text[0:2], 16) / 255.0, int(text[2:4], 16) / 255.0, int(text[4:6], 16) / 255.0


def rgb255(rgba: Sequence[float]) -> list[int]:
    """RGB(A) in 0..1 -> [r, g, b] ints 0..255 (as QuPath stores them)."""
    return [round(float(c) * 255) for c in rgba[:3]]


def palette_rgb(index: int) -> tuple[float, float, float]:
    """A distinct, bright colour for category ``index`` (golden-angle hue walk)."""
    hue = (index * 0.618033988749895) % 1.0
    return colorsys.hsv_to_rgb(hue, 0.75, 1.0)


# ----------------------------------------------------------------------------------------- features
class FeatureTable:
    """Column-wise feature table filled row by row; columns missing in a row get a fill value."""

    def __init__(self, fills: Mapping[str, Any] | None = None) -> None:
        self.fills: dict[str, Any] = dict(fills or {})
        self.columns: dict[str, list[Any]] = {key: [] for key in self.fills}
        self.n_rows = 0

    def add(self, row: Mapping[str, Any]) -> None:
        for key in row:
            if key not in self.columns:
                self.columns[key] = [self.fills.get(key)] * self.n_rows
        for key, column in self.columns.items():
            column.append(row.get(key, self.fills.get(key)))
        self.n_rows += 1

    def as_dict(self) -> dict[str, list[Any]]:
        return {key: list(values) for key, values in self.columns.items()}


# ----------------------------------------------------------------------------------------- layers
def prepend_axes(coords: np.ndarray, leading: Sequence[float]) -> np.ndarray:
    """(N, 2) row/col coordinates -> (N, k + 2) with the same ``leading`` values on every vertex."""
    if not leading:
        return coords
    lead = np.broadcast_to(np.asarray(leading, dtype=float), (len(coords), len(leading)))
    return np.concatenate([lead, coords], axis=1)


def shapes_layer(
    name: str,
    shapes: Sequence[np.ndarray],
    shape_types: Sequence[str],
    features: FeatureTable,
    edge_rgb: Sequence[tuple[float, float, float] | None],
    metadata: Mapping[str, Any],
    face_alpha: Sequence[float] | None = None,
) -> LayerData:
    """A napari Shapes LayerData; shapes without a colour get :data:`DEFAULT_RGBA`."""
    edges = np.array([(*rgb, 1.0) if rgb is not None else DEFAULT_RGBA for rgb in edge_rgb], float)
    faces = edges.copy()
    faces[:, 3] = FACE_ALPHA if face_alpha is None else np.asarray(face_alpha, float)
    faces[[rgb is None for rgb in edge_rgb], 3] = 0.0
    meta = {
        "name": name,
        "shape_type": list(shape_types),
        "features": features.as_dict(),
        "edge_color": edges.reshape(-1, 4),
        "face_color": faces.reshape(-1, 4),
        "edge_width": 1,
        "metadata": dict(metadata),
    }
    return [np.asarray(s, dtype=float) for s in shapes], meta, "shapes"


def points_layer(
    name: str,
    points: np.ndarray,
    features: FeatureTable,
    face_rgb: Sequence[tuple[float, float, float] | None],
    metadata: Mapping[str, Any],
) -> LayerData:
    """A napari Points LayerData; points without a colour get :data:`DEFAULT_RGBA`."""
    faces = np.array([(*rgb, 1.0) if rgb is not None else DEFAULT_RGBA for rgb in face_rgb], float)
    meta = {
        "name": name,
        "features": features.as_dict(),
        "face_color": faces.reshape(-1, 4),
        "size": 5,
        "metadata": dict(metadata),
    }
    return np.asarray(points, dtype=float), meta, "points"
