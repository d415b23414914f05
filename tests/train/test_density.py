"""The auxiliary density target: its maps count the objects where they are, its loss trains a head
and the vision tower, and a stage with it resumes to the same weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from train_micro import micro_recipe, micro_stages

from napari_medplib.model.medplib import MedPLIBModel
from napari_medplib.train.data import Sample
from napari_medplib.train.density import DensityHead, density_categories, density_loss, density_maps
from napari_medplib.train.recipe import RecipeError
from napari_medplib.train.synth import make_dataset
from napari_medplib.train.trainer import Interrupted, Trainer


def _sample(labels: np.ndarray, categories: dict[int, str]) -> Sample:
    return Sample(image=np.zeros(labels.shape, np.uint8), labels=labels, categories=categories, style="test")


def test_maps_sum_to_each_category_count_and_sit_at_the_centroids():
    labels = np.zeros((96, 192), np.int32)  # wide: the CLIP frame pads rows (336 x 168, 84 px above)
    labels[10:20, 10:20] = 1  # pixel centres 10.5..19.5: centroid (15, 15) -> x1.75, +84 -> (110.25, 26.25)
    labels[60:70, 150:170] = 2
    labels[40:50, 100:110] = 3
    cats = ("cell", "nucleus")
    maps = density_maps([_sample(labels, {1: "nucleus", 2: "nucleus", 3: "cell"})], cats, sigma=0)[0]
    assert maps.shape == (2, 24, 24)
    assert float(maps[1].sum()) == 2 and float(maps[0].sum()) == 1
    assert float(maps[1, 7, 1]) == 1  # the first nucleus's patch (14-px patches)
    assert float(maps[0, 11, 13]) == 1  # the cell: (45, 105) -> (162.75, 183.75)
    blurred = density_maps([_sample(labels, {1: "nucleus", 2: "nucleus", 3: "cell"})], cats)[0]
    assert torch.allclose(blurred.sum(dim=(1, 2)), torch.tensor([1.0, 2.0]))  # the edge reflects mass back
    assert float(blurred[1, 7, 1]) < 1 and float(blurred[1, 7, 2]) > 0


def test_synthetic_maps_count_every_instance():
    cats = density_categories()
    samples = list(make_dataset(3, seed=0, split="train", size=(64, 64), styles=("nuclei", "cells")))
    maps = density_maps(samples, cats)
    for sample, sample_maps in zip(samples, maps, strict=True):
        for cat in set(sample.categories.values()):
            assert float(sample_maps[cats.index(cat)].sum()) == pytest.approx(len(sample.instances_of(cat)), abs=1e-4)


def test_head_and_loss():
    head = DensityHead(8, ("a", "b"))
    features = torch.randn(2, 576, 8)
    out = head(features)
    assert out.shape == (2, 2, 24, 24) and float(out.detach().abs().sum()) == 0  # starts at zero: no count at all
    target = torch.zeros(2, 2, 24, 24)
    target[0, 1, 3, 4] = 1.0
    assert float(density_loss(out, target)) == pytest.approx((1 + 1 / 10) / 4)
    assert float(density_loss(target, target)) == 0


def test_the_loss_teaches_a_head_to_count_from_features_that_show_the_objects():
    """One fixed batch: features that mark each patch's object centres; a few steps fit the counts."""
    torch.manual_seed(0)
    target = density_maps(list(make_dataset(4, seed=1, split="train", size=(64, 64), styles=("nuclei",))),
                          ("nucleus",))
    features = torch.cat([target.flatten(2).transpose(1, 2), torch.randn(4, 576, 7)], dim=-1)  # [4, 576, 8]
    head = DensityHead(8, ("nucleus",))
    optimizer = torch.optim.Adam(head.parameters(), lr=0.02)
    losses = []
    for _ in range(300):
        loss = density_loss(head(features), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.05 * losses[0]
    counts = head(features).sum(dim=(-2, -1)).round()
    assert torch.equal(counts, target.sum(dim=(-2, -1)).round())


def _density_stages(steps: int) -> list[dict]:
    stages = micro_stages(steps)[:3]
    stages[2]["train"] = [*stages[2]["train"], "vision_tower.*"]
    stages[2]["loss"] = {"ce": 1.0, "density": 1.0}
    return stages


def test_a_density_stage_trains_the_vision_tower_and_resumes(tmp_path):
    stages = _density_stages(4)
    trainer = Trainer(micro_recipe(stages=stages), tmp_path / "a", progress=False, log=lambda _: None)
    final = trainer.run()
    records = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    density = [r["density"] for r in records if r["stage"] == "vl"]
    assert len(density) == 4 and all(value > 0 for value in density)
    before = MedPLIBModel.from_pretrained(trainer.final_dir(trainer.recipe.stage("regions"))).state_dict()
    after = MedPLIBModel.from_pretrained(final).state_dict()
    patches = "vision_tower.clip.embeddings.patch_embedding.weight"  # (the micro tower's one layer is not read)
    assert not torch.equal(before[patches], after[patches])
    assert not any("density" in key for key in after)  # training only: the checkpoint is the model's

    interrupted = Trainer(micro_recipe(stages=stages), tmp_path / "b", progress=False, log=lambda _: None)
    with pytest.raises(Interrupted):
        interrupted.run(stop_after_steps=4 + 4 + 3)  # sam, regions, then vl stopped after 3 steps
    assert "density_head" in torch.load(tmp_path / "b" / "stages" / "vl" / "resume.pt", weights_only=True)
    resumed = Trainer(micro_recipe(stages=stages), tmp_path / "b", progress=False, log=lambda _: None).run()
    ours, theirs = MedPLIBModel.from_pretrained(resumed).state_dict(), after
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], atol=1e-6), key


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s.__setitem__("train", ["language_model.*"]), "vision_tower"),
    (lambda s: s.__setitem__("kind", "sam"), "kind = \"llm\" or \"vision\""),
])
def test_density_needs_an_llm_stage_that_trains_the_vision_tower(change, message):
    stages = _density_stages(1)
    change(stages[2])
    with pytest.raises(RecipeError, match=message):
        micro_recipe(stages=stages)


# ----------------------------------------------------------------------------- vision stages
WIDE_TOWER = {"clip_hidden_size": 24, "clip_intermediate_size": 48, "clip_layers": 2}
NEW_TOWER = ["vision_tower.*", "mm_projector.*", "region_encoder.adapter.*"]


def _tower_stages(steps: int) -> list[dict]:
    """sam, regions, vl; then a wider vision tower trained on density alone, and vl continued on it."""
    common = {"steps": steps, "batch_size": 2, "warmup_steps": 0, "checkpoint_every": 2}
    stages = micro_stages(steps)[:3]
    stages.append({"name": "tower", "kind": "vision", "lr": 3e-3, "model": dict(WIDE_TOWER),
                   "train": ["vision_tower.*"], "loss": {"density": 1.0}, **common})
    stages.append({"name": "vl2", "tasks": ["region_vqa", "vqa"], "lr": 3e-3, "init": "vl", "model": dict(WIDE_TOWER),
                   "reinit": list(NEW_TOWER), "copy": {"tower": ["vision_tower.*"]},
                   "train": ["mm_projector.*", "region_encoder.*"], **common})
    stages.append({"name": "vl3", "tasks": ["vqa"], "lr": 3e-3, "init": "vl2", "train": ["mm_projector.*"], **common})
    return stages


def test_a_vision_stage_trains_a_wider_tower_that_later_stages_take_in_place_of_the_old(tmp_path):
    recipe = micro_recipe(stages=_tower_stages(3))
    assert recipe.stage_model(recipe.stage("vl")).clip_hidden_size == 16
    assert recipe.stage_model(recipe.stage("vl3")).clip_hidden_size == 24  # inherited from its init, vl2
    trainer = Trainer(recipe, tmp_path / "run", progress=False, log=lambda _: None)
    trainer.run()
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    tower_losses = [r for r in records if r["stage"] == "tower"]
    assert len(tower_losses) == 3 and set(tower_losses[0]) >= {"density", "loss"} and "ce" not in tower_losses[0]

    def state(name: str) -> dict[str, torch.Tensor]:
        return MedPLIBModel.from_pretrained(trainer.final_dir(recipe.stage(name))).state_dict()

    vl, tower, vl2, vl3 = state("vl"), state("tower"), state("vl2"), state("vl3")
    patches = "vision_tower.clip.embeddings.patch_embedding.weight"
    assert vl[patches].shape[0] == 16 and tower[patches].shape[0] == 24
    assert all(torch.equal(vl2[k], tower[k]) for k in tower if k.startswith("vision_tower."))  # copied, frozen
    assert vl2["mm_projector.0.weight"].shape == (32, 24) and vl3["mm_projector.0.weight"].shape == (32, 24)
    assert all(torch.equal(vl2[k], vl[k]) for k in vl if k.startswith("language_model."))  # the rest from init
    config = json.loads((trainer.final_dir(recipe.stage("vl3")) / "config.json").read_text())
    assert config["mm_hidden_size"] == 24 and config["vision_config"]["num_hidden_layers"] == 2


def test_vision_losses_fall_on_a_fixed_batch():
    """The vision stage's step alone: a few optimizer steps on one batch lower its density loss."""
    from napari_medplib.train.build import build_model
    from napari_medplib.train.steps import vision_losses
    from napari_medplib.train.stream import Item

    recipe = micro_recipe(stages=_tower_stages(1))
    model = build_model(recipe.stage_model(recipe.stage("tower")), recipe.model.tokenizer, moe=False)
    params = list(model.vision_tower.parameters())
    items = [Item(s, []) for s in make_dataset(2, seed=0, split="train", size=(64, 64), styles=("nuclei",))]
    head = DensityHead(24, density_categories())
    targets = density_maps([item.sample for item in items], head.categories)
    optimizer = torch.optim.Adam([*params, *head.parameters()], lr=3e-4)
    losses = []
    for _ in range(30):
        loss = vision_losses(model, items, head, targets)["density"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


def test_a_vision_stage_resumes_to_the_same_weights(tmp_path):
    stages = [s for s in _tower_stages(4) if s["name"] == "tower"]
    done = Trainer(micro_recipe(stages=stages), tmp_path / "a", progress=False, log=lambda _: None).run()
    interrupted = Trainer(micro_recipe(stages=stages), tmp_path / "b", progress=False, log=lambda _: None)
    with pytest.raises(Interrupted):
        interrupted.run(stop_after_steps=3)
    resumed = Trainer(micro_recipe(stages=stages), tmp_path / "b", progress=False, log=lambda _: None).run()
    ours, theirs = MedPLIBModel.from_pretrained(resumed).state_dict(), MedPLIBModel.from_pretrained(done).state_dict()
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], atol=1e-6), key


def test_a_resized_part_that_is_not_reinitialised_is_named(tmp_path):
    stages = _tower_stages(1)
    stages[4]["reinit"] = ["vision_tower.*"]  # the projector and region adapter still come from vl (16 wide)
    trainer = Trainer(micro_recipe(stages=stages), tmp_path, progress=False, log=lambda _: None)
    with pytest.raises(RecipeError, match=r"mm_projector\.0\.weight: shape \(32, 16\).*reinit"):
        trainer.run()


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s.__setitem__("loss", {"ce": 1.0}), "loss.density > 0"),
    (lambda s: s.__setitem__("moe", True), "moe = false"),
    (lambda s: s.__setitem__("model", {"clip_width": 8}), "clip_width"),
    (lambda s: s.__setitem__("model", {"tokenizer": "x"}), "tokenizer"),
    (lambda s: s.__setitem__("reinit", ["mm_projector.*"]), "starts from scratch"),
])
def test_vision_stage_and_model_change_errors(change, message):
    stages = _tower_stages(1)
    change(stages[3])
    with pytest.raises(RecipeError, match=message):
        micro_recipe(stages=stages)
