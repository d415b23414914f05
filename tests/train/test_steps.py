"""Training-step losses: a <SEG> about a region trains SAM's box/point prompt path (seg_region_prompts)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from train_micro import micro_recipe

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
