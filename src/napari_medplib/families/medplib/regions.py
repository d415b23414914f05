"""Regions as MedPLIB reads them: masks on the CLIP frame, and what the bundled model reads besides.

The released model reads a region as the cells of its 24x24 patch grid the region covers. Models of
ours may read more, switched on by their config (see ``model.config``):

* ``point_region_mask = "object"``: a positive point stands for SAM's mask of the clicked object
  (`regions_as_read`), not a square around the click;
* region geometry version 3 (``regions_read_brightness``): a box also brings SAM's mask of the object
  inside it (`box_objects`, `object_masks`);
* ``region_geometry`` (the region encoder ``reads_pixels``): a region is read by its pixels, so one too
  small for a grid cell is still seen.

On a plane much larger than the CLIP input, regions close together are read on the frame of a crop around
them instead of the whole plane's (``region_view``, every model; ``family.region_view = "plane"`` turns it off).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ...engine.image import (
    ModelView,
    low_res_to_masks,
    region_grid_mask,
    sam_prompt_box,
    sam_prompt_coords,
)
from ...engine.prompts import keep_inside_box, seg_region_prompt
from ...regions import Region
from . import region_view


@dataclass
class RegionInputs:
    """The regions of one question as the model takes them (question order, see ``build_prompt``)."""

    region_masks: Any  # [(R, 336, 336) uint8] or None
    region_objects: Any  # [(R, 336, 336) uint8] or None
    empty: list[int]  # indices (in the caller's order) the model cannot see
    crop: Any = None  # `region_view.Crop` the region tokens are pooled from, None: the whole plane


def encode_regions(family, regions: list[Region], view: ModelView, order: list[int], on_progress=None) -> RegionInputs:
    """The region masks (and objects) of ``regions`` in question ``order``, and the empty ones: on the frame
    of the whole plane, or of a crop around the regions where the region view picks one (``region_view``)."""
    read = regions_as_read(family, regions, view, on_progress)
    crop = region_view.choose(family, read, view)
    frame_masks, empty = region_masks(family, read, view, crop)
    objects = object_masks(family, box_objects(family, regions, view, on_progress), view, crop)
    return RegionInputs(
        [frame_masks[order]] if order else None,
        [objects[order]] if order and objects is not None else None,
        empty,
        crop,
    )


def reads_region_pixels(model) -> bool:
    """Whether the model reads a region's pixels (``region_geometry``) rather than the reference's cells."""
    encoder = getattr(model, "region_encoder", None)
    return encoder is not None and encoder.reads_pixels


def regions_as_read(family, regions: list[Region], view: ModelView, on_progress=None) -> list[Region]:
    """The regions as the model reads them: a positive point becomes SAM's mask of the clicked object on
    models with ``point_region_mask = "object"`` (the square where SAM finds nothing); else unchanged."""
    model = family.model
    clicked = [i for i, r in enumerate(regions) if r.kind == "point" and r.positive]
    if not clicked or not model.point_regions_are_objects:
        return regions
    import torch

    embeddings, resize_hw, pad = family.sam_embedding(view, on_progress)
    coords = sam_prompt_coords(np.concatenate([regions[i].coords for i in clicked]), view, resize_hw, pad)
    low_res = model.point_object_logits(embeddings, torch.from_numpy(coords))
    out = list(regions)
    masks = low_res_to_masks(low_res, view, resize_hw, pad, threshold=model.POINT_OBJECT_THRESHOLD)
    for i, mask in zip(clicked, masks, strict=True):
        if mask.any():
            point = regions[i]
            out[i] = Region.mask(mask, label=point.label, source=point.source, index=point.index,
                                 image_shape=view.image_hw)
    return out


def box_objects(family, regions: list[Region], view: ModelView, on_progress=None) -> list[Region | None]:
    """Per region, the object it stands for when that is not the region itself: SAM's mask of the object
    in each box (kept inside the box), on models whose region tokens read it (region geometry version
    3); None for every other region and where SAM finds nothing."""
    model = family.model
    out: list[Region | None] = [None] * len(regions)
    boxed = [i for i, r in enumerate(regions) if r.kind == "box"]
    if not boxed or not model.regions_read_brightness or model.sam is None:
        return out
    import torch

    embeddings, resize_hw, pad = family.sam_embedding(view, on_progress)
    boxes = [seg_region_prompt(regions[i]).box for i in boxed]  # (y0, x0, y1, x1), corners ordered
    xyxy = np.concatenate([sam_prompt_box(box, view, resize_hw, pad) for box in boxes])
    low_res = model.box_object_logits(embeddings, torch.from_numpy(xyxy).float())
    masks = low_res_to_masks(low_res, view, resize_hw, pad, threshold=model.POINT_OBJECT_THRESHOLD)
    for i, box, mask in zip(boxed, boxes, masks, strict=True):
        mask = keep_inside_box(mask, box)
        if mask.any():
            out[i] = Region.mask(mask, image_shape=view.image_hw)
    return out


def object_masks(family, objects: list[Region | None], view: ModelView, crop=None):
    """(R, 336, 336) uint8 masks of `box_objects` on the CLIP frame (zeros: the region itself), or None
    when no region has an object of its own. ``crop``: the frame is the region view's crop's."""
    if not any(o is not None for o in objects):
        return None
    import torch

    from ...model.preprocess import region_mask_to_grid

    vision = family.model.config.vision_config
    size, patch = int(vision["image_size"]), int(vision["patch_size"])
    empty = np.zeros((size, size), np.uint8)
    return torch.from_numpy(np.stack([
        empty if o is None else region_mask_to_grid(_on_frame(o, view, crop), size, patch).mask_336 for o in objects
    ]))


def region_masks(family, regions: list[Region], view: ModelView, crop=None):
    """(R, 336, 336) uint8 region masks on the CLIP frame and the indices the model cannot see: no cell of
    the reference's 24x24 grid, or no pixel where the model reads pixels (``region_geometry``).
    ``crop`` (`region_view.Crop`): the frame is that crop's, not the whole plane's."""
    import torch

    from ...model.preprocess import region_mask_to_grid

    vision = family.model.config.vision_config
    size, patch = int(vision["image_size"]), int(vision["patch_size"])
    grids = [region_mask_to_grid(_on_frame(r, view, crop), size, patch) for r in regions]
    pixels = reads_region_pixels(family.model)
    empty = [i for i, g in enumerate(grids) if not (g.mask_336.any() if pixels else g.n_cells)]
    stacked = torch.from_numpy(np.stack([g.mask_336 for g in grids])) if grids else None
    return stacked, empty


def _on_frame(region: Region, view: ModelView, crop) -> np.ndarray:
    """The region as a mask on the plane the model sees, or on the region view's crop of it."""
    return region_grid_mask(region, view) if crop is None else region_view.crop_mask(region, view, crop)


def empty_region_warning(family, index: int, region: Region, view: ModelView) -> str:
    """Why region ``index`` reached the model empty, and what to do."""
    vision = family.model.config.vision_config
    size = int(vision["image_size"])
    grid = size // int(vision["patch_size"])
    if reads_region_pixels(family.model):
        where, unit = f"{size}-px frame", f"one of its pixels is about {max(view.frame_hw) / size:.0f} image pixels"
    else:
        where, unit = f"{grid}x{grid} grid", f"one cell is about {max(view.frame_hw) / grid:.0f} image pixels"
    return (
        f"region {index + 1} ({region.describe()}) is too small for the model's {where} "
        f"({unit}); it was given as an empty region - draw it larger"
    )
