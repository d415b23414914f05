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

Shapes and points napari cannot draw are dropped by :func:`shapes_layer` / :func:`points_layer`
(NaN or infinite coordinates, polygons with fewer than 3 vertices, lines and paths with fewer than
2, rectangles and ellipses without exactly 4 corners, holes of a dropped polygon); the layer
metadata counts them (``dropped_shapes`` / ``dropped_points`` and ``dropped`` in words) and a
warning, which napari shows as a notification, names the file and the count.

Every reader function raises only :class:`RegionFileError` (see :func:`reading`).
"""

from __future__ import annotations

import colorsys
import contextlib
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
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


@contextlib.contextmanager
def reading(path: str | Path, fix: str) -> Iterator[None]:
    """Turn any error escaping a reader into a :class:`RegionFileError` naming the file.

    Readers check what they can and say so in their own messages; this is the net for the rest
    (deeply nested JSON, values of the wrong type in odd places, a file too large for memory).
    """
    try:
        yield
    except RegionFileError:
        raise
    except RecursionError:
        raise file_error(path, "is nested too deeply to read", fix) from None
    except MemoryError:
        raise file_error(path, "needs more memory than is available to read", fix) from None
    except UnicodeDecodeError as exc:
        raise file_error(path, f"is not UTF-8 text (byte {exc.start})", fix) from None
    except OSError as exc:
        raise file_error(path, f"cannot be read ({exc.strerror or exc})", fix) from None
    except Exception as exc:
        detail = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise file_error(path, f"is malformed ({type(exc).__name__}: {detail})", fix) from None


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
        except (TypeError, ValueError, OverflowError):
            return None
        if not all(0.0 <= c <= 255.0 for c in (r, g, b)):  # also False for NaN
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
_MIN_VERTICES = {"polygon": 3, "path": 2, "line": 2}
_EXACT_VERTICES = {"rectangle": 4, "ellipse": 4}


def undrawable(coords: np.ndarray, kind: str) -> str | None:
    """Why napari cannot draw this shape (a short plural phrase for counting), or None."""
    if coords.ndim != 2 or coords.shape[1] < 2:
        return "shapes without (row, col) vertices"
    if not np.isfinite(coords).all():
        return "shapes with NaN or infinite coordinates"
    if kind in _EXACT_VERTICES and len(coords) != _EXACT_VERTICES[kind]:
        return f"{kind}s without 4 corners"
    if len(coords) < _MIN_VERTICES.get(kind, 1):
        return f"{kind}s with fewer than {_MIN_VERTICES[kind]} vertices"
    return None


def _describe(reasons: Counter) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in reasons.items())


def _warn_dropped(name: str, metadata: Mapping[str, Any], what: str, reasons: Counter) -> None:
    source = Path(str(metadata.get("source", name))).name
    warnings.warn(
        f"{source}: dropped {sum(reasons.values())} {what} napari cannot draw ({_describe(reasons)})",
        UserWarning,
        stacklevel=3,
    )


def drop_undrawable_shapes(
    shapes: Sequence[np.ndarray], shape_types: Sequence[str], features: FeatureTable
) -> tuple[list[int], Counter]:
    """Rows to keep and the reasons for the others; a hole of a dropped polygon is dropped too."""
    reasons: Counter = Counter()
    keep = []
    dropped = set()
    holes = features.columns.get("hole_of")
    for i, (coords, kind) in enumerate(zip(shapes, shape_types, strict=True)):
        reason = undrawable(coords, kind)
        if reason is None and holes is not None and holes[i] is not None and holes[i] >= 0:
            if holes[i] in dropped or holes[i] >= len(shapes):
                reason = "holes of a dropped polygon"
        if reason is None:
            keep.append(i)
        else:
            dropped.add(i)
            reasons[reason] += 1
    return keep, reasons


def _subset(features: FeatureTable, keep: list[int], remap_holes: bool) -> FeatureTable:
    out = FeatureTable(features.fills)
    out.columns = {key: [column[i] for i in keep] for key, column in features.columns.items()}
    out.n_rows = len(keep)
    if remap_holes and "hole_of" in out.columns:
        new_row = {old: new for new, old in enumerate(keep)}
        out.columns["hole_of"] = [
            new_row.get(h, -1) if h is not None and h >= 0 else h for h in out.columns["hole_of"]
        ]
    return out


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
) -> LayerData | None:
    """A napari Shapes LayerData; shapes without a colour get :data:`DEFAULT_RGBA`.

    Shapes napari cannot draw are dropped with a warning (see the module docs); None when no shape
    is left.
    """
    shapes = [np.asarray(s, dtype=float) for s in shapes]
    keep, reasons = drop_undrawable_shapes(shapes, shape_types, features)
    metadata = dict(metadata)
    if reasons:
        _warn_dropped(name, metadata, "shape(s)", reasons)
        metadata["dropped_shapes"] = int(metadata.get("dropped_shapes", 0)) + sum(reasons.values())
        metadata["dropped"] = _describe(reasons)
        shapes = [shapes[i] for i in keep]
        shape_types = [shape_types[i] for i in keep]
        edge_rgb = [edge_rgb[i] for i in keep]
        face_alpha = None if face_alpha is None else [face_alpha[i] for i in keep]
        features = _subset(features, keep, remap_holes=True)
        if not shapes:
            return None
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
    return shapes, meta, "shapes"


def points_layer(
    name: str,
    points: np.ndarray,
    features: FeatureTable,
    face_rgb: Sequence[tuple[float, float, float] | None],
    metadata: Mapping[str, Any],
) -> LayerData | None:
    """A napari Points LayerData; points without a colour get :data:`DEFAULT_RGBA`.

    Points with NaN or infinite coordinates are dropped with a warning; None when none is left.
    """
    points = np.asarray(points, dtype=float)
    if points.ndim != 2:
        points = points.reshape(len(points), -1) if points.size else np.zeros((0, 2))
    finite = np.isfinite(points).all(axis=1)
    metadata = dict(metadata)
    if not finite.all():
        reasons = Counter({"points with NaN or infinite coordinates": int((~finite).sum())})
        _warn_dropped(name, metadata, "point(s)", reasons)
        metadata["dropped_points"] = int(reasons.total())
        metadata["dropped"] = _describe(reasons)
        keep = np.flatnonzero(finite).tolist()
        points = points[keep]
        face_rgb = [face_rgb[i] for i in keep]
        features = _subset(features, keep, remap_holes=False)
    if len(points) == 0:
        return None
    faces = np.array([(*rgb, 1.0) if rgb is not None else DEFAULT_RGBA for rgb in face_rgb], float)
    meta = {
        "name": name,
        "features": features.as_dict(),
        "face_color": faces.reshape(-1, 4),
        "size": 5,
        "metadata": dict(metadata),
    }
    return points, meta, "points"


def finish_layers(
    path: str | Path, layers: Sequence[LayerData | None], fix: str
) -> list[LayerData]:
    """The layers that have something to draw; raises when dropping left nothing at all."""
    out = [layer for layer in layers if layer is not None]
    if not out and layers:
        raise file_error(path, "holds only shapes or points napari cannot draw (NaN or infinite "
                         "coordinates, polygons with fewer than 3 vertices, ...)", fix)
    return out
