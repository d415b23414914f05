"""User annotations -> samples and conversations, and clear errors for what cannot be converted."""

import numpy as np
import pytest

from napari_medplib.train.annotations import (
    AnnotationError,
    conversations_from_annotations,
    sample_from_annotations,
)
from napari_medplib.train.synth import make_sample


def two_class_labels():
    """Instance labels: ids 1-3 'cell' squares, ids 7, 9 'bead' discs; plus a grey image."""
    labels = np.zeros((80, 100), np.uint16)
    labels[5:20, 5:20] = 1
    labels[5:20, 30:50] = 2
    labels[40:70, 5:25] = 3
    yy, xx = np.mgrid[:80, :100]
    labels[(yy - 50) ** 2 + (xx - 60) ** 2 < 36] = 7
    labels[(yy - 20) ** 2 + (xx - 80) ** 2 < 25] = 9
    image = (labels > 0).astype(np.uint8) * 150 + 20
    return image, labels, {1: "cell", 2: "cell", 3: "cell", 7: "bead", 9: "bead"}


def test_instance_labels_keep_ids_and_classes():
    image, labels, names = two_class_labels()
    s = sample_from_annotations(image, labels, names, modality="fluorescence microscopy")
    assert s.labels.dtype == np.int32 and np.array_equal(s.labels, labels)
    assert s.categories == names
    assert s.style == "user" and s.meta["modality"] == "fluorescence microscopy"
    t1, t2 = s.meta["size_thresholds"]["cell"]
    assert 225 <= t1 < t2 <= 600  # terciles of the three cell areas (225, 300, 600)
    assert "bead" not in s.meta["size_thresholds"]  # two beads: no terciles


def test_semantic_labels_split_into_connected_instances():
    image, labels, names = two_class_labels()
    semantic = np.where(np.isin(labels, [1, 2, 3]), 1, np.where(labels > 0, 2, 0)).astype(np.uint8)
    s = sample_from_annotations(image, semantic, ["cell", "bead"])
    assert sorted(s.categories.values()) == ["bead", "bead", "cell", "cell", "cell"]
    for i, name in s.categories.items():  # each instance lies within one original object
        originals = np.unique(labels[s.labels == i])
        assert len(originals) == 1 and names[int(originals[0])] == name


def test_conversations_from_annotations_are_consistent_and_reproducible():
    image, labels, names = two_class_labels()
    _s, convs = conversations_from_annotations(image, labels, names, seed=3, n_per_task=4)
    _, again = conversations_from_annotations(image, labels, names, seed=3, n_per_task=4)
    assert [(c.question, c.answer) for c in convs] == [(c.question, c.answer) for c in again]
    assert {c.task for c in convs} == {"grounding", "region_vqa", "vqa"}
    for c in convs:
        assert c.kind not in ("modality", "description"), "not asked unless the user names them"
        if c.kind == "semantic":
            cat = c.meta["categories"][0]
            assert np.array_equal(c.target_masks[0], np.isin(labels, [k for k, v in names.items() if v == cat]))
        if c.kind == "presence":
            assert c.meta["category"] in ("cell", "bead")  # never a synthetic class about real data
        if c.kind == "count" and c.task == "vqa":
            assert c.answer == str(sum(v == c.meta["category"] for v in names.values()))


def test_presence_negatives_come_from_the_vocabulary():
    image, labels, _names = two_class_labels()
    only_cells = np.where(np.isin(labels, [1, 2, 3]), labels, 0)
    cell_names = {1: "cell", 2: "cell", 3: "cell"}
    _, convs = conversations_from_annotations(image, only_cells, cell_names, seed=0, n_per_task=8,
                                              tasks=["vqa"], vocabulary=["cell", "bead"])
    answers = {(c.meta["category"], c.answer) for c in convs if c.kind == "presence"}
    assert answers <= {("cell", "yes"), ("bead", "no")} and answers


@pytest.mark.parametrize(
    ("image_shape", "labels", "names", "message"),
    [
        ((80, 90), None, None, "does not match labels shape"),
        ((3, 80, 100), None, None, "channel axis looks first"),
        ((80, 100), np.zeros((80, 100), int), None, "no objects"),
        ((80, 100), None, {1: "cell", 2: "cell"}, "label ids 3, 7, 9 have no class name"),
        ((80, 100), None, {}, "class_names is empty"),
        ((80, 100), None, {1: "", 2: "c", 3: "c", 7: "b", 9: "b"}, "non-empty string"),
        ((80, 100), None, {1: "<SEG>", 2: "c", 3: "c", 7: "b", 9: "b"}, "special tokens"),
        ((80, 100), np.full((80, 100), 0.5), None, "integer array"),
        ((80, 100), -np.ones((80, 100), int), None, "negative"),
        ((80, 100), np.ones((2, 80, 100), int), None, "one 2-D plane"),
        ((80, 100), None, "cell", "dict"),
    ],
)
def test_bad_annotations_give_clear_errors(image_shape, labels, names, message):
    _, good_labels, good_names = two_class_labels()
    labels = good_labels if labels is None else labels
    names = good_names if names is None else names
    with pytest.raises(AnnotationError, match=message):
        sample_from_annotations(np.zeros(image_shape, np.uint8), labels, names)


def test_semantic_value_beyond_class_list_is_named():
    image, labels, _ = two_class_labels()
    with pytest.raises(AnnotationError, match="values 2 have no class name"):
        sample_from_annotations(image, (labels > 0).astype(int) + np.isin(labels, [7, 9]), ["cell"])


def test_synthetic_sample_round_trips_through_the_converter():
    s = make_sample("he", 4)
    u = sample_from_annotations(s.image, s.labels, s.categories)
    assert np.array_equal(u.labels, s.labels) and u.categories == s.categories
