"""Annotation files -> one region per annotation: cut holes, merge multi-part objects.

napari Shapes cannot hold a polygon with holes or a multi-part polygon, so our readers (QuPath
GeoJSON, ImageJ composite ROIs, COCO) give every ring its own shape and describe the structure in two
feature columns: ``hole_of`` (the row of the polygon a hole is cut out of, -1 otherwise) and
``feature_index`` (shapes sharing a value >= 0 are parts of one annotation). This module turns the
per-shape regions back into one region per annotation, so a question about "<region>" means the
whole annotated object, holes excluded, wherever the regions come from (widget, CLI, scripts).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .region import Region
from .result import RegionResult

HOLE_COLUMN = "hole_of"
PART_COLUMN = "feature_index"


def annotation_columns(features: Any, n: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The ``hole_of`` and ``feature_index`` columns of a features table (dict or DataFrame), if any."""
    if features is None:
        return None, None
    keys = set(features.columns) if hasattr(features, "columns") else set(features.keys())

    def column(name: str) -> np.ndarray | None:
        if name not in keys:
            return None
        values = np.asarray(features[name], dtype=float).ravel()
        return values if values.size == n else None

    return column(HOLE_COLUMN), column(PART_COLUMN)


def _union(regions: Sequence[Region], plane: tuple[int, int], minus: Sequence[Region] = ()) -> Region:
    """Mask region of the union of ``regions`` minus ``minus``, carrying the first one's info."""
    mask = np.zeros(plane, dtype=bool)
    for region in regions:
        crop, (r0, c0) = region.crop(plane)
        mask[r0 : r0 + crop.shape[0], c0 : c0 + crop.shape[1]] |= crop
    for hole in minus:
        crop, (r0, c0) = hole.crop(plane)
        mask[r0 : r0 + crop.shape[0], c0 : c0 + crop.shape[1]] &= ~crop
    first = regions[0]
    return Region.mask(mask, label=first.label, source=first.source, index=first.index, image_shape=plane)


def merge_annotations(result: RegionResult, hole_of: Any, feature_index: Any = None) -> RegionResult:
    """Per-shape regions -> one region per annotation (holes cut out, parts merged).

    A shape with ``hole_of[i] >= 0`` is a hole cut out of shape row ``hole_of[i]``; shapes sharing a
    ``feature_index >= 0`` are parts of one annotation (a MultiPolygon). Holes whose polygon is not
    on this plane are dropped; an annotation whose pixels all fall in holes is skipped.
    """
    if hole_of is None and feature_index is None:
        return result
    plane = tuple(result.image_shape)
    n = 1 + max((r.index for r in result.regions if r.index is not None), default=-1)
    size = max(n, len(hole_of) if hole_of is not None else 0)
    holes_of = np.full(size, -1.0) if hole_of is None else np.asarray(hole_of, dtype=float)
    parts_of = np.full(size, -1.0) if feature_index is None else np.asarray(feature_index, dtype=float)
    holes: dict[int, list[Region]] = {}
    groups: dict[Any, list[Region]] = {}
    for region in result.regions:
        i = region.index
        if i is not None and i < holes_of.size and holes_of[i] >= 0:
            holes.setdefault(int(holes_of[i]), []).append(region)
            continue
        part = i is not None and i < parts_of.size and parts_of[i] >= 0
        key = ("feature", int(parts_of[i])) if part else ("row", i, id(region))
        groups.setdefault(key, []).append(region)
    if not holes and all(len(g) == 1 for g in groups.values()):
        return result
    merged = []
    for parts in groups.values():
        cut = [h for p in parts for h in holes.get(p.index, [])]
        if len(parts) == 1 and not cut:
            merged.append(parts[0])
            continue
        region = _union(parts, plane, cut)
        if region.area:
            merged.append(region)
    return RegionResult(tuple(merged), result.skipped, result.image_shape)
