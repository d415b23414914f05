"""ImageJ/Fiji ROI files (single ``.roi`` or RoiSet ``.zip``) -> napari Shapes and Points layer data.

Decoding is done by ``roifile``; this module maps ROI types onto napari shapes:

=====================================  =====================================================
ImageJ ROI                             napari
=====================================  =====================================================
rectangle (also rounded)               ``rectangle`` (corner arc size in ``arc_size``)
oval                                   ``ellipse`` (its bounding box corners)
polygon, freehand, traced, fitted       ``polygon`` (ImageJ's fitted ellipse and rotated
ellipse, rotated rectangle             rectangle come as their outline polygon)
straight line (also arrow)             ``line``
segmented line, freehand line, angle   ``path``
point / multi-point                    Points layer rows (``counter`` = ImageJ counter)
composite (shape ROI)                  one ``polygon`` per sub-path; sub-paths inside an odd
                                       number of others are holes (``hole_of``, see _common)
=====================================  =====================================================

Text, image and empty ROIs carry no region and are skipped (their count is in layer metadata).
Subpixel coordinates are used where the ROI stores them. ImageJ (x, y) becomes napari (row, col).

Stack positions: ImageJ stores 1-based ``t_position``, ``z_position``, ``c_position`` (hyperstacks)
or a plain stack ``position`` (0 = not set / all planes; it also stores 1 for single-plane images).
An axis is added in front of (row, col), in the order t, z, c (ImageJ hyperstack TIFF order TZCYX),
or a single ``position`` axis, only when some ROI lies beyond the first plane on it. Coordinates
there are 0-based (position - 1; unset positions go to plane 0); the raw ImageJ values stay in the
features ``t_position``, ``z_position``, ``c_position`` and ``position``.

Other feature columns: ``name``, ``roi_type``, ``group``, ``stroke_color`` ('#rrggbb' or ''),
``feature_index`` (index of the ROI in the file) and ``hole_of``. The stroke colour also becomes the
shape's edge colour.

Limits, checked before a byte is decompressed (zip members are then read one at a time, header
first, and never beyond their declared size): at most :data:`MAX_ROI_BYTES` per ROI, at most
:data:`MAX_ROI_COUNT` ROIs, and the members together at most :data:`MAX_ZIP_EXPANSION` times the
archive (plus :data:`ZIP_SLACK_BYTES`): RoiSets compress a few times, zip bombs a thousand times.
Composite ROIs with more than :data:`MAX_HOLE_PARTS` sub-paths keep every sub-path as an outer
polygon (the hole test compares every pair). Shapes napari cannot draw are dropped with a warning
(see :mod:`._common`); anything else raises :class:`RegionFileError` naming the file.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ._common import (
    FeatureTable,
    LayerData,
    file_error,
    finish_layers,
    layer_name,
    points_layer,
    prepend_axes,
    reading,
    rgb_from_hex,
    shapes_layer,
)

ROI_MAGIC = b"Iout"
POSITION_AXES = ("t_position", "z_position", "c_position")
_FILLS = {"feature_index": -1, "hole_of": -1}
FIX = "Save the ROIs again from ImageJ/Fiji's ROI Manager"
#: Largest single ROI (a 2-million-vertex subpixel polygon is 16 MiB).
MAX_ROI_BYTES = 32 * 2**20
#: Most ROIs in one RoiSet.
MAX_ROI_COUNT = 1_000_000
#: Most bytes the members of a RoiSet may decompress to, per byte of the archive ...
MAX_ZIP_EXPANSION = 8
#: ... plus this allowance (small archives of near-empty ROIs compress well).
ZIP_SLACK_BYTES = 2**20
#: Composite ROIs with more sub-paths than this are not searched for holes.
MAX_HOLE_PARTS = 500


def zip_has_rois(path: str | Path) -> bool:
    """True for a readable zip archive with at least one ``.roi`` member (cheap: reads the index)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.lower().endswith(".roi") for name in archive.namelist())
    except Exception:  # any damage: not ours to open (npe2 readers must not raise)
        return False


def _decode(path: Path, member: str, blob: bytes, zipped: bool) -> Any:
    from roifile import ImagejRoi

    if len(blob) < 64 or not blob.startswith(ROI_MAGIC):
        what = "is empty" if not blob else "is not an ImageJ ROI (no 'Iout' header)"
        where = f"member {member!r} " if zipped else ""
        raise file_error(path, f"{where}{what}", "Save the ROI again from ImageJ/Fiji")
    try:
        return ImagejRoi.frombytes(blob)
    except Exception as exc:  # roifile raises assorted struct/value errors on corrupt data
        detail = str(exc).splitlines()[0][:120] if str(exc) else ""
        raise file_error(
            path,
            f"ROI {member!r} is corrupt ({type(exc).__name__}: {detail})",
            "Save the ROI again from ImageJ/Fiji",
        ) from None


def _members(path: Path, archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """The ``.roi`` members, after checking their declared sizes against the limits."""
    members = [i for i in archive.infolist() if i.filename.lower().endswith(".roi")]
    if len(members) > MAX_ROI_COUNT:
        raise file_error(path, f"holds {len(members):,} ROIs (at most {MAX_ROI_COUNT:,})", FIX)
    big = next((i for i in members if i.file_size > MAX_ROI_BYTES), None)
    if big is not None:
        raise file_error(
            path,
            f"member {big.filename!r} declares {big.file_size:,} bytes, more than an ImageJ ROI "
            f"holds (at most {MAX_ROI_BYTES:,})",
            FIX,
        )
    total = sum(i.file_size for i in members)
    allowed = MAX_ZIP_EXPANSION * path.stat().st_size + ZIP_SLACK_BYTES
    if total > allowed:
        raise file_error(
            path,
            f"its ROIs decompress to {total:,} bytes, more than {MAX_ZIP_EXPANSION}x the archive "
            "(a RoiSet compresses a few times; this looks like a damaged file or a zip bomb)",
            FIX,
        )
    return members


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """A member's bytes, reading its header first and never more than its declared size."""
    with archive.open(info) as handle:
        head = handle.read(len(ROI_MAGIC))
        if head != ROI_MAGIC:
            return head
        return head + handle.read(info.file_size - len(head))


def iter_rois(path: str | Path) -> Any:
    """Yield the decoded ROIs of a ``.roi`` file or a RoiSet ``.zip`` one by one (limits checked)."""
    path = Path(path)
    if path.suffix.lower() != ".zip":
        if path.stat().st_size > MAX_ROI_BYTES:
            raise file_error(path, f"is larger than an ImageJ ROI ({MAX_ROI_BYTES:,} bytes at most)", FIX)
        yield _decode(path, path.name, path.read_bytes(), zipped=False)
        return
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise file_error(path, f"cannot be read ({exc})", FIX) from None
    with archive:
        members = _members(path, archive)
        if not members:
            raise file_error(
                path, "contains no .roi files", "Save a RoiSet from ImageJ's ROI Manager (More > Save)"
            )
        for info in members:
            try:
                blob = _read_member(archive, info)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError) as exc:
                raise file_error(
                    path, f"member {info.filename!r} cannot be decompressed ({type(exc).__name__}: "
                    f"{str(exc)[:120]})", FIX
                ) from None
            yield _decode(path, info.filename, blob, zipped=True)


def load_rois(path: str | Path) -> list[Any]:
    """Decode every ROI of a ``.roi`` file or a RoiSet ``.zip`` with roifile."""
    path = Path(path)
    try:
        return list(iter_rois(path))
    except OSError as exc:
        raise file_error(path, f"cannot be read ({exc.strerror or exc})", FIX) from None


def read_imagej(path: str | Path) -> list[LayerData]:
    """Read an ImageJ ``.roi`` file or RoiSet ``.zip`` into up to two layers: shapes and points.

    Raises only :class:`RegionFileError` (naming the file).
    """
    with reading(path, FIX):
        return rois_to_layers(load_rois(path), path)


def rois_to_layers(rois: list[Any], path: str | Path = "RoiSet.zip") -> list[LayerData]:
    """Convert decoded roifile ROIs (see module docs) into napari layer data."""
    axes = _position_axes(rois)
    shapes, shape_types, shape_rgb, shape_rows = [], [], [], FeatureTable(_FILLS)
    points, point_rgb, point_rows = [], [], FeatureTable({"feature_index": -1})
    skipped = 0
    for index, roi in enumerate(rois):
        row = _roi_row(roi, index)
        rgb = rgb_from_hex(row["stroke_color"])
        converted = _roi_geometry(roi)
        if converted is None:
            skipped += 1
            continue
        kind, parts = converted
        if kind == "points":
            per_point = _point_positions(roi, len(parts[0]))
            for point, (counter, position) in zip(parts[0], per_point, strict=True):
                points.append(prepend_axes(point[None], _leading(roi, axes, position))[0])
                point_rgb.append(rgb)
                point_rows.add({**row, "counter": counter})
            continue
        leading = _leading(roi, axes)
        search = kind == "polygon" and 1 < len(parts) <= MAX_HOLE_PARTS
        holes = _hole_parents(parts) if search else [-1] * len(parts)
        first = len(shapes)
        for coords, parent in zip(parts, holes, strict=True):
            shapes.append(prepend_axes(coords, leading))
            shape_types.append(kind)
            shape_rgb.append(rgb)
            shape_rows.add({**row, "hole_of": parent + first if parent >= 0 else -1})
    if not shapes and not points:
        raise file_error(
            path,
            f"holds {len(rois)} ROI(s) but none with a region (text/image/empty ROIs only)",
            "Add area, line or point ROIs in ImageJ and save again",
        )
    axis_names = tuple(a.removesuffix("_position") for a in axes)
    metadata = {
        "source": str(path),
        "format": "imagej-roi",
        "axes": (*axis_names, "y", "x"),
        "skipped_rois": skipped,
    }
    name = layer_name(path)
    out: list[LayerData | None] = []
    if shapes:
        alpha = [0.0 if h >= 0 else 0.25 for h in shape_rows.columns["hole_of"]]
        out.append(shapes_layer(name, shapes, shape_types, shape_rows, shape_rgb, metadata, alpha))
    if points:
        data = np.asarray(points, dtype=float).reshape(len(points), -1)
        out.append(
            points_layer(
                f"{name} points" if shapes else name, data, point_rows, point_rgb, metadata
            )
        )
    return finish_layers(path, out, FIX)


# ----------------------------------------------------------------------------------------- per ROI
def _roi_row(roi: Any, index: int) -> dict[str, Any]:
    return {
        "name": roi.name or "",
        "roi_type": _type_name(roi),
        "group": int(roi.group),
        "stroke_color": roi.hexcolor(roi.stroke_color, "") or "",
        "arc_size": int(roi.rounded_rect_arc_size),
        "position": int(roi.position),
        "c_position": int(roi.c_position),
        "z_position": int(roi.z_position),
        "t_position": int(roi.t_position),
        "feature_index": index,
    }


def _type_name(roi: Any) -> str:
    from roifile import ROI_SUBTYPE, ROI_TYPE

    if roi.composite:
        return "composite"
    if roi.subtype == ROI_SUBTYPE.ELLIPSE:
        return "ellipse"
    if roi.subtype == ROI_SUBTYPE.ROTATED_RECT:
        return "rotated_rectangle"
    name = ROI_TYPE(roi.roitype).name.lower()
    return "rectangle" if name == "rect" else name


def _box(roi: Any) -> tuple[float, float, float, float]:
    """(top, left, bottom, right) of a rectangle/oval, subpixel where stored."""
    if roi.subpixelrect:
        return roi.yd, roi.xd, roi.yd + roi.heightd, roi.xd + roi.widthd
    return float(roi.top), float(roi.left), float(roi.bottom), float(roi.right)


def _rowcol(xy: np.ndarray) -> np.ndarray:
    return np.asarray(xy, dtype=float).reshape(-1, 2)[:, ::-1].copy()


def _roi_geometry(roi: Any) -> tuple[str, list[np.ndarray]] | None:
    """(napari shape type or 'points', list of (N, 2) row/col arrays), or None for no region."""
    from roifile import ROI_SUBTYPE, ROI_TYPE

    kind = roi.roitype
    if roi.subtype in (ROI_SUBTYPE.TEXT, ROI_SUBTYPE.IMAGE) or kind in (
        ROI_TYPE.NOROI,
        ROI_TYPE.UNKNOWN,
    ):
        return None
    if roi.composite:
        parts = [_rowcol(c) for c in roi.coordinates(multi=True) if len(c) >= 3]
        return ("polygon", parts) if parts else None
    if kind in (ROI_TYPE.RECT, ROI_TYPE.OVAL):
        top, left, bottom, right = _box(roi)
        corners = np.array([[top, left], [top, right], [bottom, right], [bottom, left]], float)
        return ("rectangle" if kind == ROI_TYPE.RECT else "ellipse"), [corners]
    coords = _rowcol(roi.coordinates())
    if len(coords) == 0:
        return None
    if kind == ROI_TYPE.POINT:
        return "points", [coords]
    if kind == ROI_TYPE.LINE:
        return "line", [coords[:2]]
    if kind in (ROI_TYPE.POLYLINE, ROI_TYPE.FREELINE, ROI_TYPE.ANGLE):
        return ("path" if len(coords) > 2 else "line"), [coords]
    if len(coords) < 3:
        return None
    return "polygon", [coords]


def _hole_parents(parts: list[np.ndarray]) -> list[int]:
    """For each sub-path: index of the sub-path it is a hole of (inside an odd number), else -1."""
    from shapely.geometry import Polygon

    if not all(np.isfinite(p).all() for p in parts):
        return [-1] * len(parts)  # the shapes with NaN/inf coordinates are dropped later
    polygons = [Polygon(p[:, ::-1]).buffer(0) for p in parts]
    parents = []
    for i, poly in enumerate(polygons):
        inside = [
            j
            for j, other in enumerate(polygons)
            if j != i and other.area > poly.area and other.contains(poly.representative_point())
        ]
        if len(inside) % 2 == 1:
            parents.append(min(inside, key=lambda j: polygons[j].area))
        else:
            parents.append(-1)
    return parents


# ----------------------------------------------------------------------------------------- positions
def _position_axes(rois: list[Any]) -> list[str]:
    """Axes to prepend: hyperstack t/z/c where a ROI is beyond plane 1, else a plain 'position'."""
    axes = [a for a in POSITION_AXES if any(getattr(r, a) > 1 for r in rois)]
    if axes:
        return axes
    per_point = [p for r in rois if r.counter_positions is not None for p in r.counter_positions]
    if any(r.position > 1 for r in rois) or any(p > 1 for p in per_point):
        return ["position"]
    return []


def _leading(roi: Any, axes: list[str], position: int | None = None) -> list[float]:
    values = []
    for axis in axes:
        raw = position if axis == "position" and position else getattr(roi, axis)
        values.append(float(max(int(raw) - 1, 0)))
    return values


def _point_positions(roi: Any, n: int) -> list[tuple[int, int | None]]:
    """(counter, stack position) per point of a multi-point ROI."""
    counters = roi.counters if roi.counters is not None and len(roi.counters) == n else [0] * n
    positions = (
        roi.counter_positions
        if roi.counter_positions is not None and len(roi.counter_positions) == n
        else [None] * n
    )
    return [
        (int(c), int(p) if p is not None else None)
        for c, p in zip(counters, positions, strict=True)
    ]
