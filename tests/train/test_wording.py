"""Paraphrased questions, answers by modality, and "I can't tell" for images unlike microscopy."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medplib.train import unknown
from napari_medplib.train.conversations import (
    _R_CATEGORY,
    _V_COUNT,
    _V_DESCRIPTION,
    _V_MODALITY,
    _V_PRESENT,
    make_conversations,
)
from napari_medplib.train.synth import make_sample
from napari_medplib.train.wording import (
    CANT_TELL,
    MODALITY_FACTS,
    POOLS,
    STYLE_MODALITY,
    image_meta,
)

ORIGINAL = {"modality": _V_MODALITY, "description": _V_DESCRIPTION, "count": _V_COUNT, "presence": _V_PRESENT,
            "region_category": _R_CATEGORY}


def test_each_pool_starts_with_the_original_templates_and_has_no_repeats():
    for kind, templates in ORIGINAL.items():
        assert POOLS[kind][: len(templates)] == templates, kind
    for kind, pool in POOLS.items():
        keys = [" ".join(t.lower().replace("?", "").replace(".", "").split()) for t in pool]
        assert len(set(keys)) == len(keys), kind
        assert all(t.count("<region>") == (kind == "region_category") for t in pool), kind
    assert len(POOLS["modality"]) >= 15 and len(POOLS["description"]) >= 15 and len(POOLS["stain"]) >= 10


def _questions(sample, wording, seed=0):
    rng = np.random.default_rng(seed)
    kinds = {"vqa": ("modality", "stain", "description", "count", "presence"), "region_vqa": ("category",)}
    return make_conversations(sample, rng, n_per_task={"vqa": 5, "region_vqa": 1}, tasks=("vqa", "region_vqa"),
                              kinds=kinds, wording=wording)


def test_paraphrases_draw_from_the_pools_and_templates_stay_as_they_were():
    sample = make_sample("nuclei", 3)
    sample.meta.update(image_meta("fluorescence", "nuclei"))
    seen_para, seen_orig = set(), set()
    for seed in range(30):
        seen_para |= {c.question for c in _questions(sample, "paraphrases", seed) if c.kind in ("modality",)}
        seen_orig |= {c.question for c in _questions(sample, "templates", seed) if c.kind in ("modality",)}
    assert seen_orig <= set(_V_MODALITY)
    assert seen_para <= set(POOLS["modality"]) and len(seen_para - set(_V_MODALITY)) >= 5
    # the default wording gives exactly what it gave before the pools existed
    a = make_conversations(make_sample("he", 1), np.random.default_rng(4))
    b = make_conversations(make_sample("he", 1), np.random.default_rng(4), wording="templates")
    assert [(c.question, c.answer) for c in a] == [(c.question, c.answer) for c in b]
    with pytest.raises(ValueError, match="wording"):
        make_conversations(sample, 0, wording="slang")


def test_answers_name_modality_stain_and_objects():
    sample = make_sample("he", 2)
    sample.meta.update(image_meta(STYLE_MODALITY["he"], "nuclei"))
    answers = {c.kind: c.answer for c in _questions(sample, "paraphrases", 1)}
    assert answers["modality"] == MODALITY_FACTS["he"].modality
    assert "H&E" in answers["stain"] and "nuclei" in answers["description"]
    assert answers["description"].lower() not in ("yes", "no")


def test_every_question_about_an_image_unlike_microscopy_is_declined():
    rng = np.random.default_rng(0)
    for _ in range(6):
        sample = unknown.training_unknown(rng, size=96)
        assert sample.meta["unknown"] and sample.labels.max() == 0
        convs = _questions(sample, "paraphrases", int(rng.integers(100)))
        assert {c.kind for c in convs} >= {"modality", "description", "category"}
        assert all(c.answer == CANT_TELL for c in convs)
        assert all(len(c.regions) == 1 for c in convs if c.task == "region_vqa")


def test_noise_and_photographs():
    rng = np.random.default_rng(1)
    for kind in unknown.NOISE_KINDS:
        image = unknown.noise(kind, rng, (40, 50))
        assert image.shape[:2] == (40, 50) and image.dtype in (np.uint8, np.uint16)
        assert image.ndim == (3 if kind == "rgb" else 2)
    with pytest.raises(ValueError, match="noise kind"):
        unknown.noise("pink", rng)
    assert not set(unknown.TRAINING_PHOTOS) & set(unknown.REPORT_PHOTOS)
    for name in unknown.TRAINING_PHOTOS + unknown.REPORT_PHOTOS:
        image = unknown.photo(name)
        assert image.dtype == np.uint8 and image.ndim in (2, 3) and min(image.shape[:2]) >= 100, name


def test_perturbed_questions_keep_region_tokens_and_slots_and_are_seeded():
    from napari_medplib.train.wording import perturb

    rng = np.random.default_rng(0)
    questions = ["What is in <region>?", "How many {noun} can you see in this image?", "Describe the image."]
    seen = set()
    for _ in range(200):
        for q in questions:
            out = perturb(q, rng)
            seen.add(out)
            assert ("<region>" in out) == ("<region>" in q) and ("{noun}" in out) == ("{noun}" in q), out
            assert out.strip()
    assert len(seen) > 60  # many variants
    assert perturb(questions[1], np.random.default_rng(5)) == perturb(questions[1], np.random.default_rng(5))


def test_noisy_wording_draws_from_the_pools():
    from napari_medplib.train.conversations import make_conversations
    from napari_medplib.train.synth import make_sample

    sample = make_sample("nuclei", [1, 2], size=(128, 128))
    convs = make_conversations(sample, 0, n_per_task=3, wording="noisy")
    assert convs and all(c.question for c in convs)
    with pytest.raises(ValueError, match="noisy"):
        make_conversations(sample, 0, wording="typos")
