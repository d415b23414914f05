"""Grounded ``<SEG>`` masks -> one label per object, on the whole plane or in tiles at the model's scale.

Why tiles: SAM-Med2D sees 256 px. The bundled model learnt on 256-px frames whose objects are about
``scale.MODEL_OBJECT_DIAMETER`` pixels across; a 1024-px frame of 18-px nuclei shrinks them to 4-5 SAM
pixels, below what its masks resolve. So a large plane is cut into tiles whose side makes the plane's
objects (``scale.estimate_object_diameter``) about the model's size, each tile is encoded once (one
batched encoder call), the ``<SEG>`` prompts and the per-object point prompts are decoded on every
tile, and `instances.merge_tiles` joins the tiles (objects crossing a seam merged by overlap). Small
planes, or planes whose objects are already large, are split on the whole plane.

Uses the MedPLIB adapter's model and caches (``family.sam_embedding``, ``family.clip_features``, see
``families.medplib``); the pure steps are in `instances.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from . import instances as inst
from .counting import noun_index
from .image import ModelView, low_res_to_masks, sam_prompt_coords

#: What `scale.estimate_object_diameter` reads on the model's training frames (256 px): its median over the
#: synthetic nuclei frames (other styles: cells 38, mitochondria 27, brightfield 45, H&E 15, bacteria 15;
#: 20 frames each), whose equivalent diameter is about ``scale.MODEL_OBJECT_DIAMETER``. The blob estimator
#: reads round objects about 1.6x their equivalent diameter, so its readings are scaled by the ratio of
#: the two (`object_diameter`) before tiles are sized by ``MODEL_OBJECT_DIAMETER``.
MODEL_ESTIMATED_DIAMETER = 29.0
#: Tiling only for planes whose longer side is at least this multiple of the chosen tile side.
TILE_MIN_RATIO = 1.4
#: Smallest tile side (pixels): tiny objects on a huge plane would otherwise give thousands of tiles.
MIN_TILE_SIDE = 96
#: Point prompts per decoder call (the decoder's cost grows faster than linearly beyond this).
DECODE_CHUNK = 96
#: Tiles per encoder call.
ENCODE_CHUNK = 16


@dataclass
class SplitResult:
    """Per ``<SEG>``: the semantic mask (bool, image size), its instances (int32 labels) and how it was made."""

    masks: list[np.ndarray]
    labels: list[np.ndarray]
    tiles: list[tuple[int, int, int, int]] = field(default_factory=list)  # empty: the whole plane
    seeds: str = "distance"  # "counter" | "distance"


# ------------------------------------------------------------------------------------------ plan
def plan_tiles(image_hw: tuple[int, int], diameter: float | None, sam_size: int) -> tuple[int, int] | None:
    """(tile side, overlap) in image pixels for a plane whose objects (equivalent ``diameter`` in pixels)
    are smaller than the model's, else None (whole plane). The overlap shows every object whole in the
    tile whose core holds its centre."""
    from .scale import MODEL_OBJECT_DIAMETER

    longest = max(image_hw)
    if diameter is None or longest < TILE_MIN_RATIO * MIN_TILE_SIDE:
        return None
    side = max(MIN_TILE_SIDE, int(round(sam_size * diameter / MODEL_OBJECT_DIAMETER)))
    if longest < TILE_MIN_RATIO * side:
        return None
    overlap = min(side // 2, int(math.ceil(2.5 * diameter)) + 8)
    return side, overlap


def object_diameter(view: ModelView) -> float | None:
    """Typical equivalent object diameter (image pixels) of the plane the model sees; None for a flat plane."""
    from .scale import MODEL_OBJECT_DIAMETER, estimate_object_diameter, gray_plane

    reading = estimate_object_diameter(gray_plane(view.rgb))
    return None if reading is None else reading * view.factor * MODEL_OBJECT_DIAMETER / MODEL_ESTIMATED_DIAMETER


# ------------------------------------------------------------------------------------------ seeds
def plane_seeds(semantic: np.ndarray, centres: np.ndarray | None, diameter: float | None) -> np.ndarray:
    """Seeds (K, 2) on ``semantic``: the counter's object centres on it (``centres`` (M, 2) (row, col)),
    plus distance-transform peaks in grounded pieces no centre fell on; distance peaks alone without a
    counter (None)."""
    from scipy import ndimage as ndi

    if not semantic.any():
        return np.zeros((0, 2), np.float32)
    if centres is None:
        return inst.distance_seeds(semantic, diameter)
    reach = 2 if diameter is None else max(1, int(round(diameter / 8)))
    seeds = inst.seeds_inside(centres, semantic, reach)
    pieces, n = ndi.label(semantic)
    seeded = np.zeros(n + 1, bool)
    if len(seeds):
        r = np.clip(np.rint(seeds[:, 0]).astype(int), 0, semantic.shape[0] - 1)
        c = np.clip(np.rint(seeds[:, 1]).astype(int), 0, semantic.shape[1] - 1)
        # a seed on the rim just outside the mask counts for the piece it is next to
        near = ndi.grey_dilation(pieces, size=2 * reach + 1)
        seeded[near[r, c]] = True
    sizes = np.bincount(pieces.ravel(), minlength=n + 1)
    seeded |= sizes < min_object_area(diameter)  # slivers get no seed of their own
    bare = np.isin(pieces, np.flatnonzero(~seeded[1:]) + 1)
    extra = inst.distance_seeds(bare, diameter) if bare.any() else np.zeros((0, 2), np.float32)
    return np.concatenate([seeds, extra]).astype(np.float32)


def scaled_counter_seeds(model, rgb: np.ndarray, scale: float, counted: int, clip_settings) -> np.ndarray:
    """(K, 2) (row, col) object centres from the model's counter run once on the whole plane resized by
    ``scale`` (the factor each tile is resized by into the CLIP frame).

    Why: the counter is fully convolutional, so one pass over the resized plane sees every object at the
    scale a tile would show it, at a fraction of the cost of a pass per (overlapping) tile.
    """
    import torch
    from PIL import Image

    from ..model.counter import COUNT_STRIDE

    h, w = rgb.shape[:2]
    out_h, out_w = max(16, int(round(h * scale))), max(16, int(round(w * scale)))
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((out_w, out_h), Image.BILINEAR))
    grid = 16  # the counter halves the resolution four times
    padded_h, padded_w = -(-out_h // grid) * grid, -(-out_w // grid) * grid
    mean = np.asarray(clip_settings.mean, np.float32)
    std = np.asarray(clip_settings.std, np.float32)
    canvas = np.empty((padded_h, padded_w, 3), np.float32)
    canvas[...] = np.floor(255 * mean) / 255
    canvas[:out_h, :out_w] = resized.astype(np.float32) / 255
    pixels = torch.from_numpy(((canvas - mean) / std).transpose(2, 0, 1).copy())[None]
    peaks = model.count_peaks(pixels)[0, counted].cpu().numpy()[: -(-out_h // COUNT_STRIDE), : -(-out_w // COUNT_STRIDE)]
    rows, cols = np.nonzero(peaks)
    y = (rows + 0.5) * COUNT_STRIDE * h / out_h - 0.5
    x = (cols + 0.5) * COUNT_STRIDE * w / out_w - 0.5
    keep = (y < h) & (x < w)
    return np.stack([np.clip(y[keep], 0, h - 1), np.clip(x[keep], 0, w - 1)], axis=1).astype(np.float32)


# ------------------------------------------------------------------------------------------ decoding
def decode_points(sam, embeddings, coords_xy: np.ndarray, owner: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One positive point per prompt set (N, 2) (x, y) in SAM's padded frame -> logits (N, 64, 64), iou (N,).

    ``embeddings`` (T, C, g, g) with ``owner`` (N,) the embedding each point belongs to (tiles), or one
    embedding for all. As few decoder calls as ``DECODE_CHUNK`` allows (one for up to that many objects).
    """
    import torch

    coords = np.asarray(coords_xy, np.float32).reshape(-1, 2)
    low = sam.config.low_res_mask_size if hasattr(sam.config, "low_res_mask_size") else 64
    if not len(coords):
        return np.zeros((0, low, low), np.float32), np.zeros(0, np.float32)
    logits, scores = [], []
    for start in range(0, len(coords), DECODE_CHUNK):
        chunk = torch.from_numpy(coords[start : start + DECODE_CHUNK])[:, None]
        labels = torch.ones(chunk.shape[:2], dtype=torch.int64)
        image = embeddings if owner is None else embeddings[torch.from_numpy(owner[start : start + DECODE_CHUNK])]
        low_res, iou = sam.decode_with_prompts(image, points=chunk, point_labels=labels)
        logits.append(low_res[:, 0].float().cpu().numpy())
        scores.append(iou[:, 0].float().cpu().numpy())
    return np.concatenate(logits), np.concatenate(scores)


def split_view(sam, embeddings, resize_hw, pad, view: ModelView, semantic: np.ndarray, centres: np.ndarray | None,
               diameter: float | None, min_area: int) -> np.ndarray:
    """Instances (int32, ``view.image_hw``) of one grounded mask on one view (the whole plane)."""
    frame_semantic = _frame_mask(view, semantic)
    seeds = plane_seeds(frame_semantic, centres, diameter)
    coords = sam_prompt_coords(seeds, view, resize_hw, pad) if len(seeds) else np.zeros((0, 2), np.float32)
    low_res, scores = decode_points(sam, embeddings, coords)
    return _assemble(sam, view, resize_hw, pad, low_res, scores, seeds, frame_semantic, min_area)


def _frame_mask(view: ModelView, mask: np.ndarray) -> np.ndarray:
    """A mask of the caller's plane on the frame the model sees (larger only for block-reduced planes)."""
    h, w = view.image_hw
    frame = np.zeros(view.frame_hw, bool)
    frame[:h, :w] = mask
    return frame


def _assemble(sam, view, resize_hw, pad, low_res, scores, seeds, frame_semantic, min_area) -> np.ndarray:
    h, w = view.image_hw
    geometry = inst.LogitGeometry(tuple(view.frame_hw), tuple(resize_hw), tuple(pad), sam.config.image_size)
    return inst.assemble_labels(low_res, scores, seeds, geometry, frame_semantic, min_area=min_area)[:h, :w]


def min_object_area(diameter: float | None) -> int:
    """Pieces smaller than this are not objects: a tenth of a typical object's area (at least 4 px)."""
    if diameter is None:
        return 4
    return max(4, int(0.1 * math.pi * (diameter / 2) ** 2))


# ------------------------------------------------------------------------------------------ entry
def split_grounding(family, view: ModelView, image, prompts, masks: Sequence[np.ndarray], *, noun: str | None,
                    contrast_limits=None, rgb=None, tile: bool = True, on_progress=None) -> SplitResult:
    """Instances of each ``<SEG>`` mask. ``prompts``: the T-projected ``<SEG>`` prompts (N, D) (decoded
    again on tiles); ``masks``: their whole-plane masks; ``noun``: what was grounded (picks the counter's
    channel). ``tile=False`` (regions in the question, reference mask mode) splits on the whole plane."""
    model = family.model
    sam = model.sam
    sam_size = sam.config.image_size
    diameter = object_diameter(view)
    plan = plan_tiles(view.image_hw, diameter, sam_size) if tile else None
    counted = noun_index(noun, model.config.count_nouns or ()) if model.counter is not None else None
    seeds_from = "counter" if counted is not None else "distance"
    if plan is None:
        embeddings, resize_hw, pad = family.sam_embedding(view, on_progress)
        centres = None
        if counted is not None:
            features = family.clip_features(view, on_progress)
            centres = inst.counter_seeds(features.count_peaks[0, counted].cpu().numpy(), view.frame_hw)
        labels = [inst.absorb_fragments(split_view(sam, embeddings, resize_hw, pad, view, np.asarray(m, bool), centres,
                                                   diameter, min_object_area(diameter))) for m in masks]
        return SplitResult([np.asarray(m, bool) for m in masks], labels, [], seeds_from)
    side, overlap = plan
    return _split_tiled(family, view, image, prompts, len(masks), side, overlap, counted, diameter,
                        contrast_limits, rgb, on_progress, seeds_from)


def _split_tiled(family, view, image, prompts, n_seg, side, overlap, counted, diameter, contrast_limits, rgb,
                 on_progress, seeds_from) -> SplitResult:
    """Tiles of ``side`` (image pixels): one batched SAM encoding, the ``<SEG>`` prompts decoded on all tiles
    in one call, the counter once on the plane at the tiles' scale, the point prompts of all tiles in as
    few decoder calls as ``DECODE_CHUNK`` allows, then each tile assembled and the tiles merged."""
    import torch

    from ..model.preprocess import prepare_sam_image
    from .window import crop_view

    model = family.model
    sam = model.sam
    tiles = inst.tile_grid(view.image_hw, side, overlap)
    views = [crop_view(view, image, t, contrast_limits, rgb) for t in tiles]
    if on_progress:
        on_progress("grounding tiles", 0, len(tiles))
    encoded: dict[int, tuple] = {}
    missing = []
    for i, v in enumerate(views):  # tiles are cached like any plane (a second question reuses them)
        entry = family.caches.features.get(("sam", v.key))
        if entry is not None:
            encoded[i] = entry
        else:
            missing.append(i)
    for start in range(0, len(missing), ENCODE_CHUNK):
        chunk = missing[start : start + ENCODE_CHUNK]
        batch = [prepare_sam_image(views[i].rgb, sam.config.image_size) for i in chunk]
        embeddings = sam.encode_image(torch.cat([b.pixel_values for b in batch]))
        for j, (i, b) in enumerate(zip(chunk, batch, strict=True)):
            encoded[i] = (embeddings[j : j + 1], b.resize_hw, b.pad)
            family.caches.features.put(("sam", views[i].key), encoded[i])
    all_embeddings = torch.cat([encoded[i][0] for i in range(len(tiles))])
    low_res, _ = sam.decode_with_text_prompt(all_embeddings.repeat_interleave(n_seg, dim=0),
                                             prompts.reshape(n_seg, -1).repeat(len(tiles), 1))
    low_res = low_res.reshape(len(tiles), n_seg, 1, *low_res.shape[-2:])
    centres = None
    if counted is not None:
        rgb_plane = view.rgb
        scale = family.clip.size / side * view.factor
        centres = scaled_counter_seeds(model, rgb_plane, scale, counted, family.clip) * view.factor
    h, w = view.image_hw
    min_area = min_object_area(diameter)
    semantic = [np.zeros((h, w), bool) for _ in range(n_seg)]
    jobs = []  # (seg k, tile i, seeds, frame mask)
    for i, (t, v) in enumerate(zip(tiles, views, strict=True)):
        _, resize_hw, pad = encoded[i]
        tile_masks = low_res_to_masks(low_res[i], v, resize_hw, pad)
        cy0, cx0, cy1, cx1 = inst.tile_core(t, tiles, (h, w))
        local = None
        if centres is not None:
            inside = ((centres[:, 0] >= t[0]) & (centres[:, 0] < t[2]) & (centres[:, 1] >= t[1]) & (centres[:, 1] < t[3]))
            local = centres[inside] - np.array([t[0], t[1]], np.float32)
        # objects are kept from the tile whose core holds their centre: seeds far outside the core are
        # decoded by the tile they belong to (the overlap is wide enough to show such objects whole)
        reach = 1.6 * (diameter or 0.0) + 2
        for k, m in enumerate(tile_masks):
            semantic[k][cy0:cy1, cx0:cx1] = m[cy0 - t[0] : cy1 - t[0], cx0 - t[1] : cx1 - t[1]]
            frame = _frame_mask(v, m)
            seeds = plane_seeds(frame, local, diameter)
            near = ((seeds[:, 0] + t[0] >= cy0 - reach) & (seeds[:, 0] + t[0] < cy1 + reach)
                    & (seeds[:, 1] + t[1] >= cx0 - reach) & (seeds[:, 1] + t[1] < cx1 + reach))
            jobs.append((k, i, seeds[near], frame))
    coords = [sam_prompt_coords(seeds, views[i], encoded[i][1], encoded[i][2]) if len(seeds) else np.zeros((0, 2))
              for _, i, seeds, _ in jobs]
    owner = np.concatenate([np.full(len(c), i, np.int64) for c, (_, i, _, _) in zip(coords, jobs, strict=True)])
    flat, scores = decode_points(sam, all_embeddings, np.concatenate(coords).astype(np.float32), owner)
    tile_labels: list[list] = [[] for _ in range(n_seg)]
    start = 0
    for (k, i, seeds, frame), c in zip(jobs, coords, strict=True):
        stop = start + len(c)
        _, resize_hw, pad = encoded[i]
        tile_labels[k].append((tiles[i], _assemble(sam, views[i], resize_hw, pad, flat[start:stop], scores[start:stop],
                                                   seeds, frame, min_area)))
        start = stop
    if on_progress:
        on_progress("grounding tiles", len(tiles), len(tiles))
    labels = [inst.absorb_fragments(inst.merge_tiles(tl, (h, w))) for tl in tile_labels]
    return SplitResult(semantic, labels, tiles, seeds_from)
