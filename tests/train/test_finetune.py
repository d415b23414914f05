"""Fine-tuning core: checked inputs, the held-out split, the engine's crops, resume = uninterrupted."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from napari_medplib.train.finetune_data import (  # noqa: E402
    MAX_OBJECTS_PER_PLANE,
    FinetuneInputError,
    annotated_planes,
    split_objects,
)


def blobs(n: int = 8, size: int = 96, seed: int = 0, radius: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """A grey plane with ``n`` bright discs on a dim ground, and their instance labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    image = rng.normal(20, 3, (size, size))
    labels = np.zeros((size, size), np.int32)
    centres = [(16 + 22 * (i // 4), 14 + 22 * (i % 4)) for i in range(n)]
    for i, (cy, cx) in enumerate(centres, start=1):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        labels[disc] = i
        image[disc] += 80
    return np.clip(image, 0, 255).astype(np.uint8), labels


# ------------------------------------------------------------------------------------ inputs
def test_planes_keep_classes_and_drop_unannotated_stack_planes():
    image, labels = blobs()
    stack_img, stack_lab = np.stack([image, image]), np.stack([labels, np.zeros_like(labels)])
    planes = annotated_planes([image, stack_img], [labels, stack_lab], ["nucleus", {i: "cell" for i in range(1, 9)}],
                              names=["a", "b"])
    assert [p.name for p in planes] == ["a", "b plane 0"]  # the empty plane is left out
    assert set(planes[0].classes.values()) == {"nucleus"} and set(planes[1].classes.values()) == {"cell"}
    assert planes[0].ids == list(range(1, 9))


def test_images_of_different_sizes_are_separate_planes():
    a, la = blobs(4, 96)
    b, lb = blobs(4, 120, seed=1)
    planes = annotated_planes([a, b], [la, lb])
    assert [p.image.shape for p in planes] == [(96, 96), (120, 120)]


@pytest.mark.parametrize("make, message", [
    (lambda im, lab: ([im], [np.zeros_like(lab)]), "no objects"),
    (lambda im, lab: ([im], [(lab == 1).astype(np.int32)]), "at least 4"),
    (lambda im, lab: ([im], [lab[:50]]), "do not match"),
    (lambda im, lab: ([im], [np.stack([lab] * 3, -1)]), "RGB"),
    (lambda im, lab: ([im], [lab.astype(np.float32)]), "whole numbers"),
    (lambda im, lab: ([im], [-lab]), "negative"),
    (lambda im, lab: ([im, im], [lab]), "one label image per image"),
    (lambda im, lab: ([], []), "no images"),
    (lambda im, lab: ([np.zeros((2, 3, 4, 5, 6))], [lab]), "one plane"),
])
def test_bad_inputs_name_the_fix(make, message):
    image, labels = blobs()
    images, label_images = make(image, labels)
    with pytest.raises(FinetuneInputError, match=message):
        annotated_planes(images, label_images)


def test_a_grey_level_image_picked_as_labels_is_refused_before_per_id_work():
    image = np.zeros((256, 256), np.uint8)
    many = np.arange(256 * 256, dtype=np.uint16).reshape(256, 256) % 40000  # 40,000 ids
    with pytest.raises(FinetuneInputError, match=f"{MAX_OBJECTS_PER_PLANE:,}"):
        annotated_planes([image], [many])


def test_class_names_must_be_words_without_special_tokens():
    image, labels = blobs()
    with pytest.raises(FinetuneInputError, match="reserves"):
        annotated_planes([image], [labels], "<SEG>")
    with pytest.raises(FinetuneInputError, match="no class name"):
        annotated_planes([image], [labels], [{1: "a"}])


def test_split_holds_out_a_share_at_least_three_and_is_disjoint():
    image, labels = blobs(8)
    planes = annotated_planes([image, image], [labels, labels])
    split = split_objects(planes, holdout=0.2, seed=3)
    assert len(split.heldout) == 3 and len(split.train) == 13
    assert not set(split.train) & set(split.heldout)
    assert split_objects(planes, seed=3).heldout == split.heldout  # seeded
    assert len(split_objects(planes, holdout=0.5).heldout) == 8


# ------------------------------------------------------------------------------------ examples
def test_examples_are_engine_crops_of_training_objects_only():
    from napari_medplib.train.finetune import _prepare, step_examples

    image, labels = blobs(8, size=200, radius=5)
    planes = annotated_planes([image], [labels])
    split = split_objects(planes, seed=0)
    prepared = [_prepare(planes[0], [o.label for o in split.train])]
    held = {o.label for o in split.heldout}
    for step in range(4):
        for ex in step_examples(prepared, split.train, step, 6, seed=0):
            assert ex.crop.shape[:2] == ex.target.shape and ex.crop.dtype == np.uint8
            assert ex.target.any()
            if ex.kind == "box":
                rows, cols = np.nonzero(ex.target)
                y0, x0, y1, x1 = ex.box
                # the jittered box still frames the object (corners move by at most 6 % of its size)
                assert abs(rows.min() - y0) <= 2 and abs(cols.max() - x1) <= 2
            else:
                y, x = np.round(ex.point).astype(int)
                assert ex.target[y, x]  # the click is on the object
            # the crop is the engine's: about 256 * extent / 48 px for a ~11 px object, not the whole plane
            assert max(ex.crop.shape[:2]) < 200
    trained_labels = {o.label for o in split.train}
    assert trained_labels and not trained_labels & held


@pytest.mark.parametrize(("share", "clicks"), [(0.5, 3), (0.0, 0), (1.0, 6), (0.34, 2)])
def test_the_click_share_sets_how_many_examples_are_clicks(share, clicks):
    from napari_medplib.train.finetune import _prepare, step_examples

    image, labels = blobs(8, size=200, radius=5)
    planes = annotated_planes([image], [labels])
    split = split_objects(planes, seed=0)
    prepared = [_prepare(planes[0], [o.label for o in split.train])]
    kinds = [ex.kind for ex in step_examples(prepared, split.train, 0, 6, seed=0, click_share=share)]
    assert kinds.count("point") == clicks and kinds.count("box") == 6 - clicks
    if share == 0.5:
        assert kinds == ["box", "point"] * 3  # the default alternates, as runs before the option did


def test_a_click_share_outside_0_to_1_is_refused():
    from napari_medplib.train.finetune import FinetuneOptions

    with pytest.raises(FinetuneInputError, match="click_share"):
        FinetuneOptions(click_share=1.5).check()


# ------------------------------------------------------------------------------------ training
def _weights(folder):
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


def _options(**kw):
    from napari_medplib.train.finetune import FinetuneOptions

    base = dict(steps=6, batch_size=2, warmup_steps=1, checkpoint_every=2, evaluate=False, threads=1)
    return FinetuneOptions(**(base | kw))


def test_interrupted_and_resumed_training_equals_uninterrupted(tmp_path):
    from napari_medplib.testing import tiny_model
    from napari_medplib.train.finetune import FinetuneCancelled, finetune

    image, labels = blobs(8)
    planes = annotated_planes([image], [labels], "nucleus")
    base = tiny_model(0)
    whole = finetune(planes, tmp_path / "whole", base_model=base, options=_options())
    steps: list[int] = []
    with pytest.raises(FinetuneCancelled):
        finetune(planes, tmp_path / "resumed", base_model=base, options=_options(),
                 on_log=lambda r: steps.append(r["step"]), should_stop=lambda: len(steps) >= 3)
    assert (tmp_path / "resumed" / "finetune" / "state.pt").is_file()
    assert not (tmp_path / "resumed" / "config.json").exists()  # no half model
    resumed = finetune(planes, tmp_path / "resumed", base_model=base, options=_options(),
                       on_log=lambda r: steps.append(r["step"]))
    assert steps == [1, 2, 3, 4, 5, 6]  # resumed at step 3, not from the start
    a, b = _weights(whole.model_dir), _weights(resumed.model_dir)
    start = _weights_base(base)
    changed = [k for k in a if k.startswith("sam.mask_decoder") and not np.array_equal(a[k], start[k])]
    assert changed, "training changed no mask-decoder weight"
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert not (tmp_path / "resumed" / "finetune" / "state.pt").exists()


def _weights_base(model):
    from napari_medplib.model.convert import model_state

    return {k: v.numpy() for k, v in model_state(model).items()}


def test_only_the_chosen_parts_train_and_the_folder_loads_with_its_card(tmp_path):
    from napari_medplib.engine import Session
    from napari_medplib.testing import tiny_model
    from napari_medplib.train.finetune import finetune

    image, labels = blobs(8)
    planes = annotated_planes([image], [labels], "nucleus")
    base = tiny_model(0)
    result = finetune(planes, tmp_path / "m", base_model=base, options=_options(evaluate=True, steps=2))
    before, after = _weights_base(base), _weights(result.model_dir)
    changed = {key for key, value in after.items() if not np.array_equal(value, before[key])}
    # SAM's decoder side, the <SEG> projection and (LoRA, merged) the language model's FFN; nothing else
    assert changed and all(k.startswith(("sam.mask_decoder", "sam.prompt_encoder", "text_hidden_fcs"))
                           or ".mlp." in k for k in changed), sorted(changed)
    assert any(".mlp." in k for k in changed) and any(k.startswith("text_hidden_fcs") for k in changed)
    assert set(after) == set(before)  # LoRA merged: the saved layout is the base model's
    card = (result.model_dir / "README.md").read_text()
    assert "nucleus" in card and "held out" in card.lower()
    recipe = json.loads((result.model_dir / "finetune.json").read_text())
    assert recipe["classes"] == ["nucleus"] and len(recipe["split"]["heldout"]) == 3
    assert set(result.before) >= {"box_dice", "point_dice", "ground_f1"}
    assert set(result.baselines) >= {"ellipse_dice", "otsu_dice", "watershed_f1"}
    assert "grounding F1" in result.summary()
    assert 0.0 <= result.after["box_dice"] <= 1.0
    with Session.load(str(result.model_dir)) as session:
        assert session.segment(image, box=[10, 8, 22, 20]).mask.shape == image.shape


def test_a_non_empty_output_folder_is_refused_and_left_alone(tmp_path):
    from napari_medplib.testing import tiny_model
    from napari_medplib.train.finetune import finetune

    image, labels = blobs(8)
    planes = annotated_planes([image], [labels])
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FinetuneInputError, match="not empty"):
        finetune(planes, out, base_model=tiny_model(0), options=_options())
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_finished_run_is_returned_not_retrained(tmp_path):
    from napari_medplib.testing import tiny_model
    from napari_medplib.train.finetune import finetune

    image, labels = blobs(8)
    planes = annotated_planes([image], [labels])
    base = tiny_model(0)
    first = finetune(planes, tmp_path / "run", base_model=base, options=_options(steps=2))
    weights = (tmp_path / "run" / "model.safetensors").read_bytes()
    logged: list[dict] = []
    again = finetune(planes, tmp_path / "run", base_model=base, options=_options(steps=2), on_log=logged.append)
    assert logged == [] and again.n_train == first.n_train and again.steps == 2
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == weights
    assert "not measured" in again.summary()


@pytest.mark.parametrize("changed, named", [
    ({"class_names": "cell"}, "other class names"),
    ({"contrast_limits": [(0, 120)]}, "other contrast"),
])
def test_a_run_folder_of_other_inputs_is_not_resumed_and_says_what_differs(tmp_path, changed, named):
    from napari_medplib.testing import tiny_model
    from napari_medplib.train.finetune import FinetuneCancelled, finetune

    image, labels = blobs(8)
    base = tiny_model(0)
    with pytest.raises(FinetuneCancelled):
        finetune(annotated_planes([image], [labels]), tmp_path / "run", base_model=base, options=_options(),
                 should_stop=lambda: True)
    state = (tmp_path / "run" / "finetune" / "state.pt").read_bytes()
    with pytest.raises(FinetuneInputError, match=named):
        finetune(annotated_planes([image], [labels], **changed), tmp_path / "run", base_model=base, options=_options())
    assert (tmp_path / "run" / "finetune" / "state.pt").read_bytes() == state  # the paused run is untouched

def test_without_grounding_only_sams_decoder_side_trains(tmp_path):
    from napari_medplib.testing import tiny_model
    from napari_medplib.train.finetune import finetune

    image, labels = blobs(8)
    base = tiny_model(0)
    result = finetune(annotated_planes([image], [labels]), tmp_path / "m", base_model=base,
                      options=_options(steps=2, grounding=False))
    before, after = _weights_base(base), _weights(result.model_dir)
    changed = {key for key, value in after.items() if not np.array_equal(value, before[key])}
    assert changed and all(k.startswith(("sam.mask_decoder", "sam.prompt_encoder")) for k in changed)


def test_grounding_loss_counts_only_annotated_pixels_and_their_ring():
    from napari_medplib.train.finetune_grounding import prepare_grounding

    image, labels = blobs(8)
    plane = annotated_planes([image], [labels], "nucleus")[0]
    rgb = np.repeat(image[..., None], 3, -1)
    gp = prepare_grounding(plane, rgb, [1, 2, 3, 4, 5], [6, 7, 8])
    assert gp.weight[labels == 1].min() == 1.0  # a trained object counts
    assert gp.weight[np.isin(labels, [6, 7, 8])].max() == 0.0  # held-out objects never count
    assert gp.weight[90:, 90:].max() == 0.0  # far unannotated pixels: unknown under partial annotation
    assert set(gp.positives) == {"nucleus"} and not gp.positives["nucleus"][labels == 6].any()
    plane.fully_annotated = True
    full = prepare_grounding(plane, rgb, [1, 2, 3, 4, 5], [6, 7, 8])
    assert full.weight[90:, 90:].min() == 1.0 and full.weight[labels == 6].max() == 0.0


def test_a_released_checkpoint_folder_adapts_with_lora_and_reloads(tmp_path):
    """The tiny reference checkpoint in MedPLIB's released layout (MoE experts, sharded) as the base."""
    from napari_medplib.engine import Session
    from napari_medplib.testing import reference_fixture_dir
    from napari_medplib.train.finetune import finetune

    image, labels = blobs(8)
    result = finetune(annotated_planes([image], [labels], "nucleus"), tmp_path / "m",
                      base_model=str(reference_fixture_dir()), options=_options(steps=2))
    recipe = json.loads((result.model_dir / "finetune.json").read_text())
    assert recipe["base_model"] and recipe["options"]["grounding"] is True
    with Session.load(str(result.model_dir)) as session:
        assert session.model.config.object_extent_range  # the adapted size range travels with the model
        assert session.segment(image, points=[(16, 14)], point_labels=[1]).mask.shape == image.shape


def test_a_generic_model_keeps_the_engines_click_size_estimate(tmp_path):
    """``size_range=False`` (the bundled model's real-image training): no size range is learnt or saved."""
    from napari_medplib.testing import tiny_model
    from napari_medplib.train.finetune import finetune

    image, labels = blobs(8)
    planes = annotated_planes([image], [labels])
    kept = finetune(planes, tmp_path / "kept", base_model=tiny_model(0), options=_options(steps=1, grounding=False))
    generic = finetune(planes, tmp_path / "generic", base_model=tiny_model(0),
                       options=_options(steps=1, grounding=False, size_range=False))
    read = [json.loads((r.model_dir / "config.json").read_text())["object_extent_range"] for r in (kept, generic)]
    assert read[0] and read[0][0] <= 13 <= read[0][1] + 1  # the discs are 13 px across
    assert read[1] == []


def test_learning_class_names_without_peft_says_how_to_get_it(monkeypatch, tmp_path):
    """The plugin manager installs no extras: no peft means a message naming the extra, before any work."""
    from napari_medplib.train import finetune_data
    from napari_medplib.train.finetune import finetune

    monkeypatch.setattr(finetune_data, "peft_available", lambda: False)
    image, labels = blobs(8)
    with pytest.raises(FinetuneInputError, match=r"napari-medplib\[train\].*--no-grounding"):
        finetune(annotated_planes([image], [labels]), tmp_path / "m", options=_options(steps=1))
    assert not (tmp_path / "m").exists()


def test_extra_loss_terms_join_every_step_and_the_log(tmp_path):
    import torch

    from napari_medplib.testing import tiny_model
    from napari_medplib.train.finetune import finetune

    image, labels = blobs(8)
    seen = []

    def keep(model, step):
        seen.append(step)
        weight = model.sam.mask_decoder.iou_prediction_head.layers[0].weight
        return {"keep": (weight**2).mean() * 0 + torch.tensor(0.25)}

    result = finetune(annotated_planes([image], [labels]), tmp_path / "m", base_model=tiny_model(0),
                      options=_options(steps=3, grounding=False), extra_loss=keep)
    assert seen == [0, 1, 2]
    records = [json.loads(line) for line in (result.model_dir / "finetune" / "log.jsonl").read_text().splitlines()]
    assert [r["keep"] for r in records] == [0.25] * 3


def test_the_familiarity_check_is_kept_only_when_the_image_features_did_not_train(tmp_path):
    """The check reads the vision tower's and projector's features: valid for an adapted model only if
    neither trained (``families/medplib/familiarity.py``)."""
    from napari_medplib.families.medplib import familiarity
    from napari_medplib.families.medplib.adapter import familiarity_width
    from napari_medplib.testing import make_tiny_model_folder
    from napari_medplib.train.finetune import finetune

    base = make_tiny_model_folder(tmp_path / "base")
    rng = np.random.default_rng(0)
    from napari_medplib.model.medplib import MedPLIBModel

    width = familiarity_width(MedPLIBModel.from_pretrained(base))
    familiarity.fit(rng.normal(0, 1, (20, width)), rng.normal(2, 1, (10, width))).save(base)
    image, labels = blobs(8)
    planes = annotated_planes([image], [labels])
    kept = finetune(planes, tmp_path / "kept", base_model=str(base), options=_options(steps=1, grounding=False))
    assert familiarity.load(kept.model_dir, width) is not None
    dropped = finetune(planes, tmp_path / "dropped", base_model=str(base),
                       options=_options(steps=1, grounding=False, train=("sam.mask_decoder.*", "mm_projector.*")))
    assert not (dropped.model_dir / familiarity.FILE).exists()
