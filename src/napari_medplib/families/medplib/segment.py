"""MedPLIB's direct prompts (`Session.segment`): points, a box and/or a mask prior through SAM-Med2D, no LLM.

* Negative clicks (label 0) only take pixels away: the mask comes from the positive prompts, then the
  object under each negative click inside it is removed and the mask is cut between the clicks
  (``engine.negatives.exclude_negatives``); the decoder itself grows masks onto a clicked neighbour.
  Negative clicks need a positive click, a box or a mask prior beside them.
* ``window``: "auto" segments inside a crop around the prompts sized so the object spans what the
  model's objects spanned in training (a box's own size; a click's object size estimated under it,
  `clicked_extent`), resized to SAM's input; an int asks for that crop side; None uses the whole plane.
  Masks are full-size either way; ``result.window`` is the area used (see ``engine.window``).
* ``clip_to_box``: with a box prompt, mask pixels outside the box are dropped (the box says where the
  object is; ``engine.prompts.keep_inside_box``); False gives SAM's masks as they are.
* ``clicked_pieces``: with positive clicks, only the mask's connected pieces under a positive click are
  kept (``engine.prompts.keep_clicked_pieces``); False keeps every piece.
* ``flips``: segment the crop and its three mirror images and keep the pixels at least two of the four
  masks hold (test-time augmentation: smoother, less biased outlines for 4x the SAM work).
"""

from __future__ import annotations

import time

import numpy as np

from ...engine.errors import SessionInputError
from ...engine.image import (
    ModelView,
    low_res_to_masks,
    mask_to_low_res,
    sam_prompt_box,
    sam_prompt_coords,
)
from ...engine.negatives import exclude_negatives, split_labels
from ...engine.prompts import check_prompts, keep_clicked_pieces, keep_inside_box
from ...engine.scale import CLICK_EXTENT_FACTOR
from ...engine.window import (
    WindowedSegmentResult,
    choose_window,
    crop_view,
    mirror_prompts,
    paste_masks,
    shift_prompts,
    unmirror,
)
from ..base import SegmentRequest


def segment(family, request: SegmentRequest) -> WindowedSegmentResult:
    """The masks of checked prompts on one plane (see `Session.segment` for the options)."""
    start = time.perf_counter()
    image = request.image
    plane = family.prepare_image(image, request.contrast_limits, request.rgb)
    pts, labels, box_arr, prior = check_prompts(request.points, request.point_labels, request.box, request.mask,
                                                plane.image_hw)
    positives, negatives = split_labels(pts, labels)
    if len(negatives):  # negatives never reach the decoder (see negatives.py)
        if not len(positives) and box_arr is None and prior is None:
            raise SessionInputError(
                "negative clicks alone mark no object: add a positive click (or a box) on the object"
            )
        pts = positives if len(positives) else None
        labels = np.ones(len(positives), np.int64) if len(positives) else None
    timings = {"preprocess": time.perf_counter() - start}
    options = {"image": image, "plane": plane, "multimask": request.multimask,
               "contrast_limits": request.contrast_limits, "rgb": request.rgb, "mask_mode": request.mask_mode,
               "on_progress": request.on_progress, "window": request.window, "clip_to_box": request.clip_to_box,
               "clicked_pieces": request.clicked_pieces, "flips": request.flips, "timings": timings}
    masks, scores, key, used = segment_checked(family, pts, labels, box_arr, prior, **options)
    if len(negatives):
        mark = time.perf_counter()
        objects: dict[tuple[float, float], np.ndarray] = {}

        def object_at(point: np.ndarray) -> np.ndarray:
            """The object a negative click points at, segmented as if it were a positive click."""
            where = (float(point[0]), float(point[1]))
            if where not in objects:
                found, *_ = segment_checked(family, np.asarray([where]), np.ones(1, np.int64), None, None,
                                            **dict(options, multimask=False, flips=False))
                objects[where] = found[0]
            return objects[where]

        masks = [exclude_negatives(m, negatives, positives, box_arr, object_at) for m in masks]
        timings["negatives"] = time.perf_counter() - mark
    best = int(np.argmax(scores))
    from ...engine.measure import measure

    table = measure(masks[best].astype(np.int32), np.asarray(image) if np.ndim(image) == 2 else None)
    timings["total"] = time.perf_counter() - start
    return WindowedSegmentResult(masks[best], masks, scores, timings, key, table=table, window=used)


def segment_checked(family, pts, labels, box_arr, prior, *, image, plane: ModelView, multimask: bool,
                    contrast_limits, rgb, mask_mode: str, on_progress, window, clip_to_box: bool,
                    clicked_pieces: bool, flips: bool, timings: dict[str, float]):
    """Checked prompts on the whole plane -> (full-size masks, scores, key of the view SAM saw, window)."""
    model = family.model
    extent = None
    if window == "auto" and box_arr is None and prior is None and pts is not None:
        extent = family.clicked_extent(plane, pts, labels)
    area = choose_window(plane.image_hw, model.sam.config.image_size, pts, box_arr, prior, window,
                         object_extent=extent)
    if area is None:
        view = plane
    else:  # the crop keeps the whole plane's contrast; its content key keys the SAM cache
        view = crop_view(plane, image, area, contrast_limits, rgb)
        pts, box_arr, prior = shift_prompts(area, pts, box_arr, prior)
    if flips and view.factor == 1:  # the four mirror images vote; ties count as object
        votes, scores = None, np.zeros(1)
        for flip_y, flip_x in ((False, False), (True, False), (False, True), (True, True)):
            mirrored, m_pts, m_box, m_prior = mirror_prompts(view, pts, box_arr, prior, flip_y, flip_x)
            m_masks, m_scores = family.decode_view(mirrored, m_pts, labels, m_box, m_prior, multimask,
                                                   mask_mode, on_progress, timings)
            m_masks = [unmirror(m, flip_y, flip_x) for m in m_masks]
            votes = [v + m for v, m in zip(votes, m_masks, strict=True)] if votes else [
                m.astype(np.int8) for m in m_masks]
            scores = scores + np.asarray(m_scores) / 4
        masks, scores = [v >= 2 for v in votes], [float(v) for v in scores]
    else:
        masks, scores = family.decode_view(view, pts, labels, box_arr, prior, multimask, mask_mode, on_progress,
                                           timings)
    mark = time.perf_counter()
    # cut to the box and the clicked pieces in the crop (the prompts are in its pixels), then paste
    if clip_to_box and box_arr is not None:
        masks = [keep_inside_box(m, box_arr) for m in masks]
    if clicked_pieces and pts is not None:
        masks = [keep_clicked_pieces(m, pts, labels) for m in masks]
    if area is not None:
        masks = paste_masks(masks, area, plane.image_hw)
    timings["masks"] = timings.get("masks", 0.0) + time.perf_counter() - mark
    used = area if area is not None else (0, 0, *plane.image_hw)
    return masks, scores, view.key, used


def decode_view(family, view: ModelView, pts, labels, box_arr, prior, multimask: bool, mask_mode: str,
                on_progress, timings: dict[str, float]):
    """SAM's masks (view-size bool arrays) and IoU scores for prompts in the view's pixels."""
    model = family.model
    mark = time.perf_counter()
    embeddings, resize_hw, pad = family.sam_embedding(view, on_progress)
    timings["vision"] = timings.get("vision", 0.0) + time.perf_counter() - mark
    mark = time.perf_counter()
    low_res, iou = model.sam.decode_with_prompts(
        embeddings,
        points=None if pts is None else sam_prompt_coords(pts, view, resize_hw, pad)[None],
        point_labels=None if labels is None else labels[None],
        boxes=None if box_arr is None else sam_prompt_box(box_arr, view, resize_hw, pad),
        mask_inputs=None if prior is None else mask_to_low_res(prior, view, resize_hw, pad),
        multimask_output=bool(multimask),
    )  # (1, K, 64, 64), (1, K)
    masks = low_res_to_masks(low_res[0][:, None], view, resize_hw, pad, mask_mode)
    timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - mark
    return masks, [float(v) for v in iou[0].float().tolist()]


def clicked_extent(family, plane: ModelView, points: np.ndarray, labels: np.ndarray) -> float | None:
    """Estimated extent (pixels) of the object under the first positive click, for the crop choice.

    Scale-space blob size at the click (``scale.local_object_diameter``) on the grey plane the model
    sees, times ``CLICK_EXTENT_FACTOR``: blob detection measures an object's width, and a crop with
    room for a longer object costs less than one that cuts it. A fine-tuned model knows the extents
    of the objects it was adapted on (``config.object_extent_range``): the estimate is kept inside them.
    """
    from ...engine.scale import clamp_extent, gray_plane, local_object_diameter

    positive = np.flatnonzero(labels > 0)
    if positive.size == 0:
        return None
    key = ("gray", plane.key)
    grey = family.caches.features.get(key)
    if grey is None:
        grey = gray_plane(plane.rgb)
        family.caches.features.put(key, grey)
    y, x = (float(v) / plane.factor for v in points[positive[0]])  # a very large plane is seen reduced
    point = (min(max(y, 0), grey.shape[0] - 1), min(max(x, 0), grey.shape[1] - 1))
    diameter = local_object_diameter(grey, point)
    extent = None if diameter is None else CLICK_EXTENT_FACTOR * diameter * plane.factor
    return clamp_extent(extent, family.model.config.object_extent_range)
