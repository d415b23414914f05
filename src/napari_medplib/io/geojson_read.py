"""QuPath-style GeoJSON -> napari Shapes and Points layer data.

Accepted layouts (QuPath writes all of them): a ``FeatureCollection``, a bare list of features, a
single ``Feature``, or a bare geometry. Geometries:

* ``Polygon`` -> one ``polygon`` shape (the closing vertex dropped), or ``rectangle`` when the ring is
  an axis-aligned 4-corner box (QuPath writes rectangles that way). Holes (interior rings) become
  polygon shapes of their own with ``hole_of`` = row of their polygon (see :mod:`._common`).
  A polygon written by our writer from a napari ellipse carries the ellipse's four corners in the
  ``napariEllipse`` property and comes back as an ``ellipse``; ``napariShapeType: "polygon"`` keeps
  a box-shaped polygon a polygon.
* ``MultiPolygon`` -> one shape per part, all sharing the feature's row values and ``feature_index``.
* ``LineString`` -> ``line`` (2 vertices) or ``path``; ``MultiLineString`` -> one per part.
* ``Point`` / ``MultiPoint`` -> rows of a Points layer.
* ``GeometryCollection`` -> its members, each as above.

Coordinates: GeoJSON (x, y) becomes napari (row, col) = (y, x), unchanged otherwise (no half-pixel
shift, see the package docs). A QuPath ``plane`` with non-zero ``z`` or ``t`` on any feature adds
leading t and/or z axes to every shape and point of the file.

Feature columns: ``class`` (classification name; QuPath derived classes joined with ': '), ``id``,
``name``, ``objectType``, ``isLocked``, measurements as ``measurements.<name>``, every other scalar
property as its own column (lists/dicts as JSON text), plus ``feature_index`` and ``hole_of``.
The classification colour becomes the shape edge/face colour (faces translucent) or the point colour.

Malformed input: ``properties`` that are not an object are ignored; a ``plane`` value that is not
a finite whole number reads as plane 0; geometries napari cannot draw (NaN coordinates, polygons
with fewer than 3 vertices, empty points) are dropped with a warning (see :mod:`._common`);
anything else raises :class:`RegionFileError` naming the file.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._common import (
    FACE_ALPHA,
    FeatureTable,
    LayerData,
    file_error,
    finish_layers,
    layer_name,
    points_layer,
    prepend_axes,
    reading,
    rgb_from_qupath,
    shapes_layer,
)

SHAPE_GEOMETRIES = {"Polygon", "MultiPolygon", "LineString", "MultiLineString"}
POINT_GEOMETRIES = {"Point", "MultiPoint"}
ALL_GEOMETRIES = SHAPE_GEOMETRIES | POINT_GEOMETRIES | {"GeometryCollection"}
ELLIPSE_PROPERTY = "napariEllipse"
SHAPE_TYPE_PROPERTY = "napariShapeType"
_FILLS = {"feature_index": -1, "hole_of": -1, "class": ""}
FIX = "Export the annotations again (QuPath: File > Export objects as GeoJSON)"
#: Largest QuPath plane index (z or t) accepted; larger values read as plane 0.
MAX_PLANE = 1_000_000


def read_geojson(path: str | Path) -> list[LayerData]:
    """Read a (QuPath) GeoJSON file into up to two layers: shapes and points.

    Raises :class:`RegionFileError` for an empty, truncated or non-GeoJSON file, or one without
    any supported geometry.
    """
    path = Path(path)
    with reading(path, FIX):
        return _read_geojson(path)


def _read_geojson(path: Path) -> list[LayerData]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise file_error(
            path, f"cannot be read ({exc.strerror})", "Check the path and permissions"
        ) from exc
    if not text.strip():
        raise file_error(path, "the file is empty", "Export the annotations again from QuPath")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise file_error(
            path,
            f"is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
            "the file may be truncated",
            FIX,
        ) from exc
    return geojson_to_layers(document, path)


def geojson_to_layers(document: Any, path: str | Path = "annotations.geojson") -> list[LayerData]:
    """Convert a parsed GeoJSON document (see module docs) into napari layer data."""
    features = _features_of(document, path)
    planes = [_plane(f) for f in features]
    axes = [a for a in ("t", "z") if any(p.get(a, 0) for p in planes)]
    collector = _Collector(axes)
    for index, (feature, plane) in enumerate(zip(features, planes, strict=True)):
        props = feature.get("properties")
        row, rgb = _properties_row(props if isinstance(props, Mapping) else {})
        row["feature_index"] = index
        leading = [float(plane.get(a, 0)) for a in axes]
        ellipse = _ellipse_corners(row.pop(ELLIPSE_PROPERTY, None))
        collector.force_polygon = row.pop(SHAPE_TYPE_PROPERTY, None) == "polygon"
        collector.add_geometry(feature.get("geometry"), row, rgb, leading, ellipse, path, index)
    if collector.empty:
        raise file_error(
            path,
            "contains no Polygon, MultiPolygon, LineString, Point or MultiPoint geometry",
            "Check that this is an annotation export, not e.g. a measurement table",
        )
    metadata = {"source": str(path), "format": "geojson", "axes": (*axes, "y", "x")}
    return finish_layers(path, collector.layers(layer_name(path), metadata), FIX)


# ----------------------------------------------------------------------------------------- structure
def _features_of(document: Any, path: str | Path) -> list[Mapping[str, Any]]:
    """The list of Feature dicts of any accepted layout."""
    if isinstance(document, list):
        items = document
    elif isinstance(document, Mapping) and document.get("type") == "FeatureCollection":
        items = document.get("features")
        if not isinstance(items, list):
            raise file_error(
                path, "the FeatureCollection has no 'features' list", "Export the file again"
            )
    elif isinstance(document, Mapping) and document.get("type") == "Feature":
        items = [document]
    elif isinstance(document, Mapping) and document.get("type") in ALL_GEOMETRIES:
        items = [{"type": "Feature", "geometry": document, "properties": {}}]
    else:
        kind = document.get("type") if isinstance(document, Mapping) else type(document).__name__
        raise file_error(
            path,
            f"is JSON but not GeoJSON (top level is {kind!r}, expected a FeatureCollection, "
            "a Feature, a geometry or a list of features)",
            "Open a GeoJSON annotation export (QuPath: File > Export objects as GeoJSON)",
        )
    bad = [i for i, f in enumerate(items) if not isinstance(f, Mapping) or "geometry" not in f]
    if bad:
        raise file_error(
            path,
            f"item {bad[0]} of the feature list is not a GeoJSON Feature (no 'geometry')",
            "Each entry must be {'type': 'Feature', 'geometry': ..., 'properties': ...}",
        )
    return items


def _plane(feature: Mapping[str, Any]) -> dict[str, int]:
    """QuPath's image plane of a feature ({'c', 'z', 't'}; absent = 0)."""
    geometry = feature.get("geometry")
    plane = geometry.get("plane") if isinstance(geometry, Mapping) else None
    if not isinstance(plane, Mapping):
        return {}
    return {
        k: int(v)
        for k, v in plane.items()
        if k in ("z", "t")
        and isinstance(v, int | float)
        and not isinstance(v, bool)
        and abs(v) <= MAX_PLANE  # False for NaN
        and float(v).is_integer()
    }


def _properties_row(
    props: Mapping[str, Any],
) -> tuple[dict[str, Any], tuple[float, float, float] | None]:
    """Flatten QuPath properties into one feature row, plus the classification colour."""
    row: dict[str, Any] = {}
    rgb = None
    for key, value in props.items():
        if key == "classification" and isinstance(value, Mapping):
            names = value.get("names")
            name = ": ".join(map(str, names)) if isinstance(names, list) else value.get("name", "")
            row["class"] = name if isinstance(name, str) else json.dumps(name)
            rgb = rgb_from_qupath(value.get("color", value.get("colorRGB")))
        elif key == "classification" and isinstance(value, str):
            row["class"] = value
        elif key in ("objectType", "object_type"):
            row["objectType"] = value if isinstance(value, str | None) else json.dumps(value)
        elif key == "measurements" and isinstance(value, Mapping):
            row.update({f"measurements.{k}": _scalar(v) for k, v in value.items()})
        elif key == "measurements" and isinstance(value, list):
            row.update(
                {
                    f"measurements.{m.get('name')}": _scalar(m.get("value"))
                    for m in value
                    if isinstance(m, Mapping)
                }
            )
        elif key in (ELLIPSE_PROPERTY, SHAPE_TYPE_PROPERTY):
            row[key] = value
        elif isinstance(value, list | Mapping):
            row[key] = json.dumps(value)
        else:
            row[key] = value
    if rgb is None and "color" in props:
        rgb = rgb_from_qupath(props.get("color"))
    return row, rgb


def _scalar(value: Any) -> Any:
    """A feature value napari can hold in a table cell: lists and objects as JSON text."""
    return json.dumps(value) if isinstance(value, list | Mapping) else value


def _ellipse_corners(value: Any) -> np.ndarray | None:
    """Our writer's 'napariEllipse' property: the four (x, y) corners -> (4, 2) row/col, else None."""
    try:
        corners = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        return None
    if corners.shape != (4, 2):
        return None
    return corners[:, ::-1].copy()


# ----------------------------------------------------------------------------------------- geometry
def ring_to_rowcol(ring: Any) -> np.ndarray:
    """GeoJSON ring/line [[x, y(, z)], ...] -> (N, 2) float (row, col), closing vertex dropped."""
    xy = np.asarray(ring, dtype=float)
    if xy.ndim != 2 or xy.shape[1] < 2 or len(xy) == 0:
        raise ValueError("coordinates must be a list of [x, y] pairs")
    xy = xy[:, :2]
    if len(xy) > 1 and np.array_equal(xy[0], xy[-1]):
        xy = xy[:-1]
    return xy[:, ::-1].copy()


def is_axis_aligned_box(rowcol: np.ndarray) -> bool:
    """Four corners going round an axis-aligned rectangle of non-zero size."""
    if rowcol.shape != (4, 2):
        return False
    corners = rowcol.tolist()  # plain floats: this runs for every 4-vertex polygon of a file
    for (r0, c0), (r1, c1) in zip(corners, corners[1:] + corners[:1], strict=True):
        if (r0 == r1) == (c0 == c1):  # each edge must change exactly one coordinate
            return False
    return len({r for r, _ in corners}) == 2 and len({c for _, c in corners}) == 2


class _Collector:
    """Accumulates shapes and points with their feature rows while walking the features."""

    def __init__(self, axes: list[str]) -> None:
        self.axes = axes
        self.force_polygon = False
        self.shapes: list[np.ndarray] = []
        self.shape_types: list[str] = []
        self.shape_rgb: list[Any] = []
        self.shape_rows = FeatureTable(_FILLS)
        self.points: list[np.ndarray] = []
        self.point_rgb: list[Any] = []
        self.point_rows = FeatureTable({"feature_index": -1, "class": ""})
        self.empty_points = 0

    @property
    def empty(self) -> bool:
        return not self.shapes and not self.points

    def _shape(self, coords, kind, row, rgb, leading) -> int:
        self.shapes.append(prepend_axes(coords, leading))
        self.shape_types.append(kind)
        self.shape_rgb.append(rgb)
        self.shape_rows.add(row)
        return len(self.shapes) - 1

    def _polygon(self, rings, row, rgb, leading, ellipse) -> None:
        if not isinstance(rings, list) or not rings:
            raise ValueError("a Polygon needs at least one ring")
        outer = ring_to_rowcol(rings[0])
        if ellipse is not None and len(rings) == 1:
            parent = self._shape(ellipse, "ellipse", row, rgb, leading)
        else:
            box = is_axis_aligned_box(outer) and not self.force_polygon
            kind = "rectangle" if box else "polygon"
            parent = self._shape(outer, kind, row, rgb, leading)
        for hole in rings[1:]:
            self._shape(ring_to_rowcol(hole), "polygon", {**row, "hole_of": parent}, rgb, leading)

    def add_geometry(self, geometry, row, rgb, leading, ellipse, path, index) -> None:
        if geometry is None:  # QuPath's root object / objects without ROI: nothing to draw
            return
        kind = geometry.get("type") if isinstance(geometry, Mapping) else None
        if kind not in ALL_GEOMETRIES:
            raise file_error(
                path,
                f"feature {index} has geometry type {kind!r}, which is not a GeoJSON geometry "
                f"napari can show (supported: {', '.join(sorted(ALL_GEOMETRIES))})",
                "Remove or convert that feature",
            )
        coords = geometry.get("coordinates")
        try:
            if kind == "GeometryCollection":
                for member in geometry.get("geometries") or []:
                    self.add_geometry(member, row, rgb, leading, None, path, index)
            elif kind == "Polygon":
                self._polygon(coords, row, rgb, leading, ellipse)
            elif kind == "MultiPolygon":
                for part in coords:
                    self._polygon(part, row, rgb, leading, None)
            elif kind in ("LineString", "MultiLineString"):
                for line in [coords] if kind == "LineString" else coords:
                    rowcol = np.asarray(line, dtype=float)[:, 1::-1].copy()
                    self._shape(rowcol, "line" if len(rowcol) == 2 else "path", row, rgb, leading)
            else:  # Point / MultiPoint
                pts = np.asarray(coords, dtype=float)
                if pts.size == 0:  # an empty MultiPoint: nothing to draw
                    self.empty_points += 1
                    return
                pts = np.atleast_2d(pts)
                if pts.ndim != 2 or pts.shape[1] < 2:
                    raise ValueError("a point needs [x, y]")
                for point in pts[:, 1::-1]:
                    self.points.append(prepend_axes(point[None, :], leading)[0])
                    self.point_rgb.append(rgb)
                    self.point_rows.add(row)
        except (ValueError, TypeError, IndexError, AttributeError) as exc:
            raise file_error(
                path,
                f"feature {index} ({kind}) has malformed coordinates ({exc})",
                "Each vertex must be an [x, y] pair of numbers",
            ) from exc

    def layers(self, name: str, metadata: dict[str, Any]) -> list[LayerData | None]:
        if self.empty_points:
            warnings.warn(
                f"{Path(str(metadata.get('source', name))).name}: dropped {self.empty_points} "
                "point geometry(ies) without coordinates",
                UserWarning,
                stacklevel=3,
            )
        out = []
        if self.shapes:
            alpha = [0.0 if h >= 0 else FACE_ALPHA for h in self.shape_rows.columns["hole_of"]]
            out.append(
                shapes_layer(
                    name,
                    self.shapes,
                    self.shape_types,
                    self.shape_rows,
                    self.shape_rgb,
                    metadata,
                    face_alpha=alpha,
                )
            )
        if self.points:
            data = np.asarray(self.points, dtype=float).reshape(len(self.points), -1)
            out.append(
                points_layer(
                    f"{name} points" if self.shapes else name,
                    data,
                    self.point_rows,
                    self.point_rgb,
                    metadata,
                )
            )
        return out
