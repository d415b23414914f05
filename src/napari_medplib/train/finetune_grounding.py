"""The grounding path of fine-tuning: "Please segment the <class>." answered with ``<SEG>``, its mask the
user's objects of that class, on the tiles the engine grounds in.

Why: box and click prompts need no words, but a user who adapted the model on "mitochondrion" expects
"segment the mitochondria" to find them. This trains the ``<SEG>`` projection and LoRA factors (peft) on
the language model, next to SAM's decoder, on frames cut as the engine cuts a large plane for grounding
(``engine/instance_grounding.plan_tiles``: objects at the model's scale).

Partial annotation: only labelled objects are positives. Their pixels and a ring of background around
each (where an annotator who outlined the object saw no object) count in the mask loss; other pixels do
not, unless the plane is fully annotated. Held-out objects never count (neither as object nor as
background), so the held-out figures stay honest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage as ndi

from .finetune_data import AnnotatedPlane, ObjectRef

#: How the question is asked (the engine's own wording first; a few others so the word, not the
#: sentence, is what is learnt).
QUESTIONS = ("Please segment the {noun}.", "Segment the {noun}.", "Please segment the {noun} in this image.",
             "Can you segment the {noun}?")
ANSWER = "It is <SEG>."
#: Width of the background ring around each trained object that counts in the mask loss under partial
#: annotation, as a share of the objects' median diameter (at least 2 pixels).
BACKGROUND_RING = 0.3
#: LoRA on the language model's FFN (and MoE experts), as the recipes' default.
LORA_TARGETS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class GroundingPlane:
    """A training plane as the engine grounds it: its model RGB, tiling and loss weights."""

    rgb: np.ndarray  # (H, W, 3) uint8 (the plane's contrast)
    positives: dict[str, np.ndarray]  # class -> bool (H, W): its training objects
    weight: np.ndarray  # float32 (H, W): 1 where the loss counts
    tile: int | None  # tile side, None = the whole plane
    centres: list[tuple[int, int]]  # training objects' centres, to cut tiles around


def prepare_grounding(plane: AnnotatedPlane, rgb: np.ndarray, train: Sequence[int], heldout: Sequence[int]
                      ) -> GroundingPlane:
    """Positives per class, the loss weights and the engine's tile side for one plane."""
    from ..engine.image import ModelView
    from ..engine.instance_grounding import object_diameter, plan_tiles

    labels = plane.labels
    trained = np.isin(labels, list(train)) & (labels > 0)
    held = np.isin(labels, list(heldout)) & (labels > 0)
    positives: dict[str, np.ndarray] = {}
    for label in train:
        name = plane.classes[label]
        positives.setdefault(name, np.zeros(labels.shape, bool))
        positives[name] |= labels == label
    if plane.fully_annotated:
        weight = ~held
    else:
        areas = np.bincount(labels[trained].ravel()) if trained.any() else np.zeros(1)
        diameter = float(np.sqrt(4 * np.median(areas[areas > 0]) / np.pi)) if (areas > 0).any() else 8.0
        ring = ndi.binary_dilation(trained, iterations=max(2, int(round(BACKGROUND_RING * diameter))))
        weight = (trained | (ring & (labels == 0))) & ~held
    view = ModelView(rgb, "", labels.shape, 1)
    tiles = plan_tiles(labels.shape, object_diameter(view), 256)
    centres = [tuple(int(v) for v in ndi.center_of_mass(labels == label)) for label in train]
    return GroundingPlane(rgb, positives, weight.astype(np.float32), None if tiles is None else tiles[0], centres)


def grounding_item(gp: GroundingPlane, rng: np.random.Generator):
    """One (Item, weight map) for a random class of the plane, on a tile around a random training object."""
    from .data import Conversation, Sample
    from .stream import Item

    h, w = gp.weight.shape
    y0, x0, y1, x1 = 0, 0, h, w
    if gp.tile is not None and gp.centres:
        cy, cx = gp.centres[int(rng.integers(len(gp.centres)))]
        side = gp.tile
        y0 = int(np.clip(cy - rng.integers(side // 4, 3 * side // 4 + 1), 0, max(0, h - side)))
        x0 = int(np.clip(cx - rng.integers(side // 4, 3 * side // 4 + 1), 0, max(0, w - side)))
        y1, x1 = min(h, y0 + side), min(w, x0 + side)
    names = sorted(gp.positives)
    noun = names[int(rng.integers(len(names)))]
    target = gp.positives[noun][y0:y1, x0:x1]
    question = QUESTIONS[int(rng.integers(len(QUESTIONS)))].format(noun=noun)
    sample = Sample(np.ascontiguousarray(gp.rgb[y0:y1, x0:x1]), ndi.label(target)[0].astype(np.int32),
                    {}, "user")
    conversation = Conversation(question, ANSWER, "grounding", "semantic", [], [target.copy()])
    return Item(sample, [conversation]), torch.from_numpy(np.ascontiguousarray(gp.weight[y0:y1, x0:x1]))


def weighted_mask_losses(logits: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                         weights: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE and Dice of each mask over the pixels whose weight is 1 (partial annotation), mean over masks."""
    bces, dices = [], []
    for logit, target, weight in zip(logits, targets, weights, strict=True):
        logit, target = logit.reshape(-1).float(), target.reshape(-1).float()
        weight = weight.reshape(-1).to(logit.device)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logit, target, reduction="none")
        bces.append((bce * weight).sum() / weight.sum().clamp(min=1.0))
        prob = torch.sigmoid(logit) * weight
        inter = (prob * target).sum()
        dices.append(1.0 - (2 * inter + 1e-6) / (prob.sum() + (target * weight).sum() + 1e-6))
    return torch.stack(bces).mean(), torch.stack(dices).mean()


def grounding_losses(model, items: Sequence, weights: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Answer CE plus the weighted mask loss of each item's ``<SEG>`` (``train.steps`` pieces)."""
    from .batches import expand_labels
    from .losses import token_ce
    from .steps import _seg_masks, encode_images, make_batch

    batch = make_batch(model, items)
    features = encode_images(model, batch.clip_pixels, batch.brightness if model.regions_read_brightness else None)
    with torch.no_grad() if not any(p.requires_grad for p in model.sam.image_encoder.parameters()) else torch.enable_grad():
        embeddings = model.sam.encode_image(batch.sam_pixels.to(model.device))
    regions = [features.image_tokens.new_zeros((0, model.config.hidden_size)) for _ in items]
    out = model(batch.input_ids, image_features=features, region_features=regions, attention_mask=batch.attention_mask)
    labels = expand_labels(batch.labels, out.position_map, out.hidden_states.shape[1])
    logits, _, targets = _seg_masks(model, batch, out, embeddings)
    bce, dice = weighted_mask_losses([m[0] for m in logits], [t[0] for t in targets], weights)
    return {"ce": token_ce(out.logits, labels), "ground_bce": bce, "ground_dice": dice}


def grounding_planes(planes: Sequence[AnnotatedPlane], rgbs: dict[int, np.ndarray], train: Sequence[ObjectRef],
                     heldout: Sequence[ObjectRef]) -> list[GroundingPlane]:
    """`prepare_grounding` for every plane with training objects."""
    out = []
    for p, rgb in sorted(rgbs.items()):
        ids = [o.label for o in train if o.plane == p]
        if ids:
            out.append(prepare_grounding(planes[p], rgb, ids, [o.label for o in heldout if o.plane == p]))
    return out
