"""Evaluation metrics on known inputs (a stand-in model with scripted answers and masks), and a
reduced real evaluation of a micro model with sane bounds."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import napari_medplib.train.evaluate as ev
from napari_medplib.model.generation import GenerationResult
from napari_medplib.model.tokenizer import MedPLIBTokenizer
from napari_medplib.train.data import synthetic_items
from napari_medplib.train.recipe import RECIPES_DIR


class _Ground:
    def __init__(self, masks):
        self.masks = masks


class _ScriptedModel:
    """Answers VQA right, region VQA wrong, grounding with the exact target masks."""

    def __init__(self, targets):
        self.tokenizer = MedPLIBTokenizer.from_pretrained(RECIPES_DIR / "tokenizer")
        self.region_encoder = None
        self.sam = self
        self.config = SimpleNamespace(seg_region_prompts=True)
        self.paint_everything = False  # ground() returns all-True masks instead of the targets
        self.targets = targets  # question -> list of masks
        self.grounded = []  # (conversation, regions given to ground)
        self.regions_read_brightness = False

    def eval(self):
        return self

    def encode_image(self, pixels, brightness=None):
        return torch.zeros(1)

    def answer_seg_hidden(self, result):
        return result.step_hidden

    def ground(self, seg_hidden, **kwargs):
        self.grounded.append((self.current_conv, kwargs.get("regions")))
        masks = torch.from_numpy(np.stack(self.current))
        return _Ground(torch.ones_like(masks) if self.paint_everything else masks)


@pytest.fixture
def scripted(monkeypatch):
    items = list(synthetic_items(2, seed=2, n_per_task=3, size=(64, 64), styles=("nuclei",)))
    model = _ScriptedModel({})
    seg = model.tokenizer.seg_token_id

    def answer(model_, conv, image, features, max_new_tokens, sam_embedding=None):
        counts = torch.tensor([[3, 1]]) if conv.task == "grounding" else torch.tensor([[1, 3]])
        if conv.task == "grounding":
            model.current, model.current_conv = conv.target_masks, conv
            return GenerationResult([seg] * len(conv.target_masks), conv.answer, "eos",
                                    torch.zeros(len(conv.target_masks), 4), expert_counts=counts)
        text = conv.canonical.upper() + "." if conv.task == "vqa" else "no idea"
        return GenerationResult([5], text, "eos", torch.zeros(1, 4), expert_counts=counts)

    def prompt_masks(model_, embedding, image, masks, prompt, rng=None, jitter=0.0):
        logits = torch.from_numpy(np.stack(masks)).float() * 20 - 10  # perfect
        if prompt == "point":
            logits[:, :, : logits.shape[2] // 2] = -10  # left half of the image lost
        return logits

    monkeypatch.setattr(ev, "_answer", answer)
    monkeypatch.setattr(ev, "prompt_masks", prompt_masks)
    return model, items


def test_metrics_on_scripted_answers(scripted):
    model, items = scripted
    result = ev.evaluate_model(model, items, instances_per_image=4)
    m = result["metrics"]
    assert m["grounding_mdice"] == 1.0 and m["box_mdice"] == 1.0
    assert m["vqa_acc"] == 1.0  # "YES." normalises to "yes"
    assert m["region_vqa_acc"] == 0.0
    point = result["breakdown"]["point/nuclei"]
    assert 0.0 < point < 1.0 and m["point_mdice"] == pytest.approx(point, abs=1e-4)
    assert result["routing_shares"]["grounding"] == [0.75, 0.25] and result["routing_shares"]["vqa"] == [0.25, 0.75]
    assert result["counts"]["box"] == result["counts"]["point"] > 0
    assert result["n_images"] == 2


def test_grounding_gets_the_question_regions_and_is_broken_down_by_kind(scripted):
    from napari_medplib.train.batches import seg_region_prompt

    model, items = scripted
    result = ev.evaluate_model(model, items, instances_per_image=1)
    kinds = {conv.kind for conv, _ in model.grounded}
    assert "instance" in kinds and "semantic" in kinds
    for conv, regions in model.grounded:
        assert regions == [seg_region_prompt(r) for r in conv.regions]
        assert result["breakdown"][f"grounding/{conv.kind}"] == 1.0


def test_point_dice_matches_a_hand_computation(scripted):
    model, items = scripted
    sample, convs = items[0]
    result = ev.evaluate_model(model, [(sample, convs)], instances_per_image=1)
    ids = np.unique(sample.labels)
    ids = ids[ids > 0]
    chosen = np.random.default_rng([0, 5]).choice(ids, size=1, replace=False)
    mask = sample.labels == chosen[0]
    right = mask.copy()
    right[:, : mask.shape[1] // 2] = False
    assert result["metrics"]["point_mdice"] == pytest.approx(2 * right.sum() / (right.sum() + mask.sum()))


def test_box_masks_are_kept_inside_the_box_as_the_engine_keeps_them(scripted, monkeypatch):
    """A decoder that paints the whole image: "box" scores the mask cut to the box, "box_decoder" the raw one."""
    model, items = scripted
    monkeypatch.setattr(ev, "prompt_masks", lambda model_, emb, image, masks, prompt, rng=None, jitter=0.0:
                        torch.full((len(masks), *masks[0].shape), 10.0))
    sample, convs = items[0]
    result = ev.evaluate_model(model, [(sample, convs)], instances_per_image=1)
    ids = np.unique(sample.labels)
    mask = sample.labels == np.random.default_rng([0, 5]).choice(ids[ids > 0], size=1, replace=False)[0]
    rows, cols = np.nonzero(mask)
    box_area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    m = result["metrics"]
    assert m["box_mdice"] == pytest.approx(2 * mask.sum() / (mask.sum() + box_area))
    assert m["box_decoder_mdice"] == pytest.approx(2 * mask.sum() / (mask.sum() + mask.size))
    assert m["point_mdice"] == m["box_decoder_mdice"]  # points are not cut



def test_point_masks_keep_the_clicked_piece_as_the_engine_keeps_them(scripted, monkeypatch):
    """A decoder that paints the instance and a far-off square: "point" scores the piece under the
    click (the instance, Dice 1), "point_decoder" both pieces."""
    from scipy import ndimage as ndi

    model, items = scripted
    sample, convs = items[0]
    ids = np.unique(sample.labels)
    mask = sample.labels == np.random.default_rng([0, 5]).choice(ids[ids > 0], size=1, replace=False)[0]
    far = ndi.distance_transform_edt(~mask)
    r, c = np.unravel_index(int(np.argmax(far)), mask.shape)
    square = np.zeros_like(mask)
    square[max(r - 2, 0) : r + 3, max(c - 2, 0) : c + 3] = True
    assert far[square].min() > 3  # two separate pieces
    painted = torch.from_numpy(np.where(mask | square, 10.0, -10.0)).float()
    monkeypatch.setattr(ev, "prompt_masks", lambda model_, emb, image, masks, prompt, rng=None, jitter=0.0:
                        painted[None].repeat(len(masks), 1, 1))
    m = ev.evaluate_model(model, [(sample, convs)], instances_per_image=1)["metrics"]
    assert m["point_mdice"] == pytest.approx(1.0)
    assert m["point_decoder_mdice"] == pytest.approx(2 * mask.sum() / (2 * mask.sum() + square.sum()))

def test_grounding_masks_about_a_box_are_kept_inside_it(scripted):
    """As the engine returns them: a <SEG> whose region gave SAM a box is cut to that box; others are not."""
    from napari_medplib.engine.prompts import box_pixels

    model, items = scripted
    model.paint_everything = True
    result = ev.evaluate_model(model, items, instances_per_image=1)
    expected, boxes = [], 0
    for conv, regions in model.grounded:
        if conv.kind != "instance":
            continue
        target = conv.target_masks[0]
        kept = np.ones_like(target)
        if regions[0] is not None and regions[0].box is not None:
            kept = np.zeros_like(target)
            kept[box_pixels(regions[0].box, target.shape)] = True
            boxes += 1
        expected.append(2 * (kept & target).sum() / (kept.sum() + target.sum()))
    assert boxes > 0
    assert result["breakdown"]["grounding/instance"] == pytest.approx(np.mean(expected), abs=1e-4)
    model.config.seg_region_prompts = False  # a model that never gave SAM the box: nothing is cut
    unclipped = ev.evaluate_model(model, items, instances_per_image=1)
    assert unclipped["breakdown"]["grounding/instance"] < result["breakdown"]["grounding/instance"]
    assert unclipped["breakdown"]["grounding/semantic"] == result["breakdown"]["grounding/semantic"]


def test_missing_seg_scores_zero(scripted, monkeypatch):
    model, items = scripted
    original = ev._answer

    def no_seg(model_, conv, image, features, max_new_tokens, sam_embedding=None):
        if conv.task == "grounding":
            return GenerationResult([5], "I cannot.", "eos", torch.zeros(1, 4))
        return original(model_, conv, image, features, max_new_tokens, sam_embedding)

    monkeypatch.setattr(ev, "_answer", no_seg)
    assert ev.evaluate_model(model, items)["metrics"]["grounding_mdice"] == 0.0


def test_table_lists_metrics_floors_and_models():
    results = {name: {"metrics": dict.fromkeys(ev.FLOORS, 0.5), "routing_shares": {"vqa": [0.1, 0.9]}} for name in ("moe", "dense")}
    table = ev.format_table(results)
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "moe", "dense", "floor"]
    assert any(line.startswith("grounding_mdice") and "0.80" in line for line in lines)
    assert "0.10 0.90" in table


def test_resolve_model_folder(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "final.json").write_text(json.dumps({"model": str(tmp_path / "m")}))
    assert ev.resolve_model_folder(tmp_path) == tmp_path / "m"
    (tmp_path / "final.json").write_text(json.dumps({"model": "m"}))  # what the trainer writes
    assert ev.resolve_model_folder(tmp_path) == tmp_path / "m"
    with pytest.raises(FileNotFoundError, match="neither a model folder"):
        ev.resolve_model_folder(tmp_path / "m" / "nothing")


def test_compared_models_get_distinct_column_names():
    from pathlib import Path

    assert ev.model_label(Path("/runs/v6/stages/moe/final")) == "moe"
    assert ev.model_label(Path("/somewhere/bundled_model")) == "bundled_model"
    taken = ["grounding"]
    assert ev.model_label(Path("/runs/v4/stages/grounding/final"), taken) == "v4/grounding"
    assert ev.model_label(Path("/x/grounding"), ["grounding", "x/grounding"]) == "x/grounding#2"


def test_table_marks_values_below_their_floor_even_when_they_round_to_it():
    metrics = dict.fromkeys(ev.FLOORS, 0.95)
    metrics.update(grounding_mdice=0.7998, point_mdice=0.75)
    table = ev.format_table({"m": {"metrics": metrics}})
    rows = {line.split()[0]: line.split()[1] for line in table.splitlines()[1:-1]}
    assert rows["grounding_mdice"] == "0.7998*" and rows["point_mdice"] == "0.750*"
    assert rows["box_mdice"] == "0.950" and rows["vqa_acc"] == "0.950"
    assert table.splitlines()[-1] == "* below the floor"
    assert "*" not in ev.format_table({"m": {"metrics": dict.fromkeys(ev.FLOORS, 0.95)}})


@pytest.mark.parametrize("mode", ["square", "object"])
def test_region_questions_read_point_regions_as_the_engine_does(mode, monkeypatch):
    """``_answer`` (the real one) turns a point into SAM's object mask on object models, as the engine does."""
    from napari_medplib.testing import tiny_model
    from napari_medplib.train.batches import prepare_image, region_mask
    from napari_medplib.train.data import Conversation, RegionSpec

    model = tiny_model(0, region_geometry=True, point_region_mask=mode)
    sample, _ = next(synthetic_items(1, seed=2, size=(64, 64), styles=("nuclei",)))
    image = prepare_image(sample)
    monkeypatch.setattr(model, "point_object_logits",
                        lambda emb, xy: torch.full((len(xy), 1, 64, 64), -10.0).index_fill_(2, torch.arange(20, 40), 10.0))
    given = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda ids, **kw: (given.append(kw["region_masks"]), generate(ids, **kw))[1])
    point = RegionSpec("point", point=(32, 10))
    conv = Conversation("What is <region>?", "nucleus", "region_vqa", "category", [point], canonical="nucleus")
    ev._answer(model, conv, image, model.encode_image(image.clip_pixels), 1, model.sam.encode_image(image.sam_pixels))
    square = torch.from_numpy(region_mask(point, image.original_hw))
    if mode == "square":
        assert torch.equal(given[0][0][0], square)
    else:  # rows 20..39 of the 64x64 low-res frame = a band across the whole image, not the square
        rows, cols = np.nonzero(given[0][0][0].numpy())
        assert cols.min() == 0 and cols.max() == 335 and 100 < rows.min() and rows.max() < 240



@pytest.mark.parametrize("version", [2, 3])
def test_box_regions_of_version_3_models_read_sams_object_as_the_engine_does(version, monkeypatch):
    """``_answer`` gives a version-3 model a box region's object (SAM's box mask, kept inside the box) and
    the frame's brightness; a version-2 model neither."""
    from napari_medplib.testing import tiny_model
    from napari_medplib.train.batches import prepare_image, region_mask
    from napari_medplib.train.data import Conversation, RegionSpec

    model = tiny_model(0, region_geometry=True, region_geometry_version=version, point_region_mask="object")
    sample, _ = next(synthetic_items(1, seed=2, size=(64, 64), styles=("nuclei",)))
    image = prepare_image(sample)
    monkeypatch.setattr(model, "box_object_logits",  # a band of low-res rows 20..39, across the whole image
                        lambda emb, xyxy: torch.full((len(xyxy), 1, 64, 64), -10.0).index_fill_(2, torch.arange(20, 40), 10.0))
    given = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda ids, **kw: (given.append(kw), generate(ids, **kw))[1])
    box = RegionSpec("box", box=(10, 5, 50, 30))
    conv = Conversation("How big is the object in <region>?", "small", "region_vqa", "size", [box], canonical="small")
    features = model.encode_image(image.clip_pixels, image.brightness[None] if version == 3 else None)
    ev._answer(model, conv, image, features, 1, model.sam.encode_image(image.sam_pixels))
    kw = given[0]
    assert torch.equal(kw["region_masks"][0][0], torch.from_numpy(region_mask(box, image.original_hw)))  # the box as drawn
    if version == 2:
        assert kw["region_objects"] is None
        return
    obj, drawn = kw["region_objects"][0][0] > 0, kw["region_masks"][0][0] > 0
    assert obj.any() and not (obj & ~drawn).any() and obj.sum() < drawn.sum()  # the band, cut at the box


def test_eval_styles_choose_the_held_out_images(monkeypatch):
    """``medplib eval --styles bacteria`` scores the opt-in style's held-out images; unknown styles and
    styles with a data folder are errors."""
    from napari_medplib.cli import main
    from napari_medplib.train import evaluate as evaluate_module

    real_heldout = evaluate_module.heldout
    assert {s.style for s, _ in real_heldout(3, styles=["bacteria"])} == {"bacteria"}
    seen = {}

    def fake_heldout(n, seed=0, n_per_task=4, size=256, styles=None):
        seen["styles"] = styles
        return iter(())

    monkeypatch.setattr(evaluate_module, "heldout", fake_heldout)
    monkeypatch.setattr(evaluate_module, "resolve_model_folder", Path)
    monkeypatch.setattr(evaluate_module.MedPLIBModel, "from_pretrained", staticmethod(lambda f, dtype: object()))
    monkeypatch.setattr(evaluate_module, "evaluate_model", lambda model, items, progress: {"n": len(list(items))})
    monkeypatch.setattr(evaluate_module, "format_table", lambda results: "")
    assert main(["eval", "somewhere", "--styles", "bacteria, nuclei", "--no-progress"]) == 0
    assert seen["styles"] == ["bacteria", "nuclei"]
    with pytest.raises(ValueError, match="unknown style"):
        evaluate_module.evaluate(["m"], styles=["bacterias"])
    with pytest.raises(ValueError, match="own"):
        evaluate_module.evaluate(["m"], styles=["bacteria"], data="folder")
