"""Pure parts of ``benchmarks/real_vqa.py``: keyword matching with synonyms, counts within 20 %, yes/no,
the held-out / training wording split, the majority baseline, region boxes, and one end-to-end run with a
stand-in session on a synthetic image (no network, no real images, no model)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from bench_loader import benchmark_module


@pytest.fixture(scope="module")
def vqa():
    with benchmark_module("real_vqa") as module:
        yield module


# ------------------------------------------------------------------------------------ matching
@pytest.mark.parametrize("text, modality, ok", [
    ("fluorescence microscopy", "fluorescence", True),
    ("A fluorescent image of nuclei", "fluorescence", True),
    ("Phase-contrast microscopy", "phase", True),
    ("phase contrast", "phase", True),
    ("electron microscopy", "sem", True),
    ("EM", "tem", True),
    ("SEM", "sem", True),
    ("TEM image", "sem", False),  # the other EM subtype
    ("H&E histology", "he", True),
    ("haematoxylin and eosin stained section", "he", True),
    ("H and E, brightfield", "he", True),  # compatible class
    ("Ki67 immunohistochemistry", "ihc", True),
    ("H&E histology", "ihc", False),
    ("fluorescence microscopy", "phase", False),
    ("phase-contrast and fluorescence", "phase", False),  # a conflicting class named too
    ("no", "fluorescence", False),
    ("", "he", False),
    ("system", "sem", False),  # whole words only
])
def test_modality_matching(vqa, text, modality, ok):
    assert vqa.modality_correct(text, modality) is ok


def test_stain_and_object_matching(vqa):
    assert vqa.stain_correct("Ki-67 (DAB)", "ihc") and vqa.stain_correct("Hoechst", "fluorescence")
    assert not vqa.stain_correct("H&E", "ihc")
    assert vqa.object_correct("nucleus", "nucleus") and vqa.object_correct("Nuclei.", "nucleus")
    assert vqa.object_correct("a nucleus of a cell", "nucleus")  # compatible
    assert not vqa.object_correct("lumen", "nucleus") and not vqa.object_correct("nucleus and lumen", "nucleus")
    assert vqa.object_correct("bacteria", "bacterium") and vqa.object_correct("myelinated axon", "axon")
    assert not vqa.object_correct("Sure, it is <SEG> .", "neurite")


def test_yes_no_and_counts(vqa):
    assert vqa.parse_yes_no("Yes.") == "yes" and vqa.parse_yes_no("no, none") == "no"
    assert vqa.parse_yes_no("phase-contrast microscopy") is None and vqa.parse_yes_no("") is None
    assert vqa.is_bare_yes_no(" No. ") and not vqa.is_bare_yes_no("no nuclei here")
    assert vqa.parse_count("About 40 nuclei") == 40 and vqa.parse_count("twelve") == 12
    assert vqa.parse_count("dim") is None and vqa.parse_count(None) is None
    assert vqa.count_correct(48, 40) and vqa.count_correct(32, 40) and not vqa.count_correct(49, 40)
    assert not vqa.count_correct(None, 40)
    assert vqa.count_relative_error(30, 40) == pytest.approx(0.25)
    assert math.isnan(vqa.count_relative_error(None, 40))
    fact = vqa.Fact("count", "40")
    assert vqa.correct(fact, "There are 44.") and not vqa.correct(fact, "25")


def test_describe_needs_modality_and_object(vqa):
    fact = vqa.Fact("describe", "he|nucleus")
    assert vqa.correct(fact, "H&E-stained section with many nuclei")
    assert not vqa.correct(fact, "H&E-stained tissue section") and not vqa.correct(fact, "no")


# ------------------------------------------------------------------------------------ wordings
def test_every_task_has_both_wordings_and_they_are_disjoint(vqa):
    assert set(vqa.TRAINING_PHRASINGS) == set(vqa.HELD_OUT_PHRASINGS) == set(vqa.TASKS)
    for task in vqa.TASKS:
        assert vqa.TRAINING_PHRASINGS[task] and vqa.HELD_OUT_PHRASINGS[task]
        train = {vqa._template_key(t) for t in vqa.TRAINING_PHRASINGS[task]}
        held = {vqa._template_key(t) for t in vqa.HELD_OUT_PHRASINGS[task]}
        assert not train & held, task


def test_no_held_out_wording_is_a_training_template(vqa):
    trained = vqa.training_templates()
    assert trained, "no templates found in napari_medplib.train.conversations"
    assert not vqa.held_out_templates() & trained
    # the training wordings are the trained templates themselves
    for task, templates in vqa.TRAINING_PHRASINGS.items():
        for t in templates:
            assert vqa._template_key(t) in trained, (task, t)


def test_region_wordings_carry_one_region_placeholder(vqa):
    for wordings in (vqa.TRAINING_PHRASINGS, vqa.HELD_OUT_PHRASINGS):
        for task, templates in wordings.items():
            for t in templates:
                assert t.count("<region>") == (1 if task == "region_class" else 0), t


# ------------------------------------------------------------------------------------ baseline
def test_majority_answers_pick_the_most_frequent_truth_and_the_median_count(vqa):
    facts = [vqa.Fact("modality", "he"), vqa.Fact("modality", "he"), vqa.Fact("modality", "sem"),
             vqa.Fact("modality", "tem"), vqa.Fact("modality", "tem"), vqa.Fact("presence", "yes"),
             vqa.Fact("presence", "no"), vqa.Fact("count", "10"), vqa.Fact("count", "30"), vqa.Fact("count", "100"),
             vqa.Fact("region_class", "nucleus"), vqa.Fact("region_class", "axon"),
             vqa.Fact("region_class", "nucleus")]
    majority = vqa.majority_answers(facts)
    assert majority["modality"] == "electron microscopy"  # sem + tem pool into one class
    assert majority["presence"] == "no"  # tie broken by name
    assert majority["count"] == "30"
    assert majority["region_class"] == "nucleus"
    tasks = vqa.per_task([], facts, majority)
    assert tasks["modality"]["majority"] == pytest.approx(3 / 5)
    assert tasks["presence"]["majority"] == pytest.approx(0.5)
    assert tasks["count"]["majority"] == pytest.approx(1 / 3)
    assert tasks["region_class"]["majority"] == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------ end to end
def _synthetic():
    labels = np.zeros((96, 96), np.int32)
    k = 1
    for y in range(8, 80, 20):
        for x in range(8, 80, 20):
            labels[y:y + 10, x:x + 10] = k
            k += 1
    image = (labels > 0).astype(np.float32) * 200 + 10
    return image, labels


class FakeSession:
    """Answers like a model that knows the image: right on training wordings, 'no' on held-out ones."""

    def __init__(self, vqa):
        self.trained = {t.format(**vqa._words(noun)) for noun in ("nuclei", "axons")
                        for ts in vqa.TRAINING_PHRASINGS.values() for t in ts}
        self.calls, self.cleared = [], 0

    def ask(self, image, question, regions=(), max_new_tokens=48):
        self.calls.append((question, list(regions)))
        q = question.lower()
        if "<region>" in question:
            assert len(regions) == 1 and regions[0].kind == "box"
        known = question in self.trained
        if not known:
            text = "no"
        elif "how many" in q or "count" in q:
            text = "16"
        elif "axon" in q:
            text = "no"
        elif "nucle" in q:
            text = "yes"
        elif "<region>" in question:
            text = "nucleus"
        elif "kind of image" in q or "show" in q or "describe" in q:
            text = "fluorescence microscopy of nuclei"
        else:
            text = "fluorescence microscopy"
        return SimpleNamespace(text=text)

    def clear_cache(self):
        self.cleared += 1


def test_end_to_end_with_a_stand_in_session(vqa):
    image, labels = _synthetic()
    session = FakeSession(vqa)
    result = vqa.run(session, [("synthetic", "fluorescence", "nuclei", "tune", image, labels)])
    assert session.cleared == 1
    payload = json.loads(json.dumps(result, default=float))  # JSON-able
    assert set(payload) >= {"majority_answers", "overall", "images", "phrasings", "count_tolerance"}
    tasks = payload["overall"]["tasks"]
    assert set(tasks) == set(vqa.TASKS)
    for row in tasks.values():
        assert set(row) >= {"training", "held_out", "majority", "n_facts", "n_questions"}
    assert tasks["modality"]["training"] == 1.0 and tasks["modality"]["held_out"] == 0.0
    assert tasks["count"]["training"] == 1.0 and tasks["count"]["mean_relative_error_training"] == 0.0
    assert tasks["describe"]["bare_yes_no"] == len(vqa.HELD_OUT_PHRASINGS["describe"])
    assert tasks["presence"]["majority"] == 0.5
    assert tasks["region_class"]["n_facts"] == vqa.REGIONS_PER_IMAGE
    assert payload["overall"]["modalities"] == ["fluorescence"]
    image_row = payload["images"][0]
    assert image_row["name"] == "synthetic" and image_row["n_objects"] == 16
    assert {"task", "wording", "question", "answer", "correct", "truth"} <= set(image_row["records"][0])
    assert set(image_row["tasks"]) == set(vqa.TASKS)
    assert "{" not in "".join(r["question"] for r in image_row["records"])  # every placeholder filled
    assert "synthetic" in vqa.table(result)


def test_region_boxes_hold_one_whole_object(vqa):
    _, labels = _synthetic()
    boxes = vqa.region_boxes(labels, n=3, seed=1)
    assert len(boxes) == 3
    for y0, x0, y1, x1 in boxes:
        ids = set(np.unique(labels[y0:y1 + 1, x0:x1 + 1])) - {0}
        assert len(ids) == 1
    assert vqa.region_boxes(np.zeros((8, 8), np.int32)) == []


def test_end_to_end_with_a_tiny_model(vqa):
    """The real engine path (``Session.ask`` with a box ``Region``) on a random tiny model: structure only."""
    from napari_medplib import Session
    from napari_medplib.testing import tiny_model

    image, labels = _synthetic()
    session = Session.from_model(tiny_model(0))
    result = vqa.run(session, [("synthetic", "he", "nuclei", "report", image, labels)], max_new_tokens=4)
    tasks = result["overall"]["tasks"]
    assert set(tasks) == set(vqa.TASKS)
    assert all(0.0 <= row["training"] <= 1.0 and 0.0 <= row["held_out"] <= 1.0 for row in tasks.values())
    records = result["images"][0]["records"]
    assert all(isinstance(r["answer"], str) for r in records)
    assert sum(r["task"] == "region_class" for r in records) == vqa.REGIONS_PER_IMAGE * (
        len(vqa.TRAINING_PHRASINGS["region_class"]) + len(vqa.HELD_OUT_PHRASINGS["region_class"]))


# ------------------------------------------------------------------------------------ unlike microscopy
def test_declining_answers_are_recognised(vqa):
    assert vqa.says_cant_tell("I can't tell from this image.") and vqa.says_cant_tell("I cannot say.")
    assert vqa.says_cant_tell("Not sure.") and not vqa.says_cant_tell("fluorescence microscopy")
    assert not vqa.says_cant_tell("no") and not vqa.says_cant_tell(None)


def test_images_unlike_microscopy_are_asked_and_scored(vqa):
    report, tune = vqa.unknown_images("report"), vqa.unknown_images("tune")
    assert {n for n, _ in report}.isdisjoint({n for n, _ in tune})
    assert any(n.startswith("photo:") for n, _ in report) and all(n.startswith("noise:") for n, _ in tune)

    class Declines:
        def ask(self, image, question, regions=(), max_new_tokens=48):
            return SimpleNamespace(text="I can't tell from this image." if image.ndim == 3 else "phase contrast")

    image, labels = _synthetic()
    result = vqa.run(Declines(), [("synthetic", "fluorescence", "nuclei", "tune", image, labels)],
                     unknown=[("rgb", np.zeros((8, 8, 3), np.uint8)), ("grey", np.zeros((8, 8), np.uint8))])
    unknown = result["overall"]["unknown"]
    assert unknown["training"] == unknown["held_out"] == 0.5 and unknown["n_images"] == 2
    assert result["overall"]["cant_tell_on_microscopy"] == {"training": 0.0, "held_out": 0.0}
    assert "images unlike microscopy" in vqa.table(result)
