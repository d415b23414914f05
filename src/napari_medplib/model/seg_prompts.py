"""Region prompts for ``<SEG>`` masks: our extension, ``config.seg_region_prompts``.

MedPLIB decodes each ``<SEG>`` from its T-projected hidden state alone (one sparse token, no box, no
point). For "segment the nucleus in <region>" that leaves the whole job of saying *which* nucleus to a
single 256-d vector, and our small models measured instance grounding Dice 0.17 that way (the mask
covered every nucleus). With this extension the region the question names is also given to
SAM-Med2D's prompt encoder, as SAM takes it from a user: a box, or one foreground point, next to the
``<SEG>`` token. Released MedPLIB checkpoints were not trained with it, so the flag is off for them and
``MedPLIBModel.ground`` then ignores region prompts.

Coordinates are image pixels, (row, col), like everything the engine and the training data hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SegRegionPrompt:
    """The region one ``<SEG>`` refers to: a box (y0, x0, y1, x1), inclusive pixel centres, or a point."""

    box: tuple[float, float, float, float] | None = None
    point: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if (self.box is None) == (self.point is None):
            raise ValueError("a SegRegionPrompt is either a box or a point")

    @property
    def kind(self) -> str:
        return "box" if self.box is not None else "point"

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> SegRegionPrompt | None:
        """A mask's tight box (None for an empty mask): polygons, paths and label masks go to SAM as boxes."""
        rows, cols = np.nonzero(np.asarray(mask))
        if not len(rows):
            return None
        return cls(box=(float(rows.min()), float(cols.min()), float(rows.max()), float(cols.max())))


def pair_with_segs(n_seg: int, regions: Sequence[SegRegionPrompt | None]) -> list[SegRegionPrompt | None]:
    """Which region each of ``n_seg`` ``<SEG>`` tokens refers to, from the question's regions in order.

    One region: every ``<SEG>`` is about it ("segment the nucleus in <region>"). As many regions as
    ``<SEG>`` s: the k-th mask is about the k-th region. Otherwise the pairing is unknown and no
    ``<SEG>`` gets a region (the text prompt alone, as in MedPLIB).
    """
    if len(regions) == 1:
        return [regions[0]] * n_seg
    if len(regions) == n_seg:
        return list(regions)
    return [None] * n_seg


def decode_seg_with_regions(
    sam,
    image_embeddings: torch.Tensor,
    seg_embeddings: torch.Tensor,
    regions: Sequence[SegRegionPrompt | None],
    original_hw: tuple[int, int],
    resize_hw: tuple[int, int],
    pad: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM-Med2D decoding of ``<SEG>`` embeddings [N, C], each with its region's box or point (or none).

    image_embeddings (1, C, g, g), or (N, C, g, g) one per prompt (a training batch's images decoded
    together; the images must share ``original_hw``/``resize_hw``/``pad``); returns low-res logits
    (N, 1, 64, 64) and iou (N, 1) in the order of ``seg_embeddings``. Prompts of one kind are decoded
    together (SAM needs equal token counts).
    """
    from .preprocess import image_to_sam_boxes, image_to_sam_coords

    if len(regions) != seg_embeddings.shape[0]:
        raise ValueError(f"{seg_embeddings.shape[0]} <SEG> embeddings but {len(regions)} region prompts")
    groups: dict[str, list[int]] = {"none": [], "box": [], "point": []}
    for i, region in enumerate(regions):
        groups["none" if region is None else region.kind].append(i)
    low_res = iou = None
    for kind, index in groups.items():
        if not index:
            continue
        extra = {}
        if kind == "box":
            boxes = image_to_sam_boxes([regions[i].box for i in index], original_hw, resize_hw, pad)
            extra["boxes"] = torch.as_tensor(boxes, dtype=torch.float32, device=sam.device)
        elif kind == "point":
            points = image_to_sam_coords([[regions[i].point] for i in index], original_hw, resize_hw, pad)
            extra["points"] = torch.as_tensor(points, dtype=torch.float32, device=sam.device)
            extra["point_labels"] = torch.ones((len(index), 1), dtype=torch.int64, device=sam.device)
        embeddings = image_embeddings if image_embeddings.shape[0] == 1 else image_embeddings[index]
        part_logits, part_iou = sam.decode_with_text_prompt(embeddings, seg_embeddings[index], **extra)
        if low_res is None:
            low_res = part_logits.new_empty((len(regions), *part_logits.shape[1:]))
            iou = part_iou.new_empty((len(regions), *part_iou.shape[1:]))
        where = torch.as_tensor(index, device=part_logits.device)
        low_res = low_res.index_copy(0, where, part_logits)  # out of place: keeps gradients in training
        iou = iou.index_copy(0, where, part_iou)
    if low_res is None:
        raise ValueError("no <SEG> embeddings to decode")
    return low_res, iou
