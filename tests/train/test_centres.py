"""Targets and loss of the object counter: one exact peak per instance, inside it, on its noun's channel;
a counter stage trains only the counter and its loss falls."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from train_micro import MICRO_MODEL, micro_recipe, micro_stages

from napari_medplib.model.medplib import MedPLIBModel
from napari_medplib.train.centres import centre_focal_loss, centre_targets, instance_centres
from napari_medplib.train.data import Sample
from napari_medplib.train.recipe import RecipeError
from napari_medplib.train.synth import make_dataset
from napari_medplib.train.trainer import Trainer

NOUNS = ["cells", "lumens", "nuclei"]


def _sample(labels: np.ndarray, categories: dict[int, str]) -> Sample:
    return Sample(image=np.zeros(labels.shape, np.uint8), labels=labels, categories=categories, style="test")


def test_centres_are_centroids_of_the_filled_instances():
    labels = np.zeros((40, 60), np.int32)
    labels[5:25, 5:15] = 1
    labels[5:25, 15:25] = 2  # touches 1
    labels[5:35, 35:55] = 3
    labels[5:30, 40:50] = 0  # 3 is a U: its centroid lies in the gap
    labels[30:39, 2:11] = 4
    labels[33:36, 5:8] = 5  # 4 is a ring around 5: its centre is 5's
    ids, centres, radii = instance_centres(labels)
    assert ids == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(centres[:2], [[14.5, 9.5], [14.5, 19.5]])
    assert labels[tuple(centres[2].round().astype(int))] == 0 and 35 < centres[2][1] < 55
    np.testing.assert_allclose(centres[3], centres[4])
    assert radii[0] > radii[2]  # the 10-wide blocks are deeper than the U's 5-wide arms


def test_targets_have_one_exact_peak_per_instance_on_its_nouns_channel():
    labels = np.zeros((96, 192), np.int32)  # wide: the frame pads rows (336 x 168, 84 px above)
    labels[10:20, 10:20] = 1
    labels[60:70, 150:170] = 2
    labels[40:50, 100:110] = 3
    labels[80:90, 5:15] = 4
    heat = centre_targets([_sample(labels, {1: "nucleus", 2: "nucleus", 3: "cytoplasm", 4: "mitochondrion"})],
                          NOUNS)[0]
    assert heat.shape == (3, 84, 84)
    assert (heat == 1).sum(dim=(-2, -1)).tolist() == [1, 0, 2]  # cytoplasm counts as cells; no mitochondria channel
    assert float(heat.max()) == 1.0 and float(heat[1].max()) == 0.0
    # the first nucleus: centroid (14.5, 14.5) -> frame (15 * 1.75 + 84, 15 * 1.75) -> cell (27, 6)
    assert float(heat[2, 27, 6]) == 1.0


def test_synthetic_targets_count_every_instance():
    samples = list(make_dataset(4, seed=0, split="train", size=(96, 96), styles=("nuclei", "cells", "he")))
    heat = centre_targets(samples, NOUNS)
    for sample, maps in zip(samples, heat, strict=True):
        peaks = (maps == 1).sum(dim=(-2, -1))
        expected = {"cells": "cytoplasm", "lumens": "lumen", "nuclei": "nucleus"}
        for k, noun in enumerate(NOUNS):
            n = len(sample.instances_of(expected[noun]))
            assert int(peaks[k]) <= n and int(peaks[k]) >= n - 1  # two centres may share a 4-px cell, rarely


def test_focal_loss_prefers_the_target():
    target = torch.zeros(1, 1, 16, 16)
    target[0, 0, 5, 5] = 1.0
    target[0, 0, 4:7, 4:7] = torch.maximum(target[0, 0, 4:7, 4:7], torch.tensor(0.6))
    good = torch.full_like(target, -6.0)
    good[0, 0, 5, 5] = 6.0
    bad = torch.full_like(target, -6.0)
    bad[0, 0, 10, 10] = 6.0
    assert float(centre_focal_loss(good, target)) < 0.01 < float(centre_focal_loss(bad, target))
    assert float(centre_focal_loss(torch.zeros_like(target), target)) > float(centre_focal_loss(good, target))


def _counter_stages(steps: int) -> list[dict]:
    stages = micro_stages(steps)[:2]
    stages.append({"name": "counter", "kind": "counter", "init": "regions", "steps": steps, "batch_size": 2,
                   "lr": 3e-3, "warmup_steps": 0, "checkpoint_every": 4, "train": ["counter.*"],
                   "model": {"count_nouns": ["cells", "nuclei"]}, "loss": {"centre": 1.0}})
    return stages


def test_a_counter_stage_trains_the_counter_alone_and_its_loss_falls(tmp_path):
    trainer = Trainer(micro_recipe(stages=_counter_stages(24)), tmp_path, progress=False, log=lambda _: None)
    final = trainer.run()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    centre = [r["centre"] for r in records if r["stage"] == "counter"]
    assert len(centre) == 24
    assert np.mean(centre[-6:]) < 0.7 * np.mean(centre[:6])
    before = MedPLIBModel.from_pretrained(trainer.final_dir(trainer.recipe.stage("regions"))).state_dict()
    after = MedPLIBModel.from_pretrained(final)
    assert after.config.count_nouns == ["cells", "nuclei"]
    state = after.state_dict()
    for key, value in before.items():
        assert torch.equal(state[key], value), key  # nothing but the counter trained
    assert float(after.counter.image_count_embed.detach().abs().sum()) == 0  # no gradient reaches the tables here


def test_an_llm_stage_trains_the_count_tables_of_a_counting_model(tmp_path):
    """The counts stages: conversations through a model with a counter; the image and region count
    tables get gradients (every image token and each region token reads them), nothing else trains."""
    stages = _counter_stages(2)
    stages.append({"name": "counts", "tasks": ["region_vqa", "vqa"], "init": "counter", "steps": 6,
                   "batch_size": 1, "lr": 5e-2, "warmup_steps": 0, "checkpoint_every": 4,
                   "kinds": {"vqa": ["count"], "region_vqa": ["count"]},
                   "train": ["counter.image_count_embed", "counter.region_count_embed"]})
    trainer = Trainer(micro_recipe(stages=stages), tmp_path, progress=False, log=lambda _: None)
    final = trainer.run()
    before = MedPLIBModel.from_pretrained(trainer.final_dir(trainer.recipe.stage("counter"))).state_dict()
    after = MedPLIBModel.from_pretrained(final).state_dict()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed == {"counter.image_count_embed", "counter.region_count_embed"}


def test_a_counter_stage_needs_its_loss_and_parameters():
    stages = _counter_stages(1)
    stages[2]["train"] = ["language_model.*"]
    with pytest.raises(RecipeError, match="counter"):
        micro_recipe(stages=stages)
    assert "count_nouns" not in MICRO_MODEL
