"""Binary masks -> polygons that follow pixel edges exactly (holes and several parts kept).

Used by the Labels -> GeoJSON writer and by the COCO reader for RLE masks. Coordinates are in the
pixel-corner convention of QuPath, ImageJ and COCO: pixel (row r, col c) is the square
``x in [c, c+1], y in [r, r+1]``. Rasterising the polygons by sampling pixel centres
``(c + 0.5, r + 0.5)`` therefore gives back exactly the mask.
"""

from __future__ import annotations

import numpy as np


def mask_to_polygons(mask: np.ndarray) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Outline a 2-D boolean mask.

    Returns one ``(exterior, holes)`` pair per connected part (4-connectivity of the pixel squares;
    parts touching only at a corner stay separate), each ring an ``(N, 2)`` array of (x, y) vertices
    without the closing vertex, collinear vertices removed. Empty mask -> empty list.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask_to_polygons needs a 2-D mask, got shape {mask.shape}")
    if not mask.any():
        return []
    # One box per horizontal run of pixels: few boxes, and their union is the exact pixel outline.
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    steps = np.diff(padded, axis=1)
    run_rows, run_starts = np.nonzero(steps == 1)
    _, run_ends = np.nonzero(steps == -1)
    return boxes_to_polygons(np.stack([run_starts, run_rows, run_ends, run_rows + 1], axis=1))


def boxes_to_polygons(boxes: np.ndarray) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Outline the union of pixel-edge boxes (K, 4) [x0, y0, x1, y1], as :func:`mask_to_polygons`."""
    import shapely
    from shapely.geometry import MultiPolygon, Polygon

    boxes = np.asarray(boxes, dtype=float).reshape(-1, 4)
    if len(boxes) == 0:
        return []
    boxes = shapely.box(boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3])
    union = shapely.union_all(boxes).simplify(0)
    parts = list(union.geoms) if isinstance(union, MultiPolygon) else [union]
    result = []
    for part in parts:
        if not isinstance(part, Polygon) or part.is_empty:
            continue
        part = shapely.geometry.polygon.orient(part, sign=1.0)
        exterior = np.asarray(part.exterior.coords, dtype=float)[:-1]
        holes = [np.asarray(ring.coords, dtype=float)[:-1] for ring in part.interiors]
        result.append((exterior, holes))
    result.sort(key=lambda item: (item[0][:, 1].min(), item[0][:, 0].min()))
    return result


def rasterize_polygons(
    polygons: list[tuple[np.ndarray, list[np.ndarray]]], shape: tuple[int, int]
) -> np.ndarray:
    """Inverse of :func:`mask_to_polygons`: sample pixel centres inside the (x, y) polygons."""
    from skimage.draw import polygon as draw_polygon

    out = np.zeros(shape, dtype=bool)
    for exterior, holes in polygons:
        part = np.zeros(shape, dtype=bool)
        # skimage samples at integer (row, col); shift by half a pixel to sample pixel centres.
        rr, cc = draw_polygon(exterior[:, 1] - 0.5, exterior[:, 0] - 0.5, shape)
        part[rr, cc] = True
        for hole in holes:
            rr, cc = draw_polygon(hole[:, 1] - 0.5, hole[:, 0] - 0.5, shape)
            part[rr, cc] = False
        out |= part  # an island inside another part's hole must survive that hole
    return out
