"""napari Shapes, Points and Labels layer data -> QuPath-importable GeoJSON FeatureCollections.

Coordinates are written as the layer's *data* coordinates, (row, col) -> (x=col, y=row); the layer's
scale, translate and other transforms are not applied, because QuPath works in image pixels (open
the file over the same image the layer annotates). Leading (non-spatial) axes of nD shapes and
points go into QuPath's geometry ``plane`` (``z`` for 3-D data, ``t`` and ``z`` for 4-D), rounded to
whole planes.

Shapes: ``polygon`` -> Polygon, ``rectangle`` -> Polygon (closed 4-corner ring), ``ellipse`` -> Polygon
of 64 vertices plus the ellipse's four corners in the ``napariEllipse`` property (our reader turns it
back into an ellipse; QuPath sees a polygon), ``path`` and ``line`` -> LineString. A polygon that
looks like an axis-aligned box carries ``napariShapeType: "polygon"`` so it is not read back as a
rectangle. Shapes sharing a
``feature_index`` are written as one MultiPolygon / MultiLineString / GeometryCollection, and shapes
with ``hole_of`` >= 0 become interior rings of the polygon they point at (see :mod:`._common`), so
files read by :mod:`.geojson_read` round-trip.

Properties: ``objectType`` (``"annotation"`` unless the layer has that column), ``classification``
``{name, color}`` from the ``class`` feature and the shape/point face colour, ``id`` as the feature
id, ``measurements.<name>`` columns back into ``measurements``, every other feature column as a
property (missing values, NaN and infinite numbers left out; dates and times as ISO 8601 text,
other objects as their text).

Files are written atomically (:mod:`napari_medplib.atomic`): a document that cannot be written (a
NaN or infinite vertex, a full disk) raises :class:`RegionFileError` and leaves an existing file
unchanged.

Labels: one feature per label id, Polygon or MultiPolygon with holes, outlined along pixel edges in
QuPath's convention (pixel (r, c) covers x in [c, c+1], y in [r, r+1]; see :mod:`.outlines`).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write
from ._common import RegionFileError, rgb255
from .geojson_read import ELLIPSE_PROPERTY, SHAPE_TYPE_PROPERTY, is_axis_aligned_box

ELLIPSE_VERTICES = 64
_INTERNAL = {
    "feature_index",
    "hole_of",
    "class",
    "objectType",
    "id",
    ELLIPSE_PROPERTY,
    SHAPE_TYPE_PROPERTY,
}
_AREA_TYPES = {"polygon", "rectangle", "ellipse"}


# ----------------------------------------------------------------------------------------- public
def write_geojson(path: str | Path, document: Mapping[str, Any]) -> list[str]:
    """Write a GeoJSON document; returns ``[path]`` as npe2 writers do."""
    path = Path(path)
    try:
        text = json.dumps(document, indent=1, allow_nan=False, default=_json_default)
    except (ValueError, TypeError, RecursionError) as exc:
        raise RegionFileError(
            f"{path.name}: cannot be written as GeoJSON ({exc}); the existing file is unchanged"
        ) from exc
    try:
        with atomic_write(path, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as exc:
        raise RegionFileError(
            f"{path.name}: cannot be written ({exc.strerror or exc}); the existing file is "
            "unchanged. Check the free space and permissions of the folder"
        ) from exc
    return [str(path)]


def _json_default(value: Any) -> Any:
    """JSON for values json does not know: numpy scalars/arrays, dates, anything else as text."""
    if isinstance(value, np.generic):
        return _plain(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, _dt.date | _dt.time):
        return value.isoformat()
    return str(value)


def _check_finite(coords: np.ndarray, what: str) -> None:
    if not np.isfinite(coords).all():
        raise RegionFileError(
            f"{what} has a NaN or infinite vertex, which GeoJSON cannot hold; fix or delete it "
            "before saving (the existing file is unchanged)"
        )


def shapes_to_geojson(data: Sequence[Any], meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A napari Shapes layer's data and state dict -> GeoJSON FeatureCollection."""
    meta = meta or {}
    shapes = [np.asarray(s, dtype=float) for s in data]
    n = len(shapes)
    for i, coords in enumerate(shapes):
        _check_finite(coords, f"shape {i}")
    types = meta.get("shape_type", "polygon")
    types = [types] * n if isinstance(types, str) else list(types)
    rows = feature_rows(meta, n)
    colours = _colours(meta.get("face_color"), n)
    holes = _holes(rows, types, n)
    groups = _groups(rows, [i for i in range(n) if i not in holes.keys()])
    features = []
    for members in groups:
        parts = []
        for i in members:
            kind = types[i]
            if kind in _AREA_TYPES:
                rings = [_closed(_outline(shapes[i], kind))]
                rings += [_closed(_xy(shapes[h])) for h in holes.values_of(i)]
                parts.append(("Polygon", rings))
            elif kind in ("path", "line"):
                parts.append(("LineString", _xy(shapes[i]).tolist()))
            else:
                raise RegionFileError(f"cannot write shape type {kind!r} to GeoJSON")
        first = members[0]
        props = _properties(rows[first], colours[first])
        if len(members) == 1 and types[first] == "ellipse":
            props[ELLIPSE_PROPERTY] = _xy(shapes[first]).tolist()
        if (
            len(members) == 1
            and types[first] == "polygon"
            and is_axis_aligned_box(shapes[first][:, -2:])
        ):
            props[SHAPE_TYPE_PROPERTY] = "polygon"  # else it would come back as a rectangle
        geometry = _merge(parts)
        _set_plane(geometry, shapes[first])
        features.append(_feature(geometry, props, rows[first]))
    return {"type": "FeatureCollection", "features": features}


def points_to_geojson(data: Any, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A napari Points layer's data and state dict -> GeoJSON FeatureCollection.

    Points sharing a ``feature_index`` become one MultiPoint (as QuPath stores point annotations);
    without that column each point is its own Point feature.
    """
    meta = meta or {}
    points = np.asarray(data, dtype=float).reshape(len(data), -1) if len(data) else np.zeros((0, 2))
    for i in np.flatnonzero(~np.isfinite(points).all(axis=1))[:1]:
        _check_finite(points[i], f"point {i}")
    rows = feature_rows(meta, len(points))
    colours = _colours(meta.get("face_color"), len(points))
    features = []
    for members in _groups(rows, list(range(len(points)))):
        coords = [[float(points[i, -1]), float(points[i, -2])] for i in members]
        geometry = (
            {"type": "Point", "coordinates": coords[0]}
            if len(coords) == 1
            else {"type": "MultiPoint", "coordinates": coords}
        )
        _set_plane(geometry, points[members[0]][None, :])
        features.append(
            _feature(geometry, _properties(rows[members[0]], colours[members[0]]), rows[members[0]])
        )
    return {"type": "FeatureCollection", "features": features}


def labels_to_geojson(data: Any, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A 2-D napari Labels layer -> one Polygon/MultiPolygon feature per label id (holes kept).

    Label features (napari's ``features`` table with an ``index`` column = label id) are copied into
    the properties; a ``class`` column becomes the QuPath classification.
    """
    from scipy import ndimage

    from .outlines import mask_to_polygons

    meta = meta or {}
    labels = np.asarray(data)
    if labels.ndim != 2:
        raise RegionFileError(
            f"only 2-D Labels layers can be written as GeoJSON polygons (this one has shape "
            f"{labels.shape}); take one plane first, e.g. layer.data[z]"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise RegionFileError(f"Labels data must be integers, got {labels.dtype}")
    table = _label_table(meta)
    name = meta.get("name") or "label"
    features = []
    # Compact ids first: find_objects allocates one slot per id up to the largest one.
    ids, compact = np.unique(np.where(labels > 0, labels, 0), return_inverse=True)
    compact = compact.reshape(labels.shape)
    if ids[0] != 0:  # no background pixel: keep index 0 for background all the same
        ids, compact = np.concatenate([[0], ids]), compact + 1
    boxes = ndimage.find_objects(compact)
    for index in range(1, len(ids)):
        label = ids[index]
        box = boxes[index - 1]
        crop = compact[box] == index
        offset = np.array([box[1].start, box[0].start], dtype=float)
        polygons = mask_to_polygons(crop)
        parts = [
            [_closed(ext + offset)] + [_closed(h + offset) for h in holes]
            for ext, holes in polygons
        ]
        geometry = (
            {"type": "Polygon", "coordinates": parts[0]}
            if len(parts) == 1
            else {"type": "MultiPolygon", "coordinates": parts}
        )
        row = {"name": f"{name} {int(label)}", "label": int(label), **table.get(int(label), {})}
        features.append(_feature(geometry, _properties(row, None), row))
    return {"type": "FeatureCollection", "features": features}


# ----------------------------------------------------------------------------------------- features
def feature_rows(meta: Mapping[str, Any], n: int) -> list[dict[str, Any]]:
    """Per-shape feature rows from a layer state dict (``features`` table or ``properties``)."""
    table = meta.get("features")
    if table is None or len(_columns(table)) == 0:
        table = meta.get("properties")
    columns = _columns(table) if table is not None else {}
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    for key, values in columns.items():
        values = list(values)
        if len(values) != n:
            continue
        for row, value in zip(rows, values, strict=True):
            row[str(key)] = value
    return rows


def _columns(table: Any) -> dict[str, Any]:
    # a pandas DataFrame (what napari hands writers), recognised without importing pandas
    if hasattr(table, "to_dict") and hasattr(table, "columns"):
        return {str(c): list(table[c]) for c in table.columns}
    if isinstance(table, Mapping):
        return {str(k): v for k, v in table.items()}
    return {}


def _plain(value: Any) -> Any:
    """numpy scalars -> Python; None, NaN, +-Infinity and NaT -> None (left out); dates -> ISO text."""
    if value is None:
        return None
    if isinstance(value, np.datetime64 | np.timedelta64):
        return None if np.isnat(value) else str(value)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, _dt.date | _dt.time):  # datetime and pandas Timestamp included
        return None if str(value) == "NaT" else value.isoformat()
    return value


def _properties(row: Mapping[str, Any], rgb: Sequence[float] | None) -> dict[str, Any]:
    props: dict[str, Any] = {"objectType": _plain(row.get("objectType")) or "annotation"}
    class_name = _plain(row.get("class"))
    if isinstance(class_name, str) and class_name:
        props["classification"] = {"name": class_name}
        if rgb is not None:
            props["classification"]["color"] = rgb255(rgb)
    measurements = {}
    for key, value in row.items():
        value = _plain(value)
        if key in _INTERNAL or value is None:
            continue
        if key.startswith("measurements."):
            measurements[key.removeprefix("measurements.")] = value
        else:
            props[key] = value
    if measurements:
        props["measurements"] = measurements
    return props


def _feature(
    geometry: dict[str, Any], props: dict[str, Any], row: Mapping[str, Any]
) -> dict[str, Any]:
    feature: dict[str, Any] = {"type": "Feature"}
    ident = _plain(row.get("id"))
    if ident not in (None, ""):
        feature["id"] = ident
    feature["geometry"] = geometry
    feature["properties"] = props
    return feature


def _label_table(meta: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    columns = _columns(meta.get("features")) if meta.get("features") is not None else {}
    if "index" not in columns:
        return {}
    out: dict[int, dict[str, Any]] = {}
    for i, label in enumerate(columns["index"]):
        out[int(label)] = {k: v[i] for k, v in columns.items() if k != "index" and len(v) > i}
    return out


# ----------------------------------------------------------------------------------------- geometry
class _HoleMap(dict):
    def values_of(self, parent: int) -> list[int]:
        return [hole for hole, p in self.items() if p == parent]


def _holes(rows: list[dict[str, Any]], types: list[str], n: int) -> _HoleMap:
    """{hole shape: parent shape} for valid ``hole_of`` entries (parent an area shape, not a hole)."""
    holes = _HoleMap()
    for i, row in enumerate(rows):
        parent = _plain(row.get("hole_of"))
        if isinstance(parent, int | float) and 0 <= parent < n and int(parent) != i:
            if types[int(parent)] in _AREA_TYPES and types[i] in _AREA_TYPES:
                holes[i] = int(parent)
    for hole in list(holes):  # a hole of a hole is written as an ordinary shape
        if holes[hole] in holes:
            del holes[hole]
    return holes


def _groups(rows: list[dict[str, Any]], members: list[int]) -> list[list[int]]:
    """Group indices by ``feature_index`` (order of first appearance); others stay alone."""
    groups: dict[Any, list[int]] = {}
    for i in members:
        key = _plain(rows[i].get("feature_index"))
        key = ("feature", int(key)) if isinstance(key, int | float) and key >= 0 else ("single", i)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _xy(coords: np.ndarray) -> np.ndarray:
    """(N, D) napari coordinates -> (N, 2) (x, y)."""
    return coords[:, [-1, -2]]


def _outline(coords: np.ndarray, kind: str) -> np.ndarray:
    if kind != "ellipse":
        return _xy(coords)
    corners = _xy(coords)
    centre = corners.mean(axis=0)
    half_u = (corners[1] - corners[0]) / 2
    half_v = (corners[3] - corners[0]) / 2
    angles = np.linspace(0, 2 * np.pi, ELLIPSE_VERTICES, endpoint=False)
    return centre + np.cos(angles)[:, None] * half_u + np.sin(angles)[:, None] * half_v


def _closed(xy: np.ndarray) -> list[list[float]]:
    ring = np.asarray(xy, dtype=float).tolist()
    if ring and ring[0] != ring[-1]:
        ring.append(list(ring[0]))
    return ring


def _merge(parts: list[tuple[str, Any]]) -> dict[str, Any]:
    kinds = {kind for kind, _ in parts}
    if len(parts) == 1:
        kind, coords = parts[0]
        return {"type": kind, "coordinates": coords}
    if kinds == {"Polygon"}:
        return {"type": "MultiPolygon", "coordinates": [coords for _, coords in parts]}
    if kinds == {"LineString"}:
        return {"type": "MultiLineString", "coordinates": [coords for _, coords in parts]}
    return {
        "type": "GeometryCollection",
        "geometries": [{"type": kind, "coordinates": coords} for kind, coords in parts],
    }


def _set_plane(geometry: dict[str, Any], coords: np.ndarray) -> None:
    """Leading axes -> QuPath's plane: 3-D -> z; 4-D -> t, z."""
    lead = coords.shape[1] - 2
    if lead <= 0:
        return
    if lead > 2:
        raise RegionFileError(
            f"GeoJSON planes hold at most t and z, but the data has {coords.shape[1]} dimensions; "
            "project the layer to (t,) z, y, x first"
        )
    values = [round(float(v)) for v in coords[0, :lead]]
    plane = {"c": -1, "z": values[-1], "t": values[0] if lead == 2 else 0}
    geometry["plane"] = plane


def _colours(face_color: Any, n: int) -> list[np.ndarray | None]:
    """Per-item RGBA in 0..1 from a layer's face_color (array or single colour), else None."""
    if face_color is None or isinstance(face_color, str):
        return [None] * n
    try:
        colours = np.asarray(face_color, dtype=float)
    except (TypeError, ValueError):
        return [None] * n
    if colours.ndim == 1 and colours.shape[0] in (3, 4):
        return [colours] * n
    if colours.ndim == 2 and colours.shape[0] == n and colours.shape[1] in (3, 4):
        return list(colours)
    return [None] * n
