"""MedPLIB's masks: every ``<SEG>`` of the answer through SAM-Med2D, then one label per object and counts.

``seg_region_prompts`` (a config flag of our models): the question's regions also prompt SAM, as boxes,
and the masks are kept inside them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ...engine.image import ModelView, low_res_to_masks
from ...engine.prompts import keep_seg_masks_inside_boxes, seg_region_prompt
from ...regions import Region
from ..base import Turn
from . import counting
from .regions import empty_region_warning


def ground(family, seg_hidden, view: ModelView, mask_mode: str, on_progress=None, regions: Sequence[Region] = ()):
    """Masks of the answer's ``<SEG>`` s and SAM's scores; ``regions`` (question order) also prompt SAM when
    the model was trained that way (``config.seg_region_prompts``, our extension)."""
    from ...model.seg_prompts import pair_with_segs

    model = family.model
    embeddings, resize_hw, pad = family.sam_embedding(view, on_progress)
    prompts = model.seg_prompt_embeddings(seg_hidden)  # [N, 256]
    seg_regions = pair_with_segs(prompts.shape[0], [seg_region_prompt(r) for r in regions])
    low_res, iou = model.decode_seg(embeddings, prompts, seg_regions, view.frame_hw, resize_hw, pad)  # [N, 1, 64, 64]
    masks = low_res_to_masks(low_res, view, resize_hw, pad, mask_mode)
    if model.config.seg_region_prompts:  # SAM was given the regions' boxes: keep the masks inside them
        masks = keep_seg_masks_inside_boxes(masks, seg_regions)
    return masks, [float(v) for v in iou.float().flatten().tolist()]


def empty_regions(turn: Turn, region_empty) -> list[int]:
    """Regions the model could not see: empty on its frame, or reported empty by the region encoder."""
    empty = turn.regions_read.empty
    order = turn.prompt.order
    if region_empty is not None:
        empty = sorted(set(empty) | {order[j] for j, e in enumerate(region_empty) if e})
    return empty


def decode_masks(family, turn: Turn) -> dict[str, Any]:
    """The Reply fields that come after the text: masks and scores, instances and tables, the measured
    count of a how-many question (which becomes the answer's number), warnings and empty regions.
    Adds ``masks`` (and ``instances``, ``count``) to ``turn.timings``."""
    model, view, request, timings = family.model, turn.plane, turn.request, turn.timings
    result = turn.answer.raw
    order, used = turn.prompt.order, turn.regions
    cancelled = result.finish_reason == "cancelled"
    empty = empty_regions(turn, result.region_empty)

    mark = time.perf_counter()
    masks, scores, split = [], [], None
    seg_indices = result.seg_indices(model.tokenizer.seg_token_id)
    if seg_indices and not cancelled:
        seg_hidden = model.answer_seg_hidden(result)
        masks, scores = family.ground(seg_hidden, view, request.mask_mode, turn.on_progress, [used[i] for i in order])
        if request.instances:
            masks, split = counting.split_instances(family, seg_hidden, masks, view, turn.image, request.question,
                                                    used, request.mask_mode, request.contrast_limits, request.rgb,
                                                    turn.on_progress, timings)
    timings["masks"] = time.perf_counter() - mark
    counted = (counting.measured_count(family, view, turn.image, request.question, used, request.template,
                                       request.contrast_limits, request.rgb, turn.on_progress, timings)
               if request.instances and not cancelled else None)

    warnings = [empty_region_warning(family, i, used[i], view) for i in empty]
    if seg_indices and cancelled:
        warnings.append("the answer was cancelled before its masks were made")
    fields = counting.instance_fields(split, counted, turn.image, warnings, result.text)
    counted_text = fields.pop("counted_text", None)
    return dict(
        text=counted_text or result.text, model_text=result.text if counted_text else None, masks=masks,
        warnings=warnings, empty_regions=empty, mask_scores=scores, **fields,
    )
