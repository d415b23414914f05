"""Conversations -> model inputs: teacher-forced ids and labels, region masks, SAM inputs, mask targets.

The prompt is built exactly as the engine builds it at inference (``model.tokenizer.encode_question``:
the ``medplib_v1`` template, the image in the first turn, ``<region>`` -> ``<region></region>`` with
one -300 slot), so the model learns the format it will be asked in. Several conversations about one
image are packed as one multi-turn sequence (LLaVA/MeCoVQA style): the 576 image tokens are then paid
once for several supervised answers.

Labels are the answer tokens and the closing ``</s>`` of every turn; the system prompt, the questions,
the image and region slots are masked with -100. Each ``<SEG>`` in an answer gets its target mask, in
order. Images go through ``imaging.to_model_rgb`` (the engine's 8-bit conversion), then the CLIP and
SAM preprocessing of ``model.preprocess``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..imaging import to_model_rgb
from ..model.config import IGNORE_INDEX
from ..model.preprocess import (
    CLIP_SIZE,
    frame_brightness,
    prepare_clip_image,
    prepare_sam_image,
    region_mask_to_grid,
)
from ..model.seg_prompts import SegRegionPrompt, pair_with_segs
from ..model.tokenizer import format_question, get_template, tokenize_prompt
from .data import Conversation, Sample

TEMPLATE = "medplib_v1"  # what encode_question uses at inference


class BatchError(ValueError):
    """A conversation cannot be turned into a training sequence (the message says why)."""


@dataclass
class ImageInputs:
    """One image, preprocessed once for every conversation about it."""

    rgb: np.ndarray  # (H, W, 3) uint8, what the model sees
    clip_pixels: torch.Tensor  # [1, 3, 336, 336]
    sam_pixels: torch.Tensor  # [1, 3, 256, 256]
    resize_hw: tuple[int, int]  # SAM resize
    pad: tuple[int, int]  # SAM centre padding (top, left)
    brightness: torch.Tensor | None = None  # [336, 336] grey level of the CLIP frame, NaN in its padding

    @property
    def original_hw(self) -> tuple[int, int]:
        return self.rgb.shape[:2]


@dataclass
class Sequence1:
    """One (multi-turn) training sequence about one image."""

    input_ids: torch.Tensor  # [N] with -200 (image) and -300 (regions)
    labels: torch.Tensor  # [N] answer tokens, else -100
    region_masks: torch.Tensor  # [R, 336, 336] uint8 on the CLIP frame, one per -300 slot in order
    target_masks: list[np.ndarray]  # one (H, W) bool per <SEG> in order
    tasks: list[str]  # task of each turn
    seg_regions: list[SegRegionPrompt | None] | None = None  # per <SEG>: the region it is about, if any
    region_points: list[tuple[float, float] | None] | None = None  # per region slot: the point of a point region
    token_tasks: list[str] | None = None  # per id: the task of the turn it belongs to
    region_boxes: list[tuple[float, float, float, float] | None] | None = None  # per region slot: a box region's box


@dataclass
class Batch:
    """B sequences (right-padded) and the images they are about."""

    input_ids: torch.Tensor  # [B, N]
    labels: torch.Tensor  # [B, N]
    attention_mask: torch.Tensor  # [B, N] bool
    clip_pixels: torch.Tensor  # [B, 3, 336, 336]
    sam_pixels: torch.Tensor  # [B, 3, 256, 256]
    region_masks: list[torch.Tensor]  # per sequence [R_b, 336, 336]
    target_masks: list[list[torch.Tensor]]  # per sequence, per <SEG>: (H, W) float 0/1
    images: list[ImageInputs]
    seg_regions: list[list[SegRegionPrompt | None]] | None = None  # per sequence, per <SEG>
    region_points: list[list[tuple[float, float] | None]] = field(default_factory=list)  # per sequence, per region
    token_tasks: list[list[str]] = field(default_factory=list)  # per sequence, per id (padding has none)
    region_boxes: list[list[tuple[float, float, float, float] | None]] = field(default_factory=list)  # per sequence, per region

    @property
    def brightness(self) -> torch.Tensor | None:
        """[B, 336, 336] grey levels of the CLIP frames (`ImageInputs.brightness`), None if any is missing."""
        frames = [im.brightness for im in self.images]
        return None if any(f is None for f in frames) else torch.stack(frames)

    @property
    def n_seg(self) -> int:
        return sum(len(t) for t in self.target_masks)


def prepare_image(sample: Sample) -> ImageInputs:
    """The engine's view of a sample: 8-bit RGB, CLIP pixels, SAM pixels and geometry."""
    rgb = to_model_rgb(sample.image)
    clip = prepare_clip_image(rgb)
    sam = prepare_sam_image(rgb)
    return ImageInputs(rgb, clip.pixel_values, sam.pixel_values, sam.resize_hw, sam.pad, frame_brightness(clip))


def region_mask(region, shape: tuple[int, int]) -> np.ndarray:
    """A RegionSpec -> its (336, 336) uint8 mask on the CLIP frame, as the engine computes it (the
    region encoder reads the reference's 24x24 cell grid from it, or its pixels: ``region_geometry``)."""
    return region_mask_to_grid(region.to_mask(shape)).mask_336


def seg_region_prompt(region) -> SegRegionPrompt | None:
    """A RegionSpec as the SAM prompt of a ``<SEG>`` about it (``config.seg_region_prompts``)."""
    if region.kind == "box":
        return SegRegionPrompt(box=tuple(float(v) for v in region.box))
    if region.kind == "point":
        return SegRegionPrompt(point=tuple(float(v) for v in region.point))
    return SegRegionPrompt.from_mask(region.mask)


def build_sequence(tokenizer, conversations: Sequence[Conversation], image_hw: tuple[int, int],
                   with_image: bool = True) -> Sequence1:
    """Ids and labels of ``conversations`` as consecutive turns about one image.

    ``with_image=False`` leaves the ``<image>`` slot out (the region tokens are still computed from
    the image): a curriculum for region questions, see ``StageSpec.image_tokens``.

    Each turn is tokenised on its own (prompt part, then answer + ``</s>``); that equals tokenising
    the whole text because every turn boundary is an added/special token or a space, where the
    reference tokenizer splits anyway.
    """
    if not conversations:
        raise BatchError("a training sequence needs at least one conversation")
    template = get_template(TEMPLATE)
    ids: list[int] = []
    labels: list[int] = []
    masks: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    seg_regions: list[SegRegionPrompt | None] = []
    points: list[tuple[float, float] | None] = []
    boxes: list[tuple[float, float, float, float] | None] = []
    token_tasks: list[str] = []
    for turn, conv in enumerate(conversations):
        text, order = format_question(conv.question, len(conv.regions), with_image=with_image and turn == 0,
                                    append_missing=False)
        prompt = (template.system + template.sep if turn == 0 else "") + f"{template.roles[0]}: {text}{template.sep}{template.roles[1]}:"
        prompt_ids = tokenize_prompt(prompt, tokenizer)
        if turn > 0:
            prompt_ids = prompt_ids[1:]  # one BOS per sequence
        answer_ids = [*tokenizer.encode(conv.answer, add_bos=False), tokenizer.eos_token_id]
        n_seg = answer_ids.count(tokenizer.seg_token_id)
        if n_seg != len(conv.target_masks):
            raise BatchError(f"answer {conv.answer!r} has {n_seg} <SEG> token(s) but {len(conv.target_masks)} target mask(s)")
        ids += prompt_ids + answer_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
        token_tasks += [conv.task] * (len(prompt_ids) + len(answer_ids))
        masks += [region_mask(conv.regions[k], image_hw) for k in order]
        points += [_point_of(conv.regions[k]) for k in order]
        boxes += [_box_of(conv.regions[k]) for k in order]
        targets += [np.asarray(m, bool) for m in conv.target_masks]
        seg_regions += pair_with_segs(n_seg, [seg_region_prompt(conv.regions[k]) for k in order])
    region_masks = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, CLIP_SIZE, CLIP_SIZE), dtype=torch.uint8)
    return Sequence1(torch.tensor(ids), torch.tensor(labels), region_masks, targets, [c.task for c in conversations],
                     seg_regions, points, token_tasks, boxes)


def _point_of(region) -> tuple[float, float] | None:
    return (float(region.point[0]), float(region.point[1])) if region.kind == "point" else None


def _box_of(region) -> tuple[float, float, float, float] | None:
    return tuple(float(v) for v in region.box) if region.kind == "box" else None


def pack_conversations(conversations: Sequence[Conversation], tasks: Sequence[str], turns: int,
                       rng: np.random.Generator) -> list[list[Conversation]]:
    """The conversations of one image whose task is in ``tasks``, shuffled, in chunks of ``turns``,
    with at most one conversation that has ``<region>``s per chunk.

    Why one: with several region questions in one sequence, a from-scratch LLM latched onto the
    first region token of the sequence for every later answer (measured: each answer's gradient went
    to region 1, ~1000x less to its own region) and never learned to read the region it was asked
    about. Region conversations open chunks; the others fill the remaining turns.
    """
    keep = [c for c in conversations if c.task in tasks]
    keep = [keep[i] for i in rng.permutation(len(keep))] if keep else []
    turns = max(turns, 1)
    with_regions = [c for c in keep if c.regions]
    plain = [c for c in keep if not c.regions]
    chunks = [[c] for c in with_regions]
    while plain and any(len(chunk) < turns for chunk in chunks):  # round-robin over region chunks
        for chunk in chunks:
            if plain and len(chunk) < turns:
                chunk.append(plain.pop())
    chunks += [plain[i : i + turns] for i in range(0, len(plain), turns)]
    for chunk in chunks:  # the region question at a random turn, not always the first
        order = rng.permutation(len(chunk))
        chunk[:] = [chunk[i] for i in order]
    return chunks


def collate(sequences: Sequence[Sequence1], images: Sequence[ImageInputs], pad_id: int) -> Batch:
    """Right-pad sequences into a batch (the model right-pads the expanded sequence the same way)."""
    if len(sequences) != len(images) or not sequences:
        raise BatchError(f"need one image per sequence, got {len(sequences)} sequences and {len(images)} images")
    length = max(len(s.input_ids) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(sequences), length), dtype=torch.bool)
    for b, seq in enumerate(sequences):
        n = len(seq.input_ids)
        input_ids[b, :n], labels[b, :n], attention[b, :n] = seq.input_ids, seq.labels, True
    return Batch(
        input_ids, labels, attention,
        torch.cat([im.clip_pixels for im in images]), torch.cat([im.sam_pixels for im in images]),
        [s.region_masks for s in sequences],
        [[torch.from_numpy(m).float() for m in s.target_masks] for s in sequences],
        list(images),
        [list(s.seg_regions) if s.seg_regions is not None else [None] * len(s.target_masks) for s in sequences],
        [list(s.region_points) if s.region_points is not None else [None] * len(s.region_masks) for s in sequences],
        [list(s.token_tasks or ()) for s in sequences],
        [list(s.region_boxes) if s.region_boxes is not None else [None] * len(s.region_masks) for s in sequences],
    )


def expand_labels(labels: torch.Tensor, position_map: torch.Tensor, expanded_length: int) -> torch.Tensor:
    """Labels [B, N] on the ids -> [B, L] on the expanded sequence (image/region slots stay -100)."""
    out = torch.full((labels.shape[0], expanded_length), IGNORE_INDEX, dtype=torch.long, device=labels.device)
    for b in range(labels.shape[0]):
        valid = position_map[b] >= 0
        positions = position_map[b][valid].to(labels.device)
        values = labels[b, : int(valid.sum())]
        keep = values != IGNORE_INDEX
        out[b, positions[keep]] = values[keep]
    return out
