"""One training step's losses: conversations through the whole model, prompts through SAM alone, or
images through the vision tower alone (the density target)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from ..model.config import IGNORE_INDEX
from ..model.medplib import ImageFeatures, MedPLIBModel
from ..model.postprocess import masks_from_logits, postprocess_masks
from ..model.preprocess import image_to_sam_boxes, image_to_sam_coords, region_mask_to_grid
from .batches import Batch, build_sequence, collate, expand_labels, prepare_image
from .centres import centre_focal_loss, centre_targets
from .density import density_loss
from .losses import iou_mse, mask_losses, token_ce
from .recipe import LossWeights, StageSpec
from .stream import Item


def _grad_if(trainable: bool):
    return nullcontext() if trainable else torch.no_grad()


def _any_trainable(module: torch.nn.Module | None) -> bool:
    return module is not None and any(p.requires_grad for p in module.parameters())


def make_batch(model: MedPLIBModel, items: Sequence[Item], with_image: bool = True) -> Batch:
    images = [prepare_image(item.sample) for item in items]
    sequences = [build_sequence(model.tokenizer, item.conversations, im.original_hw, with_image)
                 for item, im in zip(items, images, strict=True)]
    return collate(sequences, images, model.tokenizer.pad_token_id)


def encode_images(model: MedPLIBModel, clip_pixels: torch.Tensor, brightness: torch.Tensor | None = None) -> ImageFeatures:
    """Like ``model.encode_image`` but with gradients into CLIP when the stage trains it.

    The paper keeps a pretrained CLIP frozen; a model trained from scratch has no pretrained CLIP, so
    a recipe may train it."""
    with _grad_if(_any_trainable(model.vision_tower)):
        patch_features = model.vision_tower(clip_pixels.to(model.device))
    peaks = model.count_peaks(clip_pixels)
    return ImageFeatures(patch_features, model.image_tokens(patch_features, peaks), brightness, peaks)


def point_object_masks(model: MedPLIBModel, embedding: torch.Tensor, image, points_yx: Sequence[Sequence[float]],
                       ) -> list[np.ndarray | None]:
    """(H, W) bool masks of the objects under clicked (row, col) points, None where SAM finds nothing
    (the point then stays MedPLIB's square): what the engine does for ``point_region_mask = "object"``."""
    if not len(points_yx):
        return []
    coords = image_to_sam_coords(np.asarray(points_yx, float), image.original_hw, image.resize_hw, image.pad)
    low_res = model.point_object_logits(embedding, torch.from_numpy(coords))
    masks = masks_from_logits(postprocess_masks(low_res, image.resize_hw, image.original_hw, pad=image.pad),
                              model.POINT_OBJECT_THRESHOLD)
    return [m if m.any() else None for m in masks.reshape(len(coords), *image.original_hw).cpu().numpy()]


def box_object_masks(model: MedPLIBModel, embedding: torch.Tensor, image, boxes: Sequence[Sequence[float]],
                     ) -> list[np.ndarray | None]:
    """(H, W) bool masks of the objects in (y0, x0, y1, x1) boxes, kept inside the box, None where SAM finds
    nothing: the object a box region stands for in version-3 region geometry, as the engine makes it.
    ``embedding`` [1 or N, C, 16, 16] (one per box when the boxes are on different images of one geometry)."""
    from ..engine.prompts import keep_inside_box

    if not len(boxes):
        return []
    xyxy = image_to_sam_boxes(np.asarray(boxes, float), image.original_hw, image.resize_hw, image.pad)
    low_res = model.box_object_logits(embedding, torch.from_numpy(xyxy).float())
    masks = masks_from_logits(postprocess_masks(low_res, image.resize_hw, image.original_hw, pad=image.pad),
                              model.POINT_OBJECT_THRESHOLD).reshape(len(boxes), *image.original_hw).cpu().numpy()
    masks = [keep_inside_box(m, box) for m, box in zip(masks, boxes, strict=True)]
    return [m if m.any() else None for m in masks]


def _one_geometry(images: Sequence) -> bool:
    """Whether the images share SAM's resize, padding and size, so that their masks can be decoded and
    upsampled in one call (a GPU step is otherwise launch-bound: one small decode per image)."""
    return len({(tuple(im.original_hw), tuple(im.resize_hw), tuple(im.pad)) for im in images}) <= 1


def _batch_objects(model: MedPLIBModel, batch: Batch, sam_embeddings: torch.Tensor, prompts, decode):
    """(b, k, mask or None) for every region k of sequence b with a prompt (``prompts[b][k]`` not None),
    decoded by ``decode`` (`point_object_masks` or `box_object_masks`) from the batch's SAM embeddings
    [B, C, 16, 16], without gradient: SAM's choice of object is an input here, as it is at inference.
    All the batch's prompts are decoded together when its images share a geometry."""
    found = [(b, k, x) for b, per in enumerate(prompts) for k, x in enumerate(per) if x is not None]
    if not found:
        return []
    rows = [b for b, _, _ in found]
    if _one_geometry([batch.images[b] for b in rows]):
        masks = decode(model, sam_embeddings[rows].detach(), batch.images[rows[0]], [x for _, _, x in found])
    else:
        masks = [decode(model, sam_embeddings[b : b + 1].detach(), batch.images[b], [x])[0] for b, _, x in found]
    return [(b, k, mask) for (b, k, _), mask in zip(found, masks, strict=True)]


def _regions_as_objects(model: MedPLIBModel, batch: Batch, sam_embeddings: torch.Tensor) -> list[torch.Tensor]:
    """``batch.region_masks`` with each point region's square replaced by its object's mask."""
    out = list(batch.region_masks)
    for b, k, mask in _batch_objects(model, batch, sam_embeddings, batch.region_points, point_object_masks):
        if mask is not None:
            if out[b] is batch.region_masks[b]:
                out[b] = out[b].clone()
            out[b][k] = torch.from_numpy(region_mask_to_grid(mask).mask_336)
    return out


def _box_objects(model: MedPLIBModel, batch: Batch, sam_embeddings: torch.Tensor) -> list[torch.Tensor]:
    """Per sequence [R_b, 336, 336]: SAM's mask of the object in each box region (version-3 region
    geometry), zeros for the other regions and where SAM finds nothing (the region then stands for itself)."""
    out = [torch.zeros_like(masks) for masks in batch.region_masks]
    for b, k, mask in _batch_objects(model, batch, sam_embeddings, batch.region_boxes, box_object_masks):
        if mask is not None:
            out[b][k] = torch.from_numpy(region_mask_to_grid(mask).mask_336)
    return out


def _router_inputs(model: MedPLIBModel):
    """Forward pre-hooks that keep each MoE layer's input [B, L, D]; returns (inputs, handles)."""
    inputs: list[torch.Tensor] = []
    handles = [moe.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
               for moe in model.language_model.moe_layers() if moe is not None]
    return inputs, handles


def router_loss(model: MedPLIBModel, inputs: Sequence[torch.Tensor], expert_targets: torch.Tensor) -> torch.Tensor:
    """Mean over MoE layers of the CE between the router's logits and each token's target expert
    [B, L] (-100: no target, e.g. image and region slots and padding)."""
    layers = [moe for moe in model.language_model.moe_layers() if moe is not None]
    targets = expert_targets.reshape(-1)
    if not bool((targets != IGNORE_INDEX).any()):
        return inputs[0].sum() * 0.0
    losses = [F.cross_entropy(moe.router_logits(x.reshape(-1, x.shape[-1])), targets.to(x.device), ignore_index=IGNORE_INDEX)
              for moe, x in zip(layers, inputs, strict=True)]
    return torch.stack(losses).mean()


def llm_losses(model: MedPLIBModel, batch: Batch, weights: LossWeights,
               router_targets: dict[str, int] | None = None, density_head: torch.nn.Module | None = None,
               density_targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """CE on the answers + BCE/Dice (+ IoU) on the mask of every ``<SEG>`` + the MoE aux loss, and with
    ``weights.router`` the router's CE against ``router_targets`` (task -> expert) on every text token;
    with a `density_head`, its maps of the patch features against `density_targets` (``train.density``)."""
    reads_brightness = model.regions_read_brightness
    features = encode_images(model, batch.clip_pixels, batch.brightness if reads_brightness else None)
    needs_masks = bool(batch.n_seg and (weights.bce or weights.dice or weights.iou))
    needs_objects = model.point_regions_are_objects and any(p is not None for ps in batch.region_points for p in ps)
    needs_boxes = (reads_brightness and model.sam is not None
                   and any(x is not None for xs in batch.region_boxes for x in xs))
    sam_embeddings = None
    if needs_masks or needs_objects or needs_boxes:  # once for every use
        with _grad_if(needs_masks and _any_trainable(model.sam.image_encoder)):
            sam_embeddings = model.sam.encode_image(batch.sam_pixels)  # [B, C, 16, 16]
    region_masks = _regions_as_objects(model, batch, sam_embeddings) if needs_objects else batch.region_masks
    objects = _box_objects(model, batch, sam_embeddings) if needs_boxes else [None] * len(region_masks)
    brightness, peaks = features.brightness, features.count_peaks
    regions = [
        model.encode_regions(features.patch_features[b], masks, None, objects[b],
                             brightness[b] if brightness is not None else None,
                             count_peaks=peaks[b] if peaks is not None else None)[0] if len(masks)
        else features.image_tokens.new_zeros((0, model.config.hidden_size))
        for b, masks in enumerate(region_masks)
    ]  # per sequence [R_b, D] (the model's region path needs at least one region)
    supervise_router = bool(weights.router and router_targets)
    router_inputs, hooks = _router_inputs(model) if supervise_router else ([], [])
    try:
        out = model(batch.input_ids, image_features=features, region_features=regions,
                    attention_mask=batch.attention_mask)
    finally:
        for hook in hooks:
            hook.remove()
    labels = expand_labels(batch.labels, out.position_map, out.hidden_states.shape[1])
    losses = {"ce": token_ce(out.logits, labels)}
    if supervise_router:
        experts = torch.full(batch.input_ids.shape, IGNORE_INDEX, dtype=torch.long)
        for b, tasks in enumerate(batch.token_tasks):
            experts[b, : len(tasks)] = torch.tensor([router_targets.get(t, IGNORE_INDEX) for t in tasks], dtype=torch.long)
        experts[batch.input_ids < 0] = IGNORE_INDEX  # image / region placeholders: features, not text
        losses["router"] = router_loss(model, router_inputs, expand_labels(experts, out.position_map, out.hidden_states.shape[1]))
    if needs_masks:
        logits, ious, targets = _seg_masks(model, batch, out, sam_embeddings)
        losses["bce"], losses["dice"] = mask_losses(logits, targets)
        if weights.iou:
            losses["iou"] = sum(iou_mse(i, m, t) for i, m, t in zip(ious, logits, targets, strict=True)) / len(ious)
    if density_head is not None and density_targets is not None:
        losses["density"] = density_loss(density_head(features.patch_features), density_targets)
    aux = [r.aux_loss for r in out.routing if r is not None and r.aux_loss is not None]
    if aux:
        losses["aux"] = torch.stack(aux).mean()
    return losses


def vision_losses(model: MedPLIBModel, items: Sequence[Item], density_head: torch.nn.Module,
                  density_targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """The density loss of the vision tower's patch features (``kind = "vision"``): no LLM, no SAM."""
    pixels = torch.cat([prepare_image(item.sample).clip_pixels for item in items]).to(model.device)
    patch_features = model.vision_tower(pixels)  # [B, 576, Dv]
    return {"density": density_loss(density_head(patch_features), density_targets)}


def counter_losses(model: MedPLIBModel, items: Sequence[Item]) -> dict[str, torch.Tensor]:
    """The object counter's centre loss (``kind = "counter"``): no LLM, no SAM, no CLIP."""
    if model.counter is None:
        raise ValueError("a counter stage needs a model with count_nouns ([model] or the stage's model)")
    pixels = torch.cat([prepare_image(item.sample).clip_pixels for item in items]).to(model.device)
    targets = centre_targets([item.sample for item in items], model.config.count_nouns)
    return {"centre": centre_focal_loss(model.counter.heatmap(pixels), targets)}


def _seg_masks(model: MedPLIBModel, batch: Batch, out, embeddings: torch.Tensor):
    """Mask logits [n_b, H, W], IoU [n_b, 1] and targets of every sequence's ``<SEG>`` tokens (sequences
    without one left out): one SAM decode for the batch when its images share a geometry."""
    seg_id = model.tokenizer.seg_token_id
    rows, prompts, regions = [], [], []
    for b in range(len(batch.images)):
        if not batch.target_masks[b]:
            continue
        positions = MedPLIBModel.seg_hidden_positions(batch.input_ids[b], out.position_map[b], seg_id, "each")
        rows.append(b)
        prompts.append(model.seg_prompt_embeddings(out.hidden_states[b, positions]))  # [n_b, out_dim]
        regions.append(batch.seg_regions[b] if batch.seg_regions is not None else [None] * len(positions))
    images = [batch.images[b] for b in rows]
    targets = [torch.stack(batch.target_masks[b]).to(embeddings.device) for b in rows]
    if _one_geometry(images):
        counts = [len(p) for p in prompts]
        index = torch.repeat_interleave(torch.tensor(rows), torch.tensor(counts)).to(embeddings.device)
        image = images[0]
        low_res, iou = model.decode_seg(embeddings[index], torch.cat(prompts), [r for rs in regions for r in rs],
                                        image.original_hw, image.resize_hw, image.pad)
        logits = postprocess_masks(low_res, image.resize_hw, image.original_hw, pad=image.pad)
        return list(logits.split(counts)), list(iou.split(counts)), targets
    logits, ious = [], []
    for b, image, seg_prompts, seg_regions in zip(rows, images, prompts, regions, strict=True):
        low_res, iou = model.decode_seg(embeddings[b : b + 1], seg_prompts, seg_regions, image.original_hw,
                                        image.resize_hw, image.pad)
        logits.append(postprocess_masks(low_res, image.resize_hw, image.original_hw, pad=image.pad))
        ious.append(iou)
    return logits, ious, targets


# ----------------------------------------------------------------------------- SAM prompts
def interior_point(mask: np.ndarray, rng: np.random.Generator | None = None) -> tuple[float, float]:
    """A foreground (row, col): random inside the mask, or (rng None) its most interior pixel."""
    if rng is None:
        distance = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        r, c = np.unravel_index(int(np.argmax(distance)), mask.shape)
        return float(r), float(c)
    rows, cols = np.nonzero(mask)
    k = int(rng.integers(len(rows)))
    return float(rows[k]), float(cols[k])


def tight_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(y0, x0, y1, x1) pixel-centre corners, both inclusive."""
    rows, cols = np.nonzero(mask)
    return float(rows.min()), float(cols.min()), float(rows.max()), float(cols.max())


def sam_prompts(image, masks: Sequence[np.ndarray], prompt: str, rng: np.random.Generator | None = None,
                jitter: float = 0.0) -> np.ndarray:
    """One image's instances as SAM prompts in its padded 256 frame: boxes [N, 4] xyxy from their
    tight boxes (with ``jitter``: corners moved by that fraction of the size), or points [N, 1, 2] xy
    on their most interior pixel (with ``rng``: a random pixel of the instance)."""
    hw = image.original_hw
    if prompt == "box":
        boxes = []
        for mask in masks:
            y0, x0, y1, x1 = tight_box(mask)
            if rng is not None and jitter:
                h, w = y1 - y0 + 1, x1 - x0 + 1
                y0, y1 = y0 + rng.normal(0, jitter * h), y1 + rng.normal(0, jitter * h)
                x0, x1 = x0 + rng.normal(0, jitter * w), x1 + rng.normal(0, jitter * w)
            boxes.append((y0, x0, y1, x1))
        return image_to_sam_boxes(boxes, hw, image.resize_hw, image.pad)
    points = np.array([[interior_point(m, rng)] for m in masks])  # [N, 1, 2] (row, col)
    return image_to_sam_coords(points, hw, image.resize_hw, image.pad)


def decode_prompts(model: MedPLIBModel, embeddings: torch.Tensor, images: Sequence, prompts: Sequence[np.ndarray],
                   kind: str) -> list[torch.Tensor]:
    """Mask logits [N_b, H_b, W_b] per image from its ``sam_prompts`` of one ``kind`` ("box" or
    "point"), embeddings [B, C, 16, 16]: one decoder call for the whole batch, not one per image (on
    a GPU a training step is otherwise launch-bound), and one upsampling per image geometry."""
    counts = [len(p) for p in prompts]
    index = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(embeddings.device)
    stacked = np.concatenate(prompts)
    if kind == "box":
        low_res, _ = model.sam.decode_with_prompts(embeddings[index], boxes=stacked)
    else:
        low_res, _ = model.sam.decode_with_prompts(embeddings[index], points=stacked,
                                                   point_labels=np.ones(stacked.shape[:2]))
    if _one_geometry(images):  # the usual training batch: images of one size
        image = images[0]
        return list(postprocess_masks(low_res, image.resize_hw, image.original_hw, pad=image.pad).split(counts))
    return [postprocess_masks(part, im.resize_hw, im.original_hw, pad=im.pad)
            for part, im in zip(low_res.split(counts), images, strict=True)]


def prompt_masks(model: MedPLIBModel, embedding: torch.Tensor, image, masks: Sequence[np.ndarray], prompt: str,
                 rng: np.random.Generator | None = None, jitter: float = 0.0) -> torch.Tensor:
    """Mask logits [N, H, W] for one image's instances from their box or point prompts."""
    return decode_prompts(model, embedding, [image], [sam_prompts(image, masks, prompt, rng, jitter)], prompt)[0]


def sam_losses(model: MedPLIBModel, items: Sequence[Item], stage: StageSpec, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """SAM-Med2D warm start: instance masks from box / point prompts (BCE + Dice)."""
    images = [prepare_image(item.sample) for item in items]
    pixels = torch.cat([im.sam_pixels for im in images])
    with _grad_if(_any_trainable(model.sam.image_encoder)):
        embeddings = model.sam.encode_image(pixels)
    kinds = ["box", "point"] if stage.prompt == "box+point" else [stage.prompt]
    prompts: dict[str, list[np.ndarray]] = {kind: [] for kind in kinds}
    targets: list[torch.Tensor] = []  # per image, for each kind
    kept: list[int] = []  # images with instances
    for b, (item, image) in enumerate(zip(items, images, strict=True)):
        ids = np.unique(item.sample.labels)
        ids = ids[ids > 0]
        chosen = rng.choice(ids, size=min(stage.instances_per_image, len(ids)), replace=False)
        masks = [item.sample.labels == i for i in chosen]
        if not masks:  # an annotated image without instances: nothing to prompt
            continue
        kept.append(b)
        for kind in kinds:  # draws in image order, then prompt order (jitter, random clicks)
            prompts[kind].append(sam_prompts(image, masks, kind, rng, jitter=0.05))
        targets.append(torch.from_numpy(np.stack(masks)).float().to(embeddings.device))
    if not targets:
        zero = embeddings.sum() * 0.0
        return {"bce": zero, "dice": zero}
    embeddings, images = embeddings[kept], [images[b] for b in kept]
    logits = [decode_prompts(model, embeddings, images, prompts[kind], kind) for kind in kinds]
    bce, dice = mask_losses([m for per_kind in logits for m in per_kind], targets * len(kinds))
    return {"bce": bce, "dice": dice}
