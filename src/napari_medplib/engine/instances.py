"""One label per object from a grounded (semantic) mask: seeds, SAM masks per seed, NMS, a label image.

Why: MedPLIB grounds a noun with one ``<SEG>`` and one mask, but "Segment the nuclei" means one outline
per nucleus, and counts and per-object measurements need them. The model's own SAM splits the mask:

1. **seeds**, one or more per object: the model's object counter's centres (`counter_seeds`, bundled
   model) or, without a counter (the released checkpoints), the peaks of the distance transform of the
   grounded mask (`distance_seeds`);
2. one positive **point prompt per seed**, decoded by SAM-Med2D in one batched call (the caller);
3. **NMS** on those masks (`nms`): two seeds in the same object give the same mask, the better-scored
   one stays;
4. **assembly** (`assemble_labels`): every pixel of the grounded mask goes to the kept mask with the
   highest logit there; each object keeps the connected piece under its seed; grounded pixels no mask
   claimed become objects of their own when large enough (objects without a seed), or join the object
   they touch.

Large planes are grounded in tiles at the model's scale; `merge_tiles` joins the tiles' label images,
merging the instances that cross a seam by overlap.

numpy/scipy only here; torch tensors are accepted where the decoder's logits come in (converted).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Logit above which a pixel is part of a seed's object (probability 0.5: the cautious core; the
#: reference's 0.1 for masks shown to users also takes in rims of touching neighbours).
INSTANCE_LOGIT = 0.0
#: Masks overlapping a better-scored one by more than this IoU are duplicates.
NMS_IOU = 0.5
#: Instances of neighbouring tiles overlapping by more than this share of the smaller are one object.
MERGE_OVERLAP = 0.3


# ------------------------------------------------------------------------------------------ seeds
def distance_seeds(mask: np.ndarray, diameter: float | None = None) -> np.ndarray:
    """(K, 2) float (row, col) seeds: peaks of the distance transform of ``mask``, at least about half an
    object apart (``diameter``: typical object diameter in pixels; None: estimated from the mask).

    Why: without a counter, the centres of round objects are where the distance to the background
    peaks; touching objects keep a neck between them, so each keeps its own peak. Every connected
    piece gets at least one seed (its deepest point).
    """
    from scipy import ndimage as ndi

    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
        raise ValueError(f"distance_seeds() takes a 2-D mask, got shape {mask.shape}")
    if not mask.any():
        return np.zeros((0, 2), np.float32)
    distance = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    pieces, n = ndi.label(mask)
    if diameter is None:
        deepest = ndi.maximum(distance, pieces, np.arange(1, n + 1))
        diameter = 2.0 * float(np.median(deepest))
    radius = max(1, int(round(diameter / 4)))
    smooth = ndi.gaussian_filter(distance, max(0.5, diameter / 12))
    peak = (smooth == ndi.maximum_filter(smooth, size=2 * radius + 1)) & mask
    # a peak must stand out: at least a sixth of the object's radius deep (noise on flat ridges is not an object)
    peak &= distance >= max(1.0, diameter / 12)
    rows, cols = np.nonzero(peak)
    seeds = [np.stack([rows, cols], axis=1).astype(np.float32)]
    seeded = np.zeros(n + 1, bool)
    seeded[pieces[rows, cols]] = True
    missing = np.flatnonzero(~seeded[1:]) + 1
    if missing.size:
        where = ndi.maximum_position(distance, pieces, missing)
        seeds.append(np.asarray(where, np.float32).reshape(-1, 2))
    return _thin(np.concatenate(seeds), radius)


def _thin(seeds: np.ndarray, radius: float) -> np.ndarray:
    """Drop seeds closer than ``radius`` to an earlier one (plateaus give several equal maxima)."""
    if len(seeds) < 2:
        return seeds
    from scipy.spatial import cKDTree

    tree = cKDTree(seeds)
    keep = np.ones(len(seeds), bool)
    for i, j in sorted(tree.query_pairs(radius)):
        if keep[i] and keep[j]:
            keep[j] = False
    return seeds[keep]


def counter_seeds(peaks: np.ndarray, image_hw: tuple[int, int], frame_size: int = 336) -> np.ndarray:
    """(K, 2) (row, col) image pixels of the counter's object centres: ``peaks`` (g, g) bool on the
    counter's grid over the centre-padded CLIP frame of side ``frame_size`` (`model.counter`)."""
    from ..model.preprocess import centre_pad_offsets, resize_longest_side_hw

    peaks = np.asarray(peaks, bool)
    h, w = (int(v) for v in image_hw)
    resize_hw = resize_longest_side_hw(h, w, frame_size)
    top, left = centre_pad_offsets(resize_hw, frame_size)
    stride = frame_size / peaks.shape[-1]
    rows, cols = np.nonzero(peaks)
    y = ((rows + 0.5) * stride - top) * h / resize_hw[0] - 0.5
    x = ((cols + 0.5) * stride - left) * w / resize_hw[1] - 0.5
    inside = (y >= -0.5) & (y < h - 0.5) & (x >= -0.5) & (x < w - 0.5)
    return np.stack([np.clip(y[inside], 0, h - 1), np.clip(x[inside], 0, w - 1)], axis=1).astype(np.float32)


def seeds_inside(seeds: np.ndarray, mask: np.ndarray, reach: int = 0) -> np.ndarray:
    """The seeds that lie on ``mask`` (or within ``reach`` pixels of it)."""
    seeds = np.asarray(seeds, np.float32).reshape(-1, 2)
    if not len(seeds):
        return seeds
    mask = np.asarray(mask, bool)
    if reach > 0:
        from scipy import ndimage as ndi

        mask = ndi.binary_dilation(mask, iterations=int(reach))
    r = np.clip(np.rint(seeds[:, 0]).astype(int), 0, mask.shape[0] - 1)
    c = np.clip(np.rint(seeds[:, 1]).astype(int), 0, mask.shape[1] - 1)
    return seeds[mask[r, c]]


# ------------------------------------------------------------------------------------------ NMS
def nms(masks: np.ndarray, scores: Sequence[float], iou_threshold: float = NMS_IOU) -> np.ndarray:
    """Indices of the masks to keep, best score first: a mask overlapping a kept one by IoU above
    ``iou_threshold`` is a duplicate. ``masks`` (N, ...) bool (any resolution: low-res masks suffice)."""
    flat = np.asarray(masks, bool).reshape(len(masks), -1)
    if not len(flat):
        return np.zeros(0, int)
    from scipy import sparse

    area = flat.sum(axis=1).astype(np.float64)
    # sparse product: small masks overlap few others, and a dense BLAS call can stall on thread start-up
    # where torch's OpenMP threads already run
    rows = sparse.csr_matrix(flat.astype(np.float32))
    inter = (rows @ rows.T).toarray().astype(np.float64)
    union = area[:, None] + area[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter, dtype=np.float64), where=union > 0)
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    keep: list[int] = []
    for i in order:
        if area[i] == 0:
            continue
        if all(iou[i, j] <= iou_threshold for j in keep):
            keep.append(int(i))
    return np.asarray(keep, int)


# ------------------------------------------------------------------------------------------ assembly
@dataclass(frozen=True)
class LogitGeometry:
    """How a (64, 64) low-res SAM logit map covers a plane of ``image_hw`` (corrected mode): the plane
    was resized to ``resize_hw`` and centre-padded by ``pad`` in a ``size`` square."""

    image_hw: tuple[int, int]
    resize_hw: tuple[int, int]
    pad: tuple[int, int]
    size: int = 256

    def positions(self, axis: int, low: int) -> np.ndarray:
        """Low-res sampling position of every image pixel along ``axis`` (as ``postprocess_masks``)."""
        stride = self.size / low
        n = self.image_hw[axis]
        scale = self.resize_hw[axis] / n / stride
        return np.clip((np.arange(n) + 0.5) * scale + self.pad[axis] / stride - 0.5, 0, low - 1)


def _interp(positions: np.ndarray, low: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lo = np.floor(positions).astype(int)
    hi = np.minimum(lo + 1, low - 1)
    return lo, hi, (positions - lo).astype(np.float32)


def upsample_crop(logits: np.ndarray, rows: tuple[np.ndarray, np.ndarray, np.ndarray],
                  cols: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """Bilinear samples of a (h, w) map at the given (lo, hi, frac) row and column positions."""
    r0, r1, fr = rows
    c0, c1, fc = cols
    top = logits[r0][:, c0] * (1 - fc) + logits[r0][:, c1] * fc
    bottom = logits[r1][:, c0] * (1 - fc) + logits[r1][:, c1] * fc
    return top * (1 - fr[:, None]) + bottom * fr[:, None]


def paint_instances(
    low_res: np.ndarray, order: Sequence[int], geometry: LogitGeometry, allowed: np.ndarray | None = None,
    threshold: float = INSTANCE_LOGIT,
) -> np.ndarray:
    """Label image (int32, 1..K in ``order``) where each pixel goes to the instance whose logit is highest
    there and above ``threshold``; only ``allowed`` pixels (the grounded mask) are labelled.

    Each instance's logits are upsampled only around its positive low-res cells, so memory stays at one
    float plane however many instances there are.
    """
    low_res = np.asarray(low_res, np.float32).reshape(len(low_res), *np.shape(low_res)[-2:])
    h, w = geometry.image_hw
    low_h, low_w = low_res.shape[-2:]
    pos_r, pos_c = geometry.positions(0, low_h), geometry.positions(1, low_w)
    best = np.full((h, w), -np.inf, np.float32)
    labels = np.zeros((h, w), np.int32)
    for label, k in enumerate(order, start=1):
        positive = low_res[k] > threshold
        if not positive.any():
            continue
        rr, cc = np.flatnonzero(positive.any(axis=1)), np.flatnonzero(positive.any(axis=0))
        y0, y1 = np.searchsorted(pos_r, rr[0] - 1, "right"), np.searchsorted(pos_r, rr[-1] + 1, "left")
        x0, x1 = np.searchsorted(pos_c, cc[0] - 1, "right"), np.searchsorted(pos_c, cc[-1] + 1, "left")
        if y1 <= y0 or x1 <= x0:
            continue
        crop = upsample_crop(low_res[k], _interp(pos_r[y0:y1], low_h), _interp(pos_c[x0:x1], low_w))
        win = crop > np.maximum(best[y0:y1, x0:x1], threshold)
        if allowed is not None:
            win &= allowed[y0:y1, x0:x1]
        best[y0:y1, x0:x1][win] = crop[win]
        labels[y0:y1, x0:x1][win] = label
    return labels


def keep_seeded_pieces(labels: np.ndarray, seeds: np.ndarray | None = None) -> np.ndarray:
    """Each label keeps one connected piece: the one under its seed (``seeds[label - 1]``) where that
    pixel is still its own, else its largest. Why: a point's mask often has fragments on neighbours."""
    from scipy import ndimage as ndi

    out = np.zeros_like(labels)
    for label, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        own = labels[box] == label
        pieces, n = ndi.label(own)
        if n == 1:
            out[box][own] = label
            continue
        pick = 0
        if seeds is not None and label - 1 < len(seeds):
            r, c = (int(round(float(v))) for v in seeds[label - 1])
            r, c = r - box[0].start, c - box[1].start
            if 0 <= r < own.shape[0] and 0 <= c < own.shape[1]:
                pick = int(pieces[r, c])
        if pick == 0:
            pick = int(np.argmax(np.bincount(pieces.ravel())[1:])) + 1
        out[box][pieces == pick] = label
    return out


def fill_unclaimed(labels: np.ndarray, semantic: np.ndarray, min_area: int, rim: float = 3.0) -> np.ndarray:
    """Grounded pixels no instance claimed: those within ``rim`` pixels of an instance join the nearest one
    (SAM's point masks are a little tighter than its grounded mask); pieces of the rest of at least
    ``min_area`` pixels become instances of their own (objects no seed fell on)."""
    from scipy import ndimage as ndi

    labels = labels.copy()
    unclaimed = np.asarray(semantic, bool) & (labels == 0)
    if not unclaimed.any():
        return labels
    if rim > 0 and labels.any():
        distance, (ri, ci) = ndi.distance_transform_edt(labels == 0, return_indices=True)
        near = unclaimed & (distance <= rim)
        labels[near] = labels[ri[near], ci[near]]
        unclaimed &= ~near
    pieces, n = ndi.label(unclaimed)
    if n:
        sizes = np.bincount(pieces.ravel(), minlength=n + 1)
        lookup = np.zeros(n + 1, np.int32)
        big = np.flatnonzero(sizes >= max(1, min_area))
        big = big[big > 0]
        next_id = int(labels.max()) + 1
        lookup[big] = np.arange(next_id, next_id + big.size, dtype=np.int32)
        labels = np.where(lookup[pieces] > 0, lookup[pieces], labels)
    return labels


def relabel_sequential(labels: np.ndarray, min_area: int = 1) -> np.ndarray:
    """Labels 1..n in first-appearance order of the old ids (raster), dropping ones under ``min_area``."""
    labels = np.asarray(labels)
    ids, first, counts = np.unique(labels.ravel(), return_index=True, return_counts=True)
    keep = (ids > 0) & (counts >= max(1, min_area))
    ids, first = ids[keep], first[keep]
    ids = ids[np.argsort(first, kind="stable")]
    lookup = np.zeros(int(labels.max()) + 1 if labels.size else 1, np.int32)
    lookup[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
    return lookup[labels]


def assemble_labels(
    low_res: np.ndarray, scores: Sequence[float], seeds: np.ndarray, geometry: LogitGeometry,
    semantic: np.ndarray, min_area: int = 4, threshold: float = INSTANCE_LOGIT, iou_threshold: float = NMS_IOU,
    rim: float = 3.0,
) -> np.ndarray:
    """Per-seed SAM logits (N, 64, 64) + scores + the grounded mask -> int32 label image (1..n, 0 background).

    NMS on the low-res masks, pixels painted by highest logit inside ``semantic``, one piece per object,
    grounded pixels within ``rim`` of an object joined to it, other unclaimed pieces added as objects,
    objects under ``min_area`` pixels dropped.
    """
    semantic = np.asarray(semantic, bool)
    low_res = np.asarray(low_res, np.float32).reshape(-1, *np.shape(low_res)[-2:])
    if not len(low_res):
        labels = np.zeros(semantic.shape, np.int32)
    else:
        keep = nms(low_res > threshold, scores, iou_threshold)
        labels = paint_instances(low_res, keep, geometry, semantic, threshold)
        labels = keep_seeded_pieces(labels, np.asarray(seeds)[keep] if len(seeds) == len(low_res) else None)
    labels = fill_unclaimed(labels, semantic, max(min_area, 1), rim)
    return relabel_sequential(labels, min_area)


def absorb_fragments(labels: np.ndarray, ratio: float = 0.25) -> np.ndarray:
    """Objects smaller than ``ratio`` x the median object area are fragments, not objects: each joins the
    neighbour it shares the longest border with, or is dropped when it touches none.

    Why: where SAM's point masks overlap, the painting leaves slivers between neighbours and along seams
    (on a real nuclei frame: 193 objects for 125 nuclei, most extra ones under a seventh of a nucleus).
    The typical size comes from the objects themselves, so this holds at any magnification.
    """
    from scipy import ndimage as ndi

    labels = np.asarray(labels)
    areas = np.bincount(labels.ravel())
    ids = np.flatnonzero(areas[1:]) + 1
    if len(ids) < 3:
        return labels
    small = ids[areas[ids] < ratio * float(np.median(areas[ids]))]
    if not len(small):
        return labels
    out = labels.copy()
    found = ndi.find_objects(labels)
    for label in sorted(small, key=lambda i: areas[i]):  # smallest first: a fragment may join a fragment
        rows, cols = found[label - 1]
        r0, c0 = max(rows.start - 1, 0), max(cols.start - 1, 0)
        window = out[r0 : rows.stop + 1, c0 : cols.stop + 1]
        piece = window == label
        if not piece.any():
            continue
        ring = ndi.binary_dilation(piece) & ~piece
        neighbours = window[ring]
        neighbours = neighbours[(neighbours > 0) & (neighbours != label)]
        window[piece] = np.bincount(neighbours).argmax() if neighbours.size else 0
    return relabel_sequential(out)


# ------------------------------------------------------------------------------------------ tiles
Tile = tuple[int, int, int, int]  # (y0, x0, y1, x1), end-exclusive


def tile_grid(image_hw: tuple[int, int], side: int, overlap: int) -> list[Tile]:
    """Square tiles of ``side`` covering the plane, neighbours overlapping by at least ``overlap``
    (tiles spread evenly; a plane shorter than ``side`` on an axis is one tile on that axis)."""
    h, w = (int(v) for v in image_hw)
    side, overlap = int(side), int(overlap)
    if side <= 0 or not 0 <= overlap < side:
        raise ValueError(f"tile side must be positive and overlap in [0, side), got side={side}, overlap={overlap}")

    def starts(length: int) -> list[int]:
        if length <= side:
            return [0]
        n = math.ceil((length - overlap) / (side - overlap))
        return [round(i * (length - side) / (n - 1)) for i in range(n)]

    return [(y, x, min(h, y + side), min(w, x + side)) for y in starts(h) for x in starts(w)]


def tile_core(tile: Tile, tiles: Sequence[Tile], image_hw: tuple[int, int]) -> Tile:
    """The part of ``tile`` nearer its own centre than any neighbour's along each axis: the pixels this
    tile is responsible for (cores partition the plane)."""
    y0, x0, y1, x1 = tile
    h, w = image_hw
    top, left, bottom, right = 0, 0, h, w
    for oy0, ox0, oy1, ox1 in tiles:
        if (oy0, ox0) == (y0, x0):
            continue
        if ox0 == x0 and oy0 < y0 < oy1:
            top = max(top, (y0 + oy1) // 2)
        if ox0 == x0 and y0 < oy0 < y1:
            bottom = min(bottom, (oy0 + y1) // 2)
        if oy0 == y0 and ox0 < x0 < ox1:
            left = max(left, (x0 + ox1) // 2)
        if oy0 == y0 and x0 < ox0 < x1:
            right = min(right, (ox0 + x1) // 2)
    return max(y0, top), max(x0, left), min(y1, bottom), min(x1, right)


def merge_tiles(tiles: Sequence[tuple[Tile, np.ndarray]], image_hw: tuple[int, int],
                min_overlap: float = MERGE_OVERLAP) -> np.ndarray:
    """Tile label images -> one int32 label image of the plane (1..n).

    An instance a tile sees whole is kept when its centroid lies in the tile's core (so an object seen
    whole by two tiles is taken once, from the tile that sees it best centred). An instance cut by a
    tile's inner edge is a piece: it joins the instances it overlaps by more than ``min_overlap`` of the
    smaller (the same object seen from the other side of a seam), else it starts a new one.
    """
    from scipy import ndimage as ndi

    h, w = (int(v) for v in image_hw)
    boxes = [t for t, _ in tiles]
    whole, pieces = [], []
    for tile, labels in tiles:
        y0, x0, y1, x1 = tile
        labels = np.asarray(labels)
        if labels.shape != (y1 - y0, x1 - x0):
            raise ValueError(f"tile {tile} has labels of shape {labels.shape}, expected {(y1 - y0, x1 - x0)}")
        n = int(labels.max()) if labels.size else 0
        if n == 0:
            continue
        cy0, cx0, cy1, cx1 = tile_core(tile, boxes, (h, w))
        centres = ndi.center_of_mass(np.ones(labels.shape, np.float32), labels, np.arange(1, n + 1))
        for label, (centre, box) in enumerate(zip(centres, ndi.find_objects(labels), strict=True), start=1):
            if box is None:
                continue
            own = labels[box] == label
            where = (slice(y0 + box[0].start, y0 + box[0].stop), slice(x0 + box[1].start, x0 + box[1].stop))
            cut = ((box[0].start == 0 and y0 > 0) or (box[1].start == 0 and x0 > 0)
                   or (box[0].stop == labels.shape[0] and y1 < h) or (box[1].stop == labels.shape[1] and x1 < w))
            if cut:
                pieces.append((where, own))
            elif cy0 <= centre[0] + y0 < cy1 and cx0 <= centre[1] + x0 < cx1:
                whole.append((where, own))
    out = np.zeros((h, w), np.int32)
    area: dict[int, int] = {}
    parent: dict[int, int] = {}

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for where, own in whole + pieces:
        new_id = len(parent) + 1
        parent[new_id] = new_id
        target = out[where]
        under = target[own]
        size = int(own.sum())
        for other, shared in zip(*np.unique(under[under > 0], return_counts=True), strict=True):
            if shared > min_overlap * min(size, area[int(other)]):
                a, b = find(new_id), find(int(other))
                if a != b:
                    parent[a] = b
        free = own & (target == 0)
        target[free] = new_id
        area[new_id] = size
    if not parent:
        return out
    lookup = np.zeros(len(parent) + 1, np.int32)
    for i in parent:
        lookup[i] = find(i)
    return relabel_sequential(lookup[out])
