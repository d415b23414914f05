"""Negative clicks that only ever take pixels away from a mask.

SAM learnt negative points from interactive training; the bundled SAM-Med2D decoder reacts to a
negative click on a touching neighbour by *growing* its mask over that neighbour and others (on the
committed real nuclei crop, one-click masks of 340-700 px grew to 930-1,290 px). So `Session.segment`
does not hand negative clicks to the decoder. It segments the object from the positive prompts alone, then, for
every negative click:

1. segments what the negative click points at (the same pipeline, the click taken as positive) and
   removes that object from the mask, unless it also holds a positive click (then SAM sees one
   object, and step 2 does the cut); a click beside the mask removes the overlap of its object only
   when that is less than half of the mask;
2. if the negative pixel is still inside (SAM often takes two touching nuclei as one object), splits
   the mask between the positive and negative clicks: each pixel goes to the nearest click, along
   paths inside the mask;
3. keeps the connected pieces that hold a positive click (the largest piece when only a box or a
   mask prior gave the object).

The result is always a subset of the positive-only mask and never holds a negative click's pixel.
Pure numpy / scipy / scikit-image.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: 8-connectivity, as `prompts.keep_clicked_pieces` uses.
_EIGHT = np.ones((3, 3), bool)


def pixel(point, shape: tuple[int, int]) -> tuple[int, int]:
    """A (y, x) point as the nearest pixel inside an image of ``shape``."""
    y, x = (int(round(float(v))) for v in point)
    return min(max(y, 0), shape[0] - 1), min(max(x, 0), shape[1] - 1)


def split_labels(points, labels) -> tuple[np.ndarray, np.ndarray]:
    """(positive points (P, 2), negative points (N, 2)) from points and their 1/0 labels."""
    if points is None or labels is None or not len(points):
        empty = np.zeros((0, 2), float)
        return empty, empty
    pts = np.asarray(points, float).reshape(-1, 2)
    lab = np.asarray(labels).reshape(-1)
    return pts[lab == 1], pts[lab == 0]


def _seed(mask: np.ndarray, positives: np.ndarray, box, away_from: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Where the object is, inside ``mask``: the positive clicks that fall in it, else the box centre
    if it does, else the mask pixel deepest inside the mask and farthest from ``away_from``."""
    seeds = [pixel(p, mask.shape) for p in positives]
    seeds = [s for s in seeds if mask[s]]
    if seeds:
        return seeds
    if box is not None:
        y0, x0, y1, x1 = (float(v) for v in box)
        centre = pixel(((y0 + y1) / 2, (x0 + x1) / 2), mask.shape)
        if mask[centre]:
            return [centre]
    from scipy import ndimage as ndi

    depth = ndi.distance_transform_edt(mask)
    if away_from:
        far = np.ones(mask.shape, bool)
        for y, x in away_from:
            far[y, x] = False
        depth = depth * np.minimum(ndi.distance_transform_edt(far), depth.max() + 1)
    return [tuple(int(v) for v in np.unravel_index(int(np.argmax(depth)), mask.shape))]


def split_between(mask: np.ndarray, keep: list[tuple[int, int]], drop: list[tuple[int, int]]) -> np.ndarray:
    """The part of ``mask`` nearer (along paths inside it) to the ``keep`` pixels than to the ``drop``
    pixels: a compact watershed on a flat surface, i.e. a Voronoi split confined to the mask. Pixels in
    both lists count as dropped.

    On the real nuclei crop (14 clicks whose mask spilled onto a touching neighbour, a negative click on
    that neighbour) this cut raised Dice with the clicked nucleus from 0.66 to 0.80 and left 26 of 238
    neighbour pixels; flooding the distance to the mask's edge (0.78), the smoothed intensity (0.79) or
    its gradient (0.72) did no better."""
    from skimage.segmentation import watershed

    markers = np.zeros(mask.shape, np.int32)
    for y, x in keep:
        markers[y, x] = 1
    for y, x in drop:
        markers[y, x] = 2
    if not (markers == 1).any():
        return np.zeros_like(mask)
    basins = watershed(np.zeros(mask.shape, np.float32), markers, mask=mask, connectivity=2, compactness=1.0)
    return basins == 1


def keep_seeded_pieces(mask: np.ndarray, seeds: list[tuple[int, int]]) -> np.ndarray:
    """The 8-connected pieces of ``mask`` that hold a seed; the largest piece when none does."""
    from scipy import ndimage as ndi

    pieces, n = ndi.label(mask, structure=_EIGHT)
    if n <= 1:
        return mask
    ids = {int(pieces[s]) for s in seeds} - {0}
    if not ids:
        sizes = np.bincount(pieces.ravel())
        sizes[0] = 0
        ids = {int(np.argmax(sizes))}
    return np.isin(pieces, sorted(ids))


def exclude_negatives(
    mask: np.ndarray,
    negatives,
    positives=None,
    box=None,
    object_at: Callable[[np.ndarray], np.ndarray | None] | None = None,
) -> np.ndarray:
    """``mask`` (bool H, W, from the positive prompts only) without what the negative clicks mark.

    ``negatives`` / ``positives``: (N, 2) / (P, 2) (y, x) clicks in the mask's pixels; ``box`` the
    (y0, x0, y1, x1) box prompt, if any; ``object_at(point)`` the bool (H, W) mask of the object
    under a click (None: only the watershed cut is used). See the module docstring for the rules.
    """
    mask = np.asarray(mask, bool)
    out = mask.copy()
    shape = mask.shape
    negatives = np.zeros((0, 2)) if negatives is None else np.asarray(negatives, float).reshape(-1, 2)
    positives = np.zeros((0, 2)) if positives is None else np.asarray(positives, float).reshape(-1, 2)
    drops = [pixel(n, shape) for n in negatives]
    if not drops or not out.any():
        return out
    keep = [pixel(p, shape) for p in positives]
    for point, drop in zip(negatives, drops, strict=True):
        inside = bool(out[drop])
        other = None if object_at is None else object_at(point)
        if other is not None:
            other = np.asarray(other, bool)
            usable = other.shape == shape and other[drop] and not any(other[k] for k in keep)
            # a click beside the mask removes only a neighbour's overlap, never most of the mask
            if usable and (inside or np.count_nonzero(other & out) < np.count_nonzero(out) / 2):
                out &= ~other
        if out[drop]:
            seeds = _seed(out, positives, box, drops)
            out = split_between(out, seeds, [d for d in drops if out[d]])
        if not out.any():
            break
    for d in drops:
        out[d] = False
    if out.any():
        out = keep_seeded_pieces(out, _seed(out, positives, box, drops))
    return out & mask
