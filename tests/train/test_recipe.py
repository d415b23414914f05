"""Recipe files: the shipped ones parse, mistakes are clear errors naming the key."""

from __future__ import annotations

import dataclasses

import pytest
from train_micro import micro_recipe, micro_stages

from napari_medplib.engine.scale import PROMPT_OBJECT_EXTENT
from napari_medplib.train.recipe import (
    RECIPES_DIR,
    RecipeError,
    find_recipe,
    load_recipe,
    parse_recipe,
)


@pytest.mark.parametrize("name", ["tiny-cpu", "gpu"])
def test_shipped_recipes_parse_with_the_paper_stages(name):
    recipe = load_recipe(name)
    kinds = [(s.name, s.kind, s.moe) for s in recipe.stages]
    assert ("vl", "llm", False) in kinds and ("grounding", "llm", False) in kinds and ("moe", "llm", True) in kinds
    moe = recipe.stage("moe")
    # expert 0 grounding, expert 1 VL (reference); the rest from stage III, whose embeddings and LM head
    # were trained with the grounding expert (from stage II's, the MoE lost two-structure grounding)
    assert moe.experts[0] == "grounding" and moe.experts[1].startswith("vl") and moe.init == "grounding"
    dense = recipe.stage("dense")
    assert not dense.moe and dense.init == moe.init and dense.steps == moe.steps and dense.tasks == moe.tasks
    assert recipe.final_stage.name == "moe"
    assert (recipe.resolve(recipe.model.tokenizer) / "tokenizer.model").is_file()
    assert recipe.path == RECIPES_DIR / f"{name}.toml"


def test_gpu_recipe_pretrains_a_counting_vision_tower_first():
    recipe = load_recipe("gpu")
    tower, regions = recipe.stage("tower"), recipe.stage("regions")
    assert tower.kind == "vision" and tower.loss.density > 0 and tower.train == ["vision_tower.*"]
    assert regions.copy["tower"] == ["vision_tower.*"] and regions.loss.density > 0
    assert recipe.stage_model(recipe.final_stage).clip_layers == recipe.model.clip_layers


def test_recipe_by_path_and_unknown_name(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[[stages]]\nname = "a"\nkind = "sam"\ntrain = ["sam.*"]\n')
    assert find_recipe(path) == path
    assert load_recipe(path).stages[0].name == "a"
    with pytest.raises(RecipeError, match=r"not found.*tiny-cpu"):
        find_recipe("no-such-recipe")


def test_unknown_keys_are_named():
    stages = micro_stages()
    stages[0]["lerning_rate"] = 1.0
    with pytest.raises(RecipeError, match="lerning_rate"):
        micro_recipe(stages=stages)
    with pytest.raises(RecipeError, match=r"unknown key.*hidden"):
        parse_recipe({"model": {"hidden": 3}, "stages": micro_stages()})
    with pytest.raises(RecipeError, match=r"top-level.*epochs"):
        parse_recipe({"epochs": 3, "stages": micro_stages()})


def test_stage_references_must_be_earlier_stages():
    stages = micro_stages()
    stages[2]["init"] = "moe"  # later stage
    with pytest.raises(RecipeError, match="'vl' refers to 'moe'"):
        micro_recipe(stages=stages)
    stages = micro_stages()
    stages[4]["moe"] = False
    with pytest.raises(RecipeError, match="experts but has moe = false"):
        micro_recipe(stages=stages)


def test_a_continued_moe_stage_routes_as_the_stage_it_continues():
    stages = micro_stages()
    moe = stages[4]
    moe["loss"] = {**moe["loss"], "router": 0.1}
    more = {**moe, "name": "moe_more", "init": "moe", "experts": [], "copy": {}}
    again = {**more, "name": "moe_again", "init": "moe_more"}
    recipe = micro_recipe(stages=[*stages, more, again])
    expected = {"grounding": 0, "region_vqa": 1, "vqa": 1}
    assert recipe.router_targets(recipe.stage("moe")) == expected
    assert recipe.router_targets(recipe.stage("moe_more")) == expected
    assert recipe.router_targets(recipe.stage("moe_again")) == expected
    # a MoE stage from a dense stage has no routing to learn from
    lone = {**more, "name": "lone", "init": "vl"}
    with pytest.raises(RecipeError, match=r"'lone': loss\.router needs experts"):
        micro_recipe(stages=[*stages, lone])
    with pytest.raises(RecipeError, match="needs moe = true"):
        micro_recipe(stages=[*stages, {**lone, "moe": False}])


@pytest.mark.parametrize(("key", "value", "message"), [
    ("kind", "rl", "kind must be"), ("tasks", ["chat"], "unknown task"), ("train", [], "lists no parameters"),
    ("lr", 0.0, "lr > 0"), ("prompt", "mask", "prompt must be"), ("threads", -1, "must be 0 or more"),
    ("data_workers", -2, "must be 0 or more"), ("augment", "strong", r"augment must be '' or 'realistic'.*strong"),
    ("augment_extent", 48.0, "augment_extent needs augment = 'realistic'"),
    ("empty_frames", 1.0, r"empty_frames must be in \[0, 1\)"),
    ("empty_frames", 0.2, "empty_frames applies to llm stages with the grounding task"),
])
def test_bad_stage_values(key, value, message):
    stages = micro_stages()
    stages[0][key] = value
    with pytest.raises(RecipeError, match=message):
        micro_recipe(stages=stages)


def test_invalid_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[[stages]\n")
    with pytest.raises(RecipeError, match=r"broken\.toml is not valid TOML"):
        load_recipe(path)


def test_final_stage_must_exist():
    with pytest.raises(RecipeError, match="no stage 'best'"):
        parse_recipe({"final": "best", "stages": micro_stages()})


def test_data_workers_must_not_be_negative():
    with pytest.raises(RecipeError, match="data_workers must be 0"):
        micro_recipe(data_workers=-1)
    assert micro_recipe(data_workers=2).data_workers == 2


def test_point_region_mask_must_be_known():
    model = {**micro_recipe().model.__dict__, "point_region_mask": "blob"}
    with pytest.raises(RecipeError, match=r"model\.point_region_mask must be one of"):
        parse_recipe({"model": model, "stages": micro_stages()})


#: tiny-gpu's SAM + stage IV rounds on six styles (sam6/moe6 ...), each from the one before.
ROUNDS = list(range(6, 16))


def test_tiny_gpu_continues_tiny_cpu_and_says_where_each_stage_ran():
    """tiny-gpu = tiny-cpu's stages up to sam4 (same settings, same positions, so the same data), two
    stages on a GPU, then stages III/IV with tiny-cpu's settings on the GPU stages' results, then
    stage III continued and a longer stage IV with its dense pair, then both continued, then SAM +
    stage IV rounds on six styles (the last round's stage IV bundled)."""
    cpu, gpu = load_recipe("tiny-cpu"), load_recipe("tiny-gpu")
    assert gpu.model == cpu.model and gpu.data == cpu.data and gpu.seed == cpu.seed
    shared = [s.name for s in cpu.stages][: [s.name for s in cpu.stages].index("sam4") + 1]
    assert [s.name for s in gpu.stages[: len(shared)]] == shared
    for a, b in zip(cpu.stages, gpu.stages[: len(shared)], strict=False):
        assert a == b and gpu.stage_device(b) == "cpu"
    assert {s.name: gpu.stage_device(s) for s in gpu.stages[len(shared):]} == {
        "sam5": "cuda", "vl3": "cuda", "grounding2": "cpu", "moe2": "cpu", "dense2": "cpu", "grounding3": "cpu",
        "moe3": "cpu", "dense3": "cpu", "moe4": "cpu", "moe5": "cpu", "dense4": "cpu", "sam6": "cpu", "moe6": "cpu",
        **{f"{kind}{k}": "cpu" for k in ROUNDS for kind in ("sam", "moe")}, "vqa13": "cpu", "count13": "cpu",
        "moe16": "cpu", "regions16": "cpu", "regions17": "cpu", "regions18": "cpu",
        "regions19": "cpu", "counter22": "cpu", "counter23": "cpu",
        **{f"counts{k}": "cpu" for k in range(22, 27)}, "counter24": "cpu", "sam27": "cpu", "ground27": "cpu",
        "sam28": "cpu", "ground28": "cpu", "ground29": "cpu"}
    assert gpu.stage("sam5").copy == {"sam4": ["sam.*"]} and gpu.stage("vl3").init == "vl2"
    g2, m2 = gpu.stage("grounding2"), gpu.stage("moe2")
    assert g2.init == "vl3" and g2.copy == {"sam5": ["sam.*"]}
    assert m2.init == "grounding2" and m2.experts == ["grounding2", "vl3"]
    for ours, theirs in ((g2, cpu.stage("grounding")), (m2, cpu.stage("moe")), (gpu.stage("dense2"), cpu.stage("dense"))):
        for field in ("steps", "batch_size", "lr", "warmup_steps", "train", "tasks", "loss", "moe", "point_region_mask"):
            assert getattr(ours, field) == getattr(theirs, field), (ours.name, field)
    g3, m3, d3 = gpu.stage("grounding3"), gpu.stage("moe3"), gpu.stage("dense3")
    assert g3.init == "grounding2" and g3.train == g2.train and g3.loss == g2.loss and g3.copy == {}
    assert m3.init == d3.init == "grounding3" and m3.experts == ["grounding3", "vl3"]
    for ours, theirs in ((m3, m2), (d3, gpu.stage("dense2"))):  # the same stage IV, 3000 steps instead of 2000
        assert dataclasses.replace(ours, name=theirs.name, steps=theirs.steps, init=theirs.init,
                                   experts=theirs.experts, copy=theirs.copy) == theirs
        assert ours.steps == 3000
    assert m3.copy == {"grounding3": ["text_hidden_fcs.*", "sam.*"]}
    routes = {"grounding": 0, "region_vqa": 1, "vqa": 1}
    assert gpu.router_targets(m3) == routes
    # stage IV continued: the same stage on its own result, new data (later positions), lower lr
    for name, init in (("moe4", "moe3"), ("moe5", "moe4")):
        more = gpu.stage(name)
        assert more.init == init and more.experts == [] and more.copy == {} and more.lr == 2e-4
        assert dataclasses.replace(more, name="moe3", init="grounding3", experts=m3.experts, copy=m3.copy,
                                   lr=m3.lr) == m3
        assert gpu.router_targets(more) == routes
    # the bacteria style: only the last stages see it; SAM from the last stage IV's, then stage IV on it
    rounds = [f"{kind}{k}" for k in ROUNDS for kind in ("sam", "moe")]
    assert [s.name for s in gpu.stages if s.styles and s.name in rounds] == rounds
    for k, before in zip(ROUNDS, ["moe4"] + [f"moe{k}" for k in ROUNDS[:-1]], strict=True):
        sam, moe = gpu.stage(f"sam{k}"), gpu.stage(f"moe{k}")
        assert "bacteria" in sam.styles and set(sam.styles) == set(moe.styles) and sam.copy == {before: ["sam.*"]}
        assert dataclasses.replace(moe, name="moe4", init="moe3", copy={}, styles=[]) == gpu.stage("moe4")
        assert moe.init == before and moe.copy == {sam.name: ["sam.*"]} and gpu.router_targets(moe) == routes
        assert dataclasses.replace(sam, name="sam6", copy={"moe4": ["sam.*"]}) == gpu.stage("sam6")
    # two experiments on moe12 (not bundled): questions the floors miss asked more often, then the same
    # with the vision tower's density target; SAM untouched, two grounding questions per image kept
    vqa, count = gpu.stage("vqa13"), gpu.stage("count13")
    assert vqa.init == count.init == "moe12" and vqa.copy == {} and not any(p.startswith("sam") for p in vqa.train)
    assert vqa.kinds["vqa"].count("count") == 3 and vqa.n_per_task == {"grounding": 2} and "vision_tower.*" in vqa.train
    assert dataclasses.replace(count, name="vqa13", loss=vqa.loss) == vqa
    assert count.loss.density > 0 and vqa.loss.density == 0
    # version-3 region geometry on the last round's stage IV, then the region encoder alone on region questions
    last = gpu.stage(f"moe{ROUNDS[-1]}")
    v3, regions = gpu.stage("moe16"), gpu.stage("regions16")
    assert v3.init == last.name and v3.model == {"geometry_version": 3}
    assert dataclasses.replace(v3, name=last.name, init=last.init, copy=last.copy, model={}) == last
    assert regions.init == "moe16" and regions.train == ["region_encoder.*"] and regions.tasks == ["region_vqa"]
    for name, init in (("regions17", "regions16"), ("regions18", "regions17"), ("regions19", "regions18")):
        more = gpu.stage(name)
        assert more.init == init and dataclasses.replace(more, name="regions16", init="moe16", steps=2000,
                                                         lr=1e-3) == regions
    d4 = gpu.stage("dense4")
    assert d4.init == "dense3" and dataclasses.replace(d4, name="dense3", init="grounding3", lr=d3.lr) == d3
    # the object counter under regions18 (the LLM frozen), then its count tables and the LLM in turn
    c22, c23 = gpu.stage("counter22"), gpu.stage("counter23")
    assert c22.kind == c23.kind == "counter" and c22.init == "regions18" and c23.init == "counter22"
    assert c22.moe and c22.point_region_mask == "object" and c22.model["count_nouns"] == [
        "bacteria", "cells", "lumens", "mitochondria", "nuclei"]
    assert c22.train == c23.train == ["counter.*"] and c22.loss.centre > 0 and c23.model == {}
    tables = ["counter.image_count_embed", "counter.region_count_embed"]
    for name, init, llm in (("counts22", "counter23", False), ("counts23", "counts22", True),
                            ("counts24", "counts23", False), ("counts25", "counts24", True),
                            ("counts26", "counts25", False)):
        stage = gpu.stage(name)
        assert stage.init == init and stage.moe and stage.kinds["vqa"].count("count") == 3
        assert not any(p.startswith(("sam", "vision_tower", "counter.stem", "counter.head")) for p in stage.train)
        assert stage.train[-2:] == tables and (len(stage.train) > 2) == llm
        assert stage.lr == (2e-4 if llm else 2e-2)
    c24 = gpu.stage("counter24")  # the counter continued under the final LLM (not bundled)
    assert c24.init == "counts26" and dataclasses.replace(c24, name="counter23", init="counter22", lr=1e-3) == c23
    # SAM on samples cut at the engine's object scale (augment.realistic) with the two EM styles, from
    # counts26's SAM; then the grounding path refitted to it on the six earlier styles
    sam27, ground27 = gpu.stage("sam27"), gpu.stage("ground27")
    assert sam27.kind == "sam" and sam27.augment == "realistic" and sam27.copy == {"counts26": ["sam.*"]}
    assert sam27.train == ["sam.*"] and {"em_neurites", "em_axons"} < set(sam27.styles)
    assert set(sam27.styles) - {"em_neurites", "em_axons"} == set(ground27.styles)
    assert ground27.init == "counts26" and ground27.copy == {"sam27": ["sam.*"]} and ground27.augment == ""
    assert ground27.tasks == ["grounding"]
    assert not any(p.startswith(("language_model", "sam.image")) for p in ground27.train)
    assert sam27.augment_extent == 0  # cut at the synthetic frames' own object extent
    # sam27 continued on objects cut to the engine's prompt extent at a lower learning rate, otherwise the
    # same stage; then ground27 redone on it (neither bundled)
    sam28, ground28 = gpu.stage("sam28"), gpu.stage("ground28")
    assert sam28.augment == "realistic" and sam28.augment_extent == PROMPT_OBJECT_EXTENT
    assert sam28.copy == {"sam27": ["sam.*"]} and sam28.lr < sam27.lr
    assert dataclasses.replace(sam28, name="sam27", copy=sam27.copy, lr=sam27.lr, augment_extent=0.0) == sam27
    assert ground28.init == "counts26" and ground28.copy == {"sam28": ["sam.*"]} and ground28.augment == ""
    assert dataclasses.replace(ground28, name="ground27", copy=ground27.copy) == ground27
    # ground28 continued with a fifth of its frames emptied: the bundled model
    ground29 = gpu.stage("ground29")
    assert ground29.init == "ground28" and ground29.empty_frames == 0.2 and ground29.tasks == ["grounding"]
    assert ground29.train == ground28.train and gpu.final_stage is ground29
    assert [s.name for s in gpu.stages if s.empty_frames] == ["ground29"]
    assert [s.name for s in gpu.stages][-5:] == ["sam27", "ground27", "sam28", "ground28", "ground29"]
    assert [s.name for s in gpu.stages if s.augment] == ["sam27", "sam28"]
    assert [s.name for s in gpu.stages if s.augment_extent] == ["sam28"]


def test_a_stage_can_add_a_synthetic_style_without_changing_the_others():
    """``styles`` per stage: the stage's data is drawn from its styles, every other stage's from [data]'s;
    an unknown style is an error naming it."""
    from napari_medplib.train.stream import StageStream

    stages = micro_stages()
    stages[0]["styles"] = ["bacteria"]
    recipe = micro_recipe(stages=stages)
    assert recipe.stage_styles(recipe.stages[0]) == ("bacteria",)
    assert recipe.stage_styles(recipe.stages[1]) == tuple(recipe.data.styles)
    assert {item.sample.style for item in StageStream(recipe, recipe.stages[0], 0).batch(0)} == {"bacteria"}
    assert "bacteria" not in {item.sample.style for step in range(3)
                              for item in StageStream(recipe, recipe.stages[1], 1).batch(step)}
    stages[1]["styles"] = ["bacterias"]
    with pytest.raises(RecipeError, match=r"stage 'regions'.*unknown style.*bacterias"):
        micro_recipe(stages=stages)


def test_a_stage_can_ask_some_question_kinds_more_often(tmp_path):
    """``kinds`` and ``n_per_task`` per stage reshape that stage's synthetic conversations only; a kind
    or task that does not exist is an error naming it."""
    from collections import Counter

    from napari_medplib.train.stream import StageStream

    stages = micro_stages()
    stages[2]["kinds"] = {"vqa": ["count"]}
    stages[2]["n_per_task"] = {"region_vqa": 1, "vqa": 2}
    recipe = micro_recipe(stages=stages)
    assert recipe.stage_n_per_task(recipe.stages[2]) == {"grounding": recipe.data.n_per_task, "region_vqa": 1,
                                                          "vqa": 2}
    assert recipe.stage_n_per_task(recipe.stages[1]) == recipe.data.n_per_task

    def kinds(index: int) -> Counter:
        stream = StageStream(recipe, recipe.stages[index], index)
        return Counter(c.kind for step in range(6) for item in stream.batch(step)
                       for c in item.conversations if c.task == "vqa")

    focused, default = kinds(2), kinds(4)
    # count first whenever an image has a countable category (fallbacks only where it has none)
    assert focused["count"] > 0.7 * sum(focused.values())
    assert default["count"] < 0.5 * sum(default.values()) and len(default) >= 3
    for key, value, message in (("kinds", {"vqa": ["colour"]}, r"kinds\.vqa.*colour"),
                                ("kinds", {"chat": ["count"]}, "unknown task 'chat'"),
                                ("n_per_task", {"vqa": -1}, r"n_per_task\.vqa")):
        bad = micro_stages()
        bad[2][key] = value
        with pytest.raises(RecipeError, match=message):
            micro_recipe(stages=bad)
    with pytest.raises(RecipeError, match="conversations are fixed"):
        micro_recipe(stages=stages, data_folder=tmp_path)


def test_a_sam_stage_can_train_on_realistic_augmented_samples():
    """``augment = "realistic"`` (sam stages only): the stage's samples go through `augment.realistic`,
    seeded by (recipe seed, stage, step, index), so a batch is the same each time it is drawn."""
    import numpy as np

    from napari_medplib.train.stream import StageStream

    stages = micro_stages()
    assert micro_recipe(stages=stages).stages[0].augment == ""
    stages[0]["augment"] = "realistic"
    recipe = micro_recipe(stages=stages)
    assert recipe.stages[0].augment == "realistic"
    stream = StageStream(recipe, recipe.stages[0], 0)
    first, again = stream.batch(0), StageStream(recipe, recipe.stages[0], 0).batch(0)
    assert first and all(item.sample.meta.get("augmented") == "realistic" for item in first)
    assert all(item.sample.image.dtype == np.uint8 and item.sample.labels.max() > 0 for item in first)
    assert all(np.array_equal(a.sample.image, b.sample.image) for a, b in zip(first, again, strict=True))
    plain = micro_recipe()
    assert not any("augmented" in item.sample.meta for item in StageStream(plain, plain.stages[0], 0).batch(0))
    for index in range(1, len(stages)):  # llm stages refuse it
        wrong = micro_stages()
        wrong[index]["augment"] = "realistic"
        with pytest.raises(RecipeError, match=rf"stage '{wrong[index]['name']}': augment applies to sam stages only"):
            micro_recipe(stages=wrong)


def test_augment_extent_sets_the_object_extent_of_realistic_crops(monkeypatch):
    """``augment_extent`` (sam stages with augment): the SAM-pixel extent `augment.realistic` cuts objects
    to; 0 (the default) leaves realistic's own default, the synthetic frames' extent."""
    from napari_medplib.train import augment
    from napari_medplib.train.stream import StageStream

    extents = []
    original = augment.realistic
    monkeypatch.setattr(augment, "realistic", lambda sample, rng, extent=None: extents.append(extent) or original(
        sample, rng, extent))
    stages = micro_stages()
    stages[0]["augment"] = "realistic"
    plain = micro_recipe(stages=stages)
    assert plain.stages[0].augment_extent == 0.0
    assert StageStream(plain, plain.stages[0], 0).batch(0) and extents and set(extents) == {None}
    extents.clear()
    stages[0]["augment_extent"] = PROMPT_OBJECT_EXTENT
    recipe = micro_recipe(stages=stages)
    assert recipe.stages[0].augment_extent == PROMPT_OBJECT_EXTENT
    wider = StageStream(recipe, recipe.stages[0], 0).batch(0)
    assert wider and extents and set(extents) == {PROMPT_OBJECT_EXTENT}
    assert all(item.sample.meta.get("augmented") == "realistic" for item in wider)
    # (what the extent does to the crops: tests/train/test_augment.py)
    stages[0]["augment_extent"] = -1.0
    with pytest.raises(RecipeError, match=r"stage 'sam': augment_extent must be 0 or more, got -1\.0"):
        micro_recipe(stages=stages)


def test_augment_extent_reads_from_toml(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[[stages]]\nname = "a"\nkind = "sam"\ntrain = ["sam.*"]\naugment = "realistic"\n'
                    'augment_extent = 48\n')
    assert load_recipe(path).stages[0].augment_extent == 48
