"""Training-step losses: a <SEG> about a region trains SAM's box/point prompt path (seg_region_prompts)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from train_micro import micro_recipe, micro_stages

from napari_medplib.train import Conversation, RegionSpec
from napari_medplib.train.build import build_model
from napari_medplib.train.data import synthetic_items
from napari_medplib.train.recipe import LossWeights
from napari_medplib.train.steps import llm_losses, make_batch
from napari_medplib.train.stream import Item


def _item(region: RegionSpec) -> Item:
    sample, _ = next(synthetic_items(1, seed=2, size=(64, 64), styles=("nuclei",)))
    target = sample.labels == np.unique(sample.labels)[1]
    conv = Conversation("Please segment the nucleus in <region>.", "It is <SEG>.", "grounding", "instance",
                        [region], target_masks=[target])
    return Item(sample, [conv])


@pytest.mark.parametrize("flag", [True, False])
@pytest.mark.parametrize("region", [RegionSpec("box", box=(4, 6, 30, 40)), RegionSpec("point", point=(20, 20))])
def test_region_prompt_gets_gradient_only_when_the_model_uses_it(flag, region):
    recipe = micro_recipe()
    spec = dataclasses.replace(recipe.model, seg_region_prompts=flag)
    model = build_model(spec, recipe.resolve(spec.tokenizer), moe=False).train()
    losses = llm_losses(model, make_batch(model, [_item(region)]), LossWeights(ce=1.0, bce=1.0, dice=1.0))
    sum(losses.values()).backward()
    used = [2, 3] if region.kind == "box" else [1]  # SAM's box-corner / foreground-point embeddings
    grads = [model.sam.prompt_encoder.point_embed[i].weight.grad for i in used]
    if flag:
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
    else:
        assert all(g is None for g in grads)


def _point_and_box_item() -> Item:
    sample, _ = next(synthetic_items(1, seed=2, size=(64, 64), styles=("nuclei",)))
    convs = [Conversation("What is in <region>?", "nucleus", "region_vqa", "category",
                          [RegionSpec("point", point=(30, 20))], canonical="nucleus"),
             Conversation("How many nuclei are in <region>?", "2", "region_vqa", "count",
                          [RegionSpec("box", box=(4, 6, 30, 40))], canonical="2")]
    return Item(sample, convs)


@pytest.mark.parametrize("mode", ["square", "object"])
def test_object_models_train_on_sams_mask_of_the_clicked_object(mode, monkeypatch):
    """Training reads a point region as inference does (``point_region_mask``), the box untouched."""
    import torch

    recipe = micro_recipe()
    spec = dataclasses.replace(recipe.model, point_region_mask=mode)
    model = build_model(spec, recipe.resolve(spec.tokenizer), moe=False).train()
    asked = []

    def object_logits(image_embeddings, points_xy):  # the object: an 8x8 low-res patch at the click
        asked.append(points_xy.clone())
        out = torch.full((len(points_xy), 1, 64, 64), -10.0)
        for k, (x, y) in enumerate(points_xy.tolist()):
            out[k, 0, int(y / 4) - 4 : int(y / 4) + 4, int(x / 4) - 4 : int(x / 4) + 4] = 10.0
        return out

    monkeypatch.setattr(model, "point_object_logits", object_logits)
    seen = []
    original = model.encode_regions
    monkeypatch.setattr(model, "encode_regions", lambda f, masks, *rest, **kw: (seen.append(masks.clone()), original(f, masks, *rest, **kw))[1])
    batch = make_batch(model, [_point_and_box_item()])
    assert batch.region_points == [[(30.0, 20.0), None]] or batch.region_points == [[None, (30.0, 20.0)]]
    losses = llm_losses(model, batch, LossWeights(ce=1.0))
    assert torch.isfinite(losses["ce"])
    point_slot = batch.region_points[0].index((30.0, 20.0))
    given, built = seen[0], batch.region_masks[0]
    assert torch.equal(given[1 - point_slot], built[1 - point_slot])  # the box as built
    if mode == "square":
        assert asked == [] and torch.equal(given, built)
    else:
        # 32x32 SAM pixels = 8x8 image pixels of 64 = 42x42 on the 336 frame, vs the 41x41-pixel square
        # (clipped to the 64-px image: most of it)
        assert len(asked) == 1 and 1000 < int(given[point_slot].sum()) < 2500 < int(built[point_slot].sum())
        rows, cols = np.nonzero(given[point_slot].numpy())
        assert abs(rows.mean() - 30.5 * 336 / 64) < 8 and abs(cols.mean() - 20.5 * 336 / 64) < 8


def test_router_targets_follow_the_tasks_each_expert_was_trained_on():
    from napari_medplib.train.recipe import RecipeError, load_recipe

    shipped = load_recipe("tiny-cpu")
    assert shipped.router_targets(shipped.stage("moe")) == {"grounding": 0, "region_vqa": 1, "vqa": 1}
    stages = micro_stages()
    stages[-1]["experts"] = ["vl", "vl"]  # both experts know VQA, neither grounding
    recipe = micro_recipe(stages=stages)
    with pytest.raises(RecipeError, match=r"exactly one expert per task.*\['grounding', 'region_vqa', 'vqa'\]"):
        recipe.router_targets(recipe.stage("moe"))
    stages = micro_stages()
    stages[2]["loss"] = {"router": 1.0}  # a dense stage has no router
    with pytest.raises(RecipeError, match=r"loss\.router supervises the MoE router"):
        micro_recipe(stages=stages)


def test_router_loss_teaches_each_task_its_expert():
    """With only the router loss and only the router trained, grounding text goes to expert 0 and VQA
    text to expert 1 in every layer; image and region slots have no target."""
    import torch

    recipe = micro_recipe()
    model = build_model(recipe.model, recipe.resolve(recipe.model.tokenizer), moe=True).train()
    for name, p in model.named_parameters():
        p.requires_grad = ".router." in name
    sample, convs = next(synthetic_items(1, seed=3, size=(64, 64), styles=("nuclei",), n_per_task=1))
    batch = make_batch(model, [Item(sample, convs)])
    assert {"grounding", "vqa"} <= set(batch.token_tasks[0]) and len(batch.token_tasks[0]) == batch.input_ids.shape[1]
    targets = {"grounding": 0, "region_vqa": 1, "vqa": 1}
    routers = [p for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(routers, lr=0.05)
    weights = LossWeights(ce=0.0, bce=0.0, dice=0.0, router=1.0)
    first = None
    for _ in range(60):
        loss = llm_losses(model, batch, weights, targets)["router"]
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 0.5 and float(loss.detach()) < 0.3
    model.eval()
    with torch.no_grad():
        features = model.encode_image(batch.clip_pixels)
        regions = [model.encode_regions(features.patch_features[0], batch.region_masks[0])[0]] if len(batch.region_masks[0]) else None
        out = model(batch.input_ids, image_features=features, region_features=regions)
    ids, tasks, where = batch.input_ids[0], batch.token_tasks[0], out.position_map[0]
    for moe in model.language_model.moe_layers():
        chosen = moe.last_routing.expert_ids[:, 0]
        text = [i for i in range(len(tasks)) if ids[i] >= 0]
        right = [int(chosen[int(where[i])]) == targets[tasks[i]] for i in text]
        assert np.mean(right) > 0.9


def _sam_items(sizes):
    from napari_medplib.train.data import synthetic_items

    return [Item(next(synthetic_items(1, seed=3 + k, size=size, styles=("nuclei",)))[0], [])
            for k, size in enumerate(sizes)]


@pytest.mark.parametrize("sizes", [[(64, 64), (64, 64), (64, 64)], [(64, 64), (48, 80)]])
def test_batched_sam_prompt_losses_equal_one_decode_per_image(sizes):
    """sam_losses decodes every image's prompts in one call; per image (prompt_masks, the same draws)
    gives the same losses, also when the images differ in size (one upsampling per geometry)."""
    import torch

    from napari_medplib.train.batches import prepare_image
    from napari_medplib.train.losses import mask_losses
    from napari_medplib.train.recipe import StageSpec
    from napari_medplib.train.steps import decode_prompts, prompt_masks, sam_losses, sam_prompts

    recipe = micro_recipe()
    model = build_model(recipe.model, recipe.resolve(recipe.model.tokenizer), moe=False).train()
    items = _sam_items(sizes)
    stage = StageSpec("sam", kind="sam", train=["sam.*"], instances_per_image=3)
    batched = sam_losses(model, items, stage, np.random.default_rng(7))
    rng = np.random.default_rng(7)
    logits, targets = {"box": [], "point": []}, []
    with torch.no_grad():
        for item in items:
            image = prepare_image(item.sample)
            embedding = model.sam.encode_image(image.sam_pixels)
            ids = np.unique(item.sample.labels)[1:]
            masks = [item.sample.labels == i for i in rng.choice(ids, size=min(3, len(ids)), replace=False)]
            for kind in ("box", "point"):
                logits[kind].append(prompt_masks(model, embedding, image, masks, kind, rng, jitter=0.05))
            targets.append(torch.from_numpy(np.stack(masks)).float())
    bce, dice = mask_losses(logits["box"] + logits["point"], targets * 2)
    assert torch.allclose(batched["bce"], bce, atol=1e-5) and torch.allclose(batched["dice"], dice, atol=1e-5)
    # and mask by mask: each image's prompts met that image's embedding, not a neighbour's
    images = [prepare_image(item.sample) for item in items]
    with torch.no_grad():
        embeddings = model.sam.encode_image(torch.cat([im.sam_pixels for im in images]))
        prompts = [sam_prompts(im, [item.sample.labels == np.unique(item.sample.labels)[1]], "point")
                   for im, item in zip(images, items, strict=True)]
        together = decode_prompts(model, embeddings, images, prompts, "point")
        swapped = decode_prompts(model, embeddings.flip(0), images, prompts, "point")
        for b, image in enumerate(images):
            alone = decode_prompts(model, embeddings[b : b + 1], [image], prompts[b : b + 1], "point")[0]
            assert together[b].shape == (1, *image.original_hw)
            assert torch.allclose(together[b], alone, atol=1e-4)
        assert not torch.allclose(swapped[0], together[0], atol=1e-2)


def test_sam_losses_skip_images_without_instances():
    import torch

    from napari_medplib.train.recipe import StageSpec
    from napari_medplib.train.steps import sam_losses

    recipe = micro_recipe()
    model = build_model(recipe.model, recipe.resolve(recipe.model.tokenizer), moe=False).train()
    items = _sam_items([(64, 64), (64, 64)])
    items[0].sample.labels[:] = 0
    stage = StageSpec("sam", kind="sam", train=["sam.*"], instances_per_image=3)
    one = sam_losses(model, items, stage, np.random.default_rng(1))
    alone = sam_losses(model, items[1:], stage, np.random.default_rng(1))
    assert torch.allclose(one["dice"], alone["dice"], atol=1e-6)
    items[1].sample.labels[:] = 0
    none = sam_losses(model, items, stage, np.random.default_rng(1))
    assert float(none["dice"].detach()) == 0.0
    none["dice"].backward()  # a graph, so a step of empty images still runs


def test_llm_losses_decode_the_batch_in_one_call_as_image_by_image(monkeypatch):
    """<SEG> masks and clicked objects of a batch's images are decoded in one SAM call each; the losses
    and the region masks the LLM reads are those of decoding image by image."""
    import torch

    from napari_medplib.train import steps
    from napari_medplib.train.data import synthetic_items

    recipe = micro_recipe()
    spec = dataclasses.replace(recipe.model, point_region_mask="object", seg_region_prompts=True)
    model = build_model(spec, recipe.resolve(spec.tokenizer), moe=False).eval()
    items = [Item(sample, convs) for sample, convs in synthetic_items(3, seed=5, size=(64, 64), n_per_task=3)]
    batch = make_batch(model, items)
    assert batch.n_seg >= 3 and sum(p is not None for ps in batch.region_points for p in ps) >= 2
    calls = {"seg": 0, "objects": 0}
    decode_seg, object_logits = model.decode_seg, model.point_object_logits

    def count(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(model, "decode_seg", count("seg", decode_seg))
    monkeypatch.setattr(model, "point_object_logits", count("objects", object_logits))
    seen = []
    encode = model.encode_regions
    monkeypatch.setattr(model, "encode_regions", lambda f, masks, *rest, **kw: (seen.append(masks.clone()), encode(f, masks, *rest, **kw))[1])
    weights = LossWeights(ce=1.0, bce=1.0, dice=1.0, iou=1.0)
    torch.manual_seed(0)
    together = llm_losses(model, batch, weights)
    assert calls == {"seg": 1, "objects": 1}
    monkeypatch.setattr(steps, "_one_geometry", lambda images: False)
    regions_together, seen[:] = list(seen), []
    torch.manual_seed(0)
    alone = llm_losses(model, batch, weights)
    assert calls["seg"] == 1 + sum(1 for t in batch.target_masks if t) and calls["objects"] > 2
    for name in ("bce", "dice", "iou", "ce"):
        assert torch.allclose(together[name], alone[name], atol=1e-5), name
    assert all(torch.equal(a, b) for a, b in zip(regions_together, seen, strict=True))


@pytest.mark.parametrize("version", [2, 3])
def test_version_3_models_train_on_sams_object_of_each_box_and_the_frames_brightness(version, monkeypatch):
    """Training gives the region encoder what the engine gives it: a box region's object (SAM's box mask,
    kept inside the box; one decode for the batch) and the CLIP frame's brightness."""
    import torch


    recipe = micro_recipe()
    spec = dataclasses.replace(recipe.model, region_geometry=True, geometry_version=version, point_region_mask="object")
    model = build_model(spec, recipe.resolve(spec.tokenizer), moe=False).train()
    asked = []

    def box_logits(image_embeddings, boxes_xyxy):  # the object: a low-res band through the box, wider than it
        asked.append(boxes_xyxy.clone())
        out = torch.full((len(boxes_xyxy), 1, 64, 64), -10.0)
        for k, (_x0, y0, _x1, y1) in enumerate(boxes_xyxy.tolist()):
            out[k, 0, int((y0 + y1) / 8) - 2 : int((y0 + y1) / 8) + 2, :] = 10.0
        return out

    monkeypatch.setattr(model, "box_object_logits", box_logits)
    seen = []
    encode = model.encode_regions
    monkeypatch.setattr(model, "encode_regions", lambda f, masks, *rest, **kw: (seen.append((masks.clone(), *rest)), encode(f, masks, *rest, **kw))[1])
    batch = make_batch(model, [_point_and_box_item(), _point_and_box_item()])
    assert [[b is not None for b in boxes] for boxes in batch.region_boxes] == [[p is None for p in ps] for ps in batch.region_points]
    losses = llm_losses(model, batch, LossWeights(ce=1.0))
    assert torch.isfinite(losses["ce"])
    if version == 2:
        assert asked == [] and all(objects is None and brightness is None for _, _, objects, brightness in seen)
        return
    assert len(asked) == 1 and asked[0].shape == (2, 4)  # both images' boxes in one decode
    for b, (masks, _, objects, brightness) in enumerate(seen):
        box_slot = batch.region_points[b].index(None)
        box, obj = masks[box_slot] > 0, objects[box_slot] > 0
        assert obj.any() and not (obj & ~box).any() and obj.sum() < box.sum()  # cut at the box
        assert not objects[1 - box_slot].any()  # the clicked object is the region itself
        assert brightness.shape == (336, 336) and not torch.isnan(brightness).any()  # a square image: no padding
        torch.testing.assert_close(brightness, batch.images[b].brightness)
