"""``train/augment.realistic``: synthetic samples rescaled, cut at the engine's object scale and changed like
real microscopy; valid samples, reproducible, with the prompted object at the size the engine shows it."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_medplib.engine.scale import MODEL_OBJECT_EXTENT, PROMPT_OBJECT_EXTENT
from napari_medplib.train import augment
from napari_medplib.train.augment import realistic
from napari_medplib.train.synth import STYLES, make_sample


def edge_ids(labels: np.ndarray) -> set[int]:
    return set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])).tolist()) - {0}


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("bit_depth", [8, 16])
def test_realistic_gives_valid_samples(style, bit_depth):
    sample = make_sample(style, 3, bit_depth=bit_depth)
    for seed in range(6):
        out = realistic(sample, np.random.default_rng(seed))
        assert out.image.dtype == np.uint8 and out.labels.dtype == np.int32
        assert out.image.shape[:2] == out.labels.shape and min(out.labels.shape) >= 32
        assert out.image.ndim == 2 or out.image.shape[2] == 3  # one or three channels
        ids = set(np.unique(out.labels).tolist()) - {0}
        assert ids, "an augmented sample keeps at least one instance"
        assert ids == set(out.categories) <= set(sample.categories)
        assert all(out.categories[i] == sample.categories[i] for i in ids)
        assert out.style == sample.style and out.meta["augmented"] == "realistic"
        assert out.meta["seed"] == sample.meta["seed"]
        cut = edge_ids(out.labels)
        assert not cut or cut == ids, "instances cut by the edge are dropped unless none would remain"
    assert "augmented" not in sample.meta  # the input sample is left as it was


def test_realistic_is_deterministic_for_a_generator_seed():
    sample = make_sample("nuclei", 0, bit_depth=16)
    a, b = realistic(sample, np.random.default_rng(7)), realistic(sample, np.random.default_rng(7))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels) and a.categories == b.categories
    others = [realistic(sample, np.random.default_rng(seed)) for seed in (8, 9)]
    assert any(o.image.shape != a.image.shape or not np.array_equal(o.image, a.image) for o in others)


def crop_ratios(sample, extent=None, seeds=range(16)) -> tuple[list[float], list[int]]:
    """Per seed: the median object extent / crop side of ``realistic(sample, rng, extent)``, and the side."""
    ratios, sizes = [], []
    for seed in seeds:
        out = realistic(sample, np.random.default_rng(seed), extent)
        assert out.labels.shape[0] == out.labels.shape[1], "a crop is square"
        sizes.append(out.labels.shape[0])
        extents = [max(s[0].stop - s[0].start, s[1].stop - s[1].start) for s in ndi.find_objects(out.labels) if s]
        ratios.append(np.median(extents) / out.labels.shape[0])
    return ratios, sizes


@pytest.mark.parametrize(("extent", "target"), [
    (None, MODEL_OBJECT_EXTENT), (PROMPT_OBJECT_EXTENT, PROMPT_OBJECT_EXTENT),
])
def test_objects_span_about_the_target_extent_of_the_crop(extent, target):
    """On a large frame (so a crop is always cut), the crop side is about 256 / ``extent`` times the
    objects' extent, as ``Session.segment`` cuts it (the target extent is jittered); the default is the
    synthetic frames' own MODEL_OBJECT_EXTENT, and the engine's PROMPT_OBJECT_EXTENT (48) is asked for."""
    sample = make_sample("nuclei", 1, size=(384, 384))
    ratios, sizes = crop_ratios(sample, extent)
    expected = target / 256
    assert 0.6 * expected < np.median(ratios) < 1.5 * expected
    assert 0.25 * expected < min(ratios) and max(ratios) < 3 * expected
    assert max(sizes) > 2 * min(sizes), "objects are rescaled, so the crops differ in size"


def test_a_larger_extent_cuts_a_tighter_crop_around_the_same_object():
    """Same generator seed = same rescale, object and jitter: only the crop side changes, by about 48 / 28."""
    sample = make_sample("nuclei", 1, size=(512, 512))
    small, small_sizes = crop_ratios(sample, MODEL_OBJECT_EXTENT, range(12))
    large, large_sizes = crop_ratios(sample, PROMPT_OBJECT_EXTENT, range(12))
    assert all(a <= b for a, b in zip(large_sizes, small_sizes, strict=True))
    factor = np.median(np.array(large) / np.array(small))
    assert 0.75 * PROMPT_OBJECT_EXTENT / MODEL_OBJECT_EXTENT < factor < 1.3 * PROMPT_OBJECT_EXTENT / MODEL_OBJECT_EXTENT
    # no extent is the synthetic frames' own: the same sample as asking for MODEL_OBJECT_EXTENT
    a = realistic(sample, np.random.default_rng(3))
    b = realistic(sample, np.random.default_rng(3), MODEL_OBJECT_EXTENT)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)


def test_photometric_changes_include_inverted_polarity():
    """Fluorescence nuclei are bright; some augmented ones are dark on a bright ground (EM, transmitted light)."""
    sample = make_sample("nuclei", 2)
    brighter = []
    for seed in range(30):
        out = realistic(sample, np.random.default_rng(seed))
        grey = out.image.astype(float) if out.image.ndim == 2 else out.image.astype(float).mean(axis=-1)
        brighter.append(np.median(grey[out.labels > 0]) > np.median(grey[out.labels == 0]))
    assert 3 <= sum(not b for b in brighter) <= 20 and sum(brighter) >= 10


def test_drop_cut_removes_edge_instances_unless_none_would_remain():
    labels = np.zeros((20, 20), np.int32)
    labels[0:4, 5:9] = 1  # touches the top edge
    labels[8:12, 8:12] = 2  # inside
    labels[15:20, 15:20] = 3  # touches the bottom-right corner
    kept = augment._drop_cut(labels)
    assert set(np.unique(kept).tolist()) == {0, 2} and np.array_equal(kept == 2, labels == 2)
    only_cut = np.where(labels == 2, 0, labels)
    assert np.array_equal(augment._drop_cut(only_cut), only_cut)


@pytest.mark.parametrize("extent", [0, 0.0, -PROMPT_OBJECT_EXTENT])
def test_a_non_positive_extent_is_refused(extent):
    """None is the default; 0 or a negative extent would silently cut crops at some other scale."""
    with pytest.raises(ValueError, match="extent must be positive"):
        realistic(make_sample("nuclei", 0), np.random.default_rng(0), extent)


def test_empty_frames_paint_objects_over_and_empty_the_grounding_masks():
    from napari_medplib.train.augment import empty_frame
    from napari_medplib.train.data import synthetic_items

    (sample, conversations), = list(synthetic_items(1, seed=5, n_per_task=2))
    blank, kept = empty_frame(sample, conversations, np.random.default_rng(0))
    assert blank.image.shape == sample.image.shape and blank.image.dtype == sample.image.dtype
    assert blank.labels.max() == 0 and not blank.categories
    objects = sample.labels > 0
    # the objects are gone: their pixels now look like the background around them
    before = sample.image[objects].mean() - sample.image[~objects].mean()
    after = blank.image[objects].mean() - blank.image[~objects].mean()
    assert abs(after) < 0.15 * abs(before)
    grounding = [c for c in conversations if c.task == "grounding" and not c.regions]
    assert grounding and len(kept) == len(grounding)
    for old, new in zip(grounding, kept, strict=True):
        assert new.question == old.question and new.answer == old.answer
        assert len(new.target_masks) == len(old.target_masks) and not any(m.any() for m in new.target_masks)
    again = empty_frame(sample, conversations, np.random.default_rng(0))[0]
    assert np.array_equal(again.image, blank.image)  # deterministic for a seeded generator


def test_empty_frames_keep_rgb_frames_rgb():
    from napari_medplib.train.augment import empty_frame

    sample = make_sample("he", [1, 2])
    blank, kept = empty_frame(sample, [], np.random.default_rng(1))
    assert blank.image.shape == sample.image.shape and blank.image.dtype == np.uint8 and kept == []
