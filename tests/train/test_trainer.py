"""A few steps of every stage on a micro model: losses fall, freezing freezes, MoE experts come from
stages II and III, an interrupted run resumes to the same weights, checkpoints load."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from train_micro import micro_recipe, micro_stages

from napari_medplib.model.medplib import MedPLIBModel
from napari_medplib.train import trainer as trainer_module
from napari_medplib.train.build import set_trainable
from napari_medplib.train.data import write_synthetic_dataset
from napari_medplib.train.evaluate import resolve_model_folder
from napari_medplib.train.recipe import RecipeError
from napari_medplib.train.steps import llm_losses, make_batch
from napari_medplib.train.stream import Prefetcher, StageStream
from napari_medplib.train.trainer import Interrupted, Trainer, learning_rate

STEPS = 8


@pytest.fixture(scope="module")
def one_sample(tmp_path_factory):
    """One image, so a few steps can visibly fit it."""
    folder = tmp_path_factory.mktemp("data") / "one"
    return write_synthetic_dataset(folder, n=1, seed=4, n_per_task=3, size=(64, 64), styles=("nuclei",))


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_sample):
    run_dir = tmp_path_factory.mktemp("run")
    trainer = Trainer(micro_recipe(STEPS, one_sample), run_dir, progress=False, log=lambda _: None)
    final = trainer.run()
    return trainer, final


def _log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _state(folder):
    return MedPLIBModel.from_pretrained(folder).state_dict()


def test_every_stage_runs_and_its_loss_falls(run):
    trainer, final = run
    records = _log(trainer.run_dir)
    for stage in ("sam", "regions", "vl", "grounding", "moe"):
        losses = [r["loss"] for r in records if r["stage"] == stage]
        assert len(losses) == STEPS
        assert np.mean(losses[-2:]) < losses[0], (stage, losses)
    assert any("dice" in r for r in records if r["stage"] == "grounding")
    assert not any(r.get("dice") for r in records if r["stage"] == "regions")
    assert all("prompt_dice" in r for r in records if r["stage"] == "moe")  # box/point losses kept on
    assert resolve_model_folder(trainer.run_dir) == final


def test_run_folder_names_its_model_from_any_directory(run, tmp_path, monkeypatch):
    trainer, final = run
    monkeypatch.chdir(tmp_path)
    assert json.loads((trainer.run_dir / "final.json").read_text()) == {"model": "stages/moe/final"}
    assert resolve_model_folder(trainer.run_dir) == final


def test_checkpoints_load_and_answer(run):
    trainer, final = run
    model = MedPLIBModel.from_pretrained(final)
    assert model.config.moe is not None and model.sam is not None
    from napari_medplib.model.tokenizer import encode_question

    ids, _ = encode_question(model.tokenizer, "What kind of image is this?")
    result = model.generate(torch.tensor(ids), torch.zeros(1, 3, 336, 336), max_new_tokens=3)
    assert len(result.all_ids) >= 1 and result.expert_counts is not None
    dense = MedPLIBModel.from_pretrained(trainer.final_dir(trainer.recipe.stage("vl")))
    assert dense.config.moe is None


def test_frozen_parameters_do_not_change(run):
    trainer, _ = run
    sam = _state(trainer.final_dir(trainer.recipe.stage("sam")))
    vl = _state(trainer.final_dir(trainer.recipe.stage("vl")))
    grounding = _state(trainer.final_dir(trainer.recipe.stage("grounding")))
    # stage II trains the language side only: SAM is the sam stage's, copied
    for key in sam:
        if key.startswith("sam."):
            assert torch.equal(sam[key], vl[key]), key
    # stage III trains FFN, T-projector, mask decoder: attention, embeddings, CLIP, SAM encoder unchanged
    changed = {k for k in vl if not torch.equal(vl[k], grounding[k])}
    assert changed, "stage III changed nothing"
    for key in changed:
        assert ".mlp." in key or key.startswith(("text_hidden_fcs.", "sam.mask_decoder.")), key
    assert any(".mlp." in k for k in changed) and any(k.startswith("sam.mask_decoder.") for k in changed)


def test_region_geometry_is_trained_in_stage_two(run):
    trainer, _ = run
    vl = _state(trainer.final_dir(trainer.recipe.stage("vl")))
    last = vl["region_encoder.geometry.2.weight"]  # zero at initialisation
    assert last.abs().max() > 0, "stage II did not train the region geometry MLP"


def test_frozen_parameters_get_no_gradient(run):
    trainer, _ = run
    stage = trainer.recipe.stage("grounding")
    model = trainer.initial_model(stage)
    trainable = set(set_trainable(model, stage.train))
    items = StageStream(trainer.recipe, stage, 2).batch(0)
    losses = llm_losses(model.train(), make_batch(model, items), stage.loss)
    assert "dice" in losses
    sum(losses.values()).backward()
    for name, param in model.named_parameters():
        if name in trainable:
            continue
        assert param.grad is None, name
    assert any(model.get_parameter(n).grad is not None for n in trainable if n.startswith("sam.mask_decoder."))
    assert any(model.get_parameter(n).grad is not None for n in trainable if ".mlp." in n)


def test_moe_stage_starts_from_stages_two_and_three(run):
    trainer, _ = run
    vl = _state(trainer.final_dir(trainer.recipe.stage("vl")))
    grounding = _state(trainer.final_dir(trainer.recipe.stage("grounding")))
    model = trainer.initial_model(trainer.recipe.stage("moe"))
    state = model.state_dict()
    for proj in ("gate_proj", "up_proj", "down_proj"):
        key = f"language_model.layers.1.mlp.{proj}.weight"
        assert torch.equal(state[f"language_model.layers.1.mlp.experts.0.{proj}.weight"], grounding[key])
        assert torch.equal(state[f"language_model.layers.1.mlp.experts.1.{proj}.weight"], vl[key])
    assert torch.equal(state["language_model.layers.0.self_attn.q_proj.weight"], vl["language_model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(state["text_hidden_fcs.0.weight"], grounding["text_hidden_fcs.0.weight"])
    mask_key = next(k for k in grounding if k.startswith("sam.mask_decoder."))
    assert torch.equal(state[mask_key], grounding[mask_key])


def test_a_dense_stage_cannot_start_from_a_moe_stage(run):
    """A stage that forgets ``moe = true`` after a MoE stage would start with a random FFN (the experts'
    weights have nowhere to go): refused, naming the fix."""
    import copy

    trainer, _ = run
    stage = copy.copy(trainer.recipe.stage("moe"))
    stage.init, stage.moe, stage.experts, stage.copy = "moe", False, [], {}
    with pytest.raises(RecipeError, match="moe = true"):
        trainer.initial_model(stage)


def test_interrupted_run_resumes_to_the_same_weights(run, one_sample, tmp_path):
    _, final = run
    messages = []
    interrupted = Trainer(micro_recipe(STEPS, one_sample), tmp_path, progress=False, log=messages.append)
    with pytest.raises(Interrupted):
        interrupted.run(stop_after_steps=STEPS + 3)  # sam done, regions stopped at step 3
    assert (tmp_path / "stages" / "regions" / "resume.pt").is_file()
    assert (tmp_path / "stages" / "sam" / "final" / "DONE").is_file()
    resumed = Trainer(micro_recipe(STEPS, one_sample), tmp_path, progress=False, log=messages.append).run()
    assert any("sam: done already" in m for m in messages) and any("resuming at step 3" in m for m in messages)
    a, b = _state(final), _state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["step"] for r in _log(tmp_path) if r["stage"] == "regions"] == list(range(1, STEPS + 1))


def test_prefetched_batches_are_the_batches_made_in_process():
    recipe = micro_recipe(4)  # synthetic data: each batch is made from (seed, stage, step)
    for index in (0, 1):  # a sam stage and an llm stage (packed conversations)
        stream = StageStream(recipe, recipe.stages[index], index)
        with Prefetcher(stream, start=2, workers=2, stop=6) as ahead:
            fetched = [ahead.next() for _ in range(4)]
            assert ahead.submitted == 6  # nothing made past `stop`
        for step, items in enumerate(fetched, start=2):
            expected = stream.batch(step)
            assert len(items) == len(expected)
            for got, want in zip(items, expected, strict=True):
                assert np.array_equal(got.sample.image, want.sample.image)
                assert np.array_equal(got.sample.labels, want.sample.labels)
                assert [(c.question, c.answer) for c in got.conversations] == \
                       [(c.question, c.answer) for c in want.conversations]


_KILLED_TRAINER = """
import multiprocessing, os, sys
sys.path.insert(0, {tests!r})
from train_micro import micro_recipe
from napari_medplib.train.stream import Prefetcher, StageStream
if __name__ == "__main__":
    recipe = micro_recipe(4)
    ahead = Prefetcher(StageStream(recipe, recipe.stages[0], 0), start=0, workers=1, stop=4)
    ahead.next()
    print(*[p.pid for p in multiprocessing.active_children()], flush=True)
    os._exit(0)  # dies without shutting the pool down, as a killed trainer does
"""


def _running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status  # a zombie has exited


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc (Linux)")
def test_workers_exit_when_the_trainer_dies(tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(_KILLED_TRAINER.format(tests=str(Path(__file__).parent)))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    pids = [int(p) for p in out.stdout.split()]
    assert pids, out.stderr
    deadline = time.monotonic() + 10
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_running(p) for p in pids)


def test_data_workers_train_the_same_weights(run, one_sample, tmp_path):
    _, final = run
    with_workers = Trainer(micro_recipe(STEPS, one_sample, data_workers=1), tmp_path, progress=False,
                           log=lambda _: None).run()
    a, b = _state(final), _state(with_workers)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_stage_threads_and_workers_override_the_recipe(one_sample, tmp_path, monkeypatch):
    stages = micro_stages(1)[:2]
    stages[1].update(threads=1, data_workers=0)
    seen = []
    real = trainer_module.Prefetcher

    def spy(stream, start, workers, stop):
        seen.append((stream.stage.name, workers, torch.get_num_threads()))
        return real(stream, start, workers=workers, stop=stop)

    monkeypatch.setattr(trainer_module, "Prefetcher", spy)
    caller = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        Trainer(micro_recipe(1, one_sample, stages=stages, data_workers=1), tmp_path, progress=False,
                log=lambda _: None).run()
        assert seen == [("sam", 1, 2), ("regions", 0, 1)]
        assert torch.get_num_threads() == 2  # the caller's setting is back
    finally:
        torch.set_num_threads(caller)


def test_lora_stage_is_merged_into_plain_weights(one_sample, tmp_path):
    stages = micro_stages(2)[:2]
    stages[1]["lora"] = {"r": 2, "alpha": 4, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}
    stages[1]["train"] = ["text_hidden_fcs.*"]
    trainer = Trainer(micro_recipe(2, one_sample, stages=stages), tmp_path, progress=False, log=lambda _: None)
    final = trainer.run()
    init = trainer.initial_model(trainer.recipe.stage("sam"))  # the scratch weights (same seed)
    trained = _state(final)
    assert not any("lora" in k for k in trained)
    q = "language_model.layers.0.self_attn.q_proj.weight"
    k = "language_model.layers.0.self_attn.k_proj.weight"
    assert not torch.equal(trained[q], init.state_dict()[q])  # LoRA merged in
    assert torch.equal(trained[k], init.state_dict()[k])  # not a LoRA target, frozen


def test_missing_earlier_stage_is_a_clear_error(one_sample, tmp_path):
    trainer = Trainer(micro_recipe(1, one_sample), tmp_path, progress=False, log=lambda _: None)
    with pytest.raises(RecipeError, match="needs stage 'vl', which has not finished"):
        trainer.initial_model(trainer.recipe.stage("grounding"))


def test_learning_rate_warms_up_then_decays():
    stage = micro_recipe(10).stages[0]
    stage.warmup_steps, stage.steps, stage.lr = 2, 10, 1.0
    lrs = [learning_rate(stage, s) for s in range(10)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[2] == 1.0
    assert all(a >= b for a, b in itertools.pairwise(lrs[1:])) and lrs[-1] < 0.2


@torch.no_grad()
def test_labels_sit_on_the_expanded_answer_positions(run):
    """Teacher forcing on the real model: the embedding at every labelled position is that label's."""
    from napari_medplib.model.config import IGNORE_INDEX
    from napari_medplib.train.batches import expand_labels
    from napari_medplib.train.steps import encode_images

    trainer, _ = run
    stage = trainer.recipe.stage("moe")
    model = trainer.initial_model(stage)
    batch = make_batch(model, StageStream(trainer.recipe, stage, 3).batch(1))
    features = encode_images(model, batch.clip_pixels)
    regions = [model.encode_regions(features.patch_features[b], g)[0] if len(g) else torch.zeros(0, 32)
               for b, g in enumerate(batch.region_masks)]
    embeds, _, pmap = model.build_inputs_embeds(batch.input_ids, features.image_tokens, regions, batch.attention_mask)
    labels = expand_labels(batch.labels, pmap, embeds.shape[1])
    where = (labels != IGNORE_INDEX).nonzero()
    assert len(where) > 0
    expected = model.language_model.embed_tokens(labels[where[:, 0], where[:, 1]])
    torch.testing.assert_close(embeds[where[:, 0], where[:, 1]], expected)


def test_reduced_real_evaluation_has_sane_bounds(run):
    from napari_medplib.train.evaluate import evaluate_model, heldout

    _, final = run
    model = MedPLIBModel.from_pretrained(final)
    result = evaluate_model(model, heldout(1, n_per_task=1, size=64, styles=["nuclei"]), max_new_tokens=4,
                            instances_per_image=2)
    for key, value in result["metrics"].items():
        assert value is None or 0.0 <= value <= 1.0, key
    assert result["counts"]["box"] == 2 and result["counts"]["grounding"] >= 1
    assert all(abs(sum(shares) - 1) < 1e-3 for shares in result["routing_shares"].values())


def test_recipe_sets_the_geometry_init_std():
    from napari_medplib.train.build import build_model

    spec = micro_recipe().model
    default = build_model(spec, spec.tokenizer, moe=False)
    spec.geometry_init_std = 0.5
    wide = build_model(spec, spec.tokenizer, moe=False)
    assert wide.config.region_geometry_init_std == 0.5
    std = [float(m.region_encoder.geometry[2].weight.detach().std()) for m in (default, wide)]
    assert std[0] == pytest.approx(0.1, rel=0.2) and std[1] == pytest.approx(0.5, rel=0.2)


def test_recipe_sets_the_geometry_version_and_it_survives_a_save(tmp_path):
    from napari_medplib.model.convert import save_pretrained
    from napari_medplib.model.medplib import MedPLIBModel
    from napari_medplib.train.build import build_model

    spec = micro_recipe().model
    assert spec.geometry_version == 1  # the default trained the bundled model up to the fourth run
    spec.geometry_version = 2
    model = build_model(spec, spec.tokenizer, moe=False)
    assert model.config.region_geometry_version == 2
    save_pretrained(model, tmp_path / "m")
    loaded = MedPLIBModel.from_pretrained(tmp_path / "m")
    assert loaded.config.region_geometry_version == 2
    assert loaded.region_encoder.geometry[0].in_features == model.region_encoder.geometry[0].in_features
    assert torch.equal(loaded.region_encoder.geometry[0].weight, model.region_encoder.geometry[0].weight)


def test_a_stage_may_read_point_regions_as_objects(tmp_path):
    """``point_region_mask``: [model]'s for every stage unless a stage names its own; saved in its config."""
    stages = micro_stages(1)[:2]
    stages[1]["point_region_mask"] = "object"
    trainer = Trainer(micro_recipe(stages=stages), tmp_path, progress=False, log=lambda _: None)
    trainer.run()
    configs = {s.name: MedPLIBModel.from_pretrained(trainer.final_dir(s)).config.point_region_mask
               for s in trainer.recipe.stages}
    assert configs == {"sam": "square", "regions": "object"}
    stages[1]["point_region_mask"] = "blob"
    with pytest.raises(RecipeError, match="point_region_mask must be one of"):
        micro_recipe(stages=stages)
    del stages[1]["point_region_mask"]
    recipe = micro_recipe(stages=stages)
    recipe.model.point_region_mask = "object"
    assert Trainer(recipe, tmp_path / "b", progress=False, log=lambda _: None).initial_model(
        recipe.stage("sam")).config.point_region_mask == "object"


def test_only_named_stages_train_from_finished_ones_copied_in(run, one_sample, tmp_path):
    """``--stage``: a stage trained on another machine, from earlier stages copied into a new run folder."""
    trainer, _ = run
    import shutil

    shutil.copytree(trainer.final_dir(trainer.recipe.stage("vl")), tmp_path / "stages" / "vl" / "final")
    shutil.copytree(trainer.final_dir(trainer.recipe.stage("sam")), tmp_path / "stages" / "sam" / "final")
    other = Trainer(micro_recipe(STEPS, one_sample), tmp_path, progress=False, log=lambda _: None)
    out = other.run(only=["grounding"])
    assert out == other.final_dir(other.recipe.stage("grounding"))
    assert sorted(p.name for p in (tmp_path / "stages").iterdir()) == ["grounding", "sam", "vl"]
    assert not (tmp_path / "final.json").exists()  # the recipe's final stage ("moe") did not run
    # the same stage, same data and seeds as in the full run: the same weights
    ours, theirs = _state(out), _state(trainer.final_dir(trainer.recipe.stage("grounding")))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    with pytest.raises(RecipeError, match="no stage 'nope'"):
        other.run(only=["nope"])
    with pytest.raises(RecipeError, match="stage 'moe' needs stage 'vl'"):
        Trainer(micro_recipe(1, one_sample), tmp_path / "empty", progress=False, log=lambda _: None).run(only=["moe"])


def test_a_stage_trains_on_its_own_device(one_sample, tmp_path, monkeypatch):
    """A recipe for a GPU whose early stages ran on a CPU says so per stage (``device``)."""
    stages = micro_stages(1)[:2]
    stages[0]["device"] = "cpu"
    stages[1]["device"] = "meta"  # a device that is not the recipe's, and that any torch has
    recipe = micro_recipe(1, one_sample, stages=stages)
    recipe.device = "cuda"  # would fail here (no CUDA) if a stage without its own device used it
    moved = []
    real_step = Trainer._step

    def spy(self, model, *args):
        moved.append(next(model.parameters()).device.type)
        if moved[-1] == "meta":
            raise Interrupted("meta tensors cannot train")
        return real_step(self, model, *args)

    monkeypatch.setattr(Trainer, "_step", spy)
    with pytest.raises(Interrupted):
        Trainer(recipe, tmp_path, progress=False, log=lambda _: None).run()
    assert moved == ["cpu", "meta"]


def test_a_stage_may_raise_the_geometry_version_of_the_model_it_continues(run, one_sample, tmp_path):
    """``model = { geometry_version = 3 }`` on a stage continuing a version-2 one: the geometry MLP's input
    layer is widened by zero columns (the same answers until the new inputs train), then trained."""
    import shutil

    from napari_medplib.model.region_encoder import region_input_width
    from napari_medplib.train.evaluate import evaluate_model, heldout

    trainer, _ = run
    stages = micro_stages(STEPS)
    v2 = {**stages[1], "name": "v2", "init": "vl", "model": {"geometry_version": 2}, "reinit": ["region_encoder.geometry.*"]}
    v3 = {**stages[2], "name": "v3", "init": "v2", "tasks": ["region_vqa"], "model": {"geometry_version": 3}}
    recipe = micro_recipe(STEPS, one_sample, stages=[*stages, v2, v3])
    for name in ("sam", "regions", "vl", "grounding", "moe"):
        shutil.copytree(trainer.final_dir(trainer.recipe.stage(name)), tmp_path / "stages" / name / "final")
    other = Trainer(recipe, tmp_path, progress=False, log=lambda _: None)
    other.run(only=["v2"])
    widened = other.initial_model(recipe.stage("v3")).eval()
    old = MedPLIBModel.from_pretrained(other.final_dir(recipe.stage("v2"))).eval()
    assert widened.config.region_geometry_version == 3
    assert widened.region_encoder.geometry[0].in_features == region_input_width(3)
    items = list(heldout(2, seed=3, n_per_task=2, size=64))
    assert evaluate_model(widened, items)["examples"] == evaluate_model(old, items)["examples"]  # same answers
    out = other.run(only=["v3"])
    trained = MedPLIBModel.from_pretrained(out)
    assert trained.config.region_geometry_version == 3
    new_columns = trained.region_encoder.geometry[0].weight[:, old.region_encoder.geometry[0].in_features:]
    assert new_columns.abs().sum() > 0  # the new inputs trained
    assert evaluate_model(trained, items)["counts"]["region_vqa"] > 0  # and the saved model answers


def test_version_1_geometry_is_not_widened_into_a_later_version(run, one_sample, tmp_path):
    """Version 1's inputs are laid out differently from version 2's: going from 1 needs ``reinit``."""
    import shutil

    trainer, _ = run
    stages = micro_stages(STEPS)
    v3 = {**stages[2], "name": "v3", "init": "vl", "model": {"geometry_version": 3}}
    recipe = micro_recipe(STEPS, one_sample, stages=[*stages, v3])
    shutil.copytree(trainer.final_dir(trainer.recipe.stage("vl")), tmp_path / "stages" / "vl" / "final")
    with pytest.raises(RecipeError, match=r"cannot initialise region_encoder\.geometry\.0\.weight.*reinit"):
        Trainer(recipe, tmp_path, progress=False, log=lambda _: None).initial_model(recipe.stage("v3"))
