"""``napari_medplib.scoring``: Dice, the model-free baselines and instance matching, on hand-made masks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_medplib.scoring import (
    dice,
    ellipse_in_box,
    gray,
    instance_boxes,
    interior_point,
    match_instances,
    otsu_component,
    otsu_split,
    otsu_watershed,
    select_instances,
)


def disc(shape, cy, cx, r) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - cy) ** 2 + (cols - cx) ** 2 <= r * r


def squares(*spans, shape=(30, 60)) -> np.ndarray:
    """A label image with id k+1 on the k-th (y0, x0, y1, x1) half-open span."""
    labels = np.zeros(shape, np.int32)
    for k, (y0, x0, y1, x1) in enumerate(spans, start=1):
        labels[y0:y1, x0:x1] = k
    return labels


# ------------------------------------------------------------------------------------ basics
def test_dice_values():
    a = np.zeros((10, 10), bool)
    a[:, :4] = True
    b = np.zeros((10, 10), bool)
    b[:, 2:6] = True
    assert dice(a, a) == 1.0
    assert dice(a, ~a) == 0.0
    assert dice(a, b) == pytest.approx(0.5)  # 20 shared of 40 + 40
    c = np.zeros((10, 10), bool)
    c[:, :2] = True
    assert dice(a, c) == pytest.approx(2 * 20 / 60)  # a subset: 2|c| / (|a| + |c|)
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0  # both empty
    assert dice(a, np.zeros_like(a)) == 0.0
    assert dice(a.astype(np.uint8) * 7, b) == pytest.approx(0.5)  # any non-zero counts as inside


def test_instance_boxes_are_inclusive_yx():
    labels = np.zeros((20, 30), int)
    labels[2:5, 10:17] = 3
    labels[15, 29] = 7
    assert instance_boxes(labels) == {3: (2, 10, 4, 16), 7: (15, 29, 15, 29)}


def test_interior_point_is_the_deepest_pixel_inside():
    mask = np.zeros((40, 40), bool)
    mask[10:31, 5:16] = True  # 21 x 11 rectangle: the unique deepest pixel is its centre
    assert interior_point(mask) == (20, 10)
    ring = np.zeros((41, 41), bool)
    ring[5:36, 5:36] = True
    ring[12:29, 12:29] = False  # a hollow square: the centre is outside, the answer must not be
    y, x = interior_point(ring)
    assert ring[y, x]
    rod = np.zeros((20, 80), bool)
    rod[8:13, 5:75] = True  # a long ridge: its middle, not one end
    y, x = interior_point(rod)
    assert y == 10 and abs(x - 39.5) <= 0.5
    with pytest.raises(ValueError, match="empty"):
        interior_point(np.zeros((4, 4), bool))


def test_select_instances_subset_is_seeded():
    ids = list(range(1, 101))
    first = select_instances(ids, 10, seed=0)
    assert len(first) == 10 and len(set(first)) == 10 and set(first) <= set(ids) and first == sorted(first)
    assert first == select_instances(ids[::-1], 10, seed=0)
    assert first != select_instances(ids, 10, seed=1)
    assert select_instances([5, 2], 10) == [2, 5]
    assert select_instances(ids, 0) == ids


def test_gray_averages_colour_channels():
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0], rgb[..., 2] = 30, 90
    assert np.array_equal(gray(rgb), np.full((4, 5), 40.0))
    assert gray(np.ones((4, 5), np.uint16)).dtype == np.float64


# ------------------------------------------------------------------------------------ baselines
@pytest.mark.parametrize("box", [(10, 20, 109, 219), (50, 50, 89, 69), (0, 0, 149, 149)])
def test_ellipse_in_box_has_a_quarter_pi_of_the_box(box):
    shape = (160, 260)
    ellipse = ellipse_in_box(box, shape)
    y0, x0, y1, x1 = box
    area = (y1 - y0 + 1) * (x1 - x0 + 1)
    assert ellipse.sum() == pytest.approx(math.pi / 4 * area, rel=0.03)
    inside = np.zeros(shape, bool)
    inside[y0 : y1 + 1, x0 : x1 + 1] = True
    assert not (ellipse & ~inside).any()  # all within the box
    rows, cols = np.nonzero(ellipse)
    assert (rows.min(), cols.min(), rows.max(), cols.max()) == box  # and touching its four sides
    assert np.array_equal(ellipse[y0 : y1 + 1, x0 : x1 + 1], ellipse[y0 : y1 + 1, x0 : x1 + 1][::-1, ::-1])


def two_discs(dark: bool, noise: float = 5.0):
    rng = np.random.default_rng(0)
    shape = (120, 160)
    a, b = disc(shape, 40, 40, 15), disc(shape, 80, 120, 20)
    plane = 20.0 + 180.0 * (a | b) + rng.normal(0, noise, shape)
    return (255.0 - plane if dark else plane), a, b


@pytest.mark.parametrize("dark", [False, True], ids=["bright-on-dark", "dark-on-bright"])
def test_otsu_component_is_the_clicked_piece(dark):
    plane, a, b = two_discs(dark)
    for mask, click in ((a, (40, 40)), (b, (80, 120))):
        piece = otsu_component(plane, click)
        assert dice(piece, mask) > 0.97  # the clicked disc, not the other one
    background = otsu_component(plane, (5, 150))
    assert background[5, 150] and background.sum() > 0.8 * (~(a | b)).sum() and not background[40, 40]
    above, threshold = otsu_split(plane)
    assert np.array_equal(otsu_component(plane, (40, 40), above), otsu_component(plane, (40, 40)))
    ground, objects = sorted((float(np.median(plane[~(a | b)])), float(np.median(plane[a]))))
    assert ground < threshold < objects


def test_otsu_split_of_a_flat_plane_is_empty():
    above, threshold = otsu_split(np.full((10, 10), 3.0))
    assert not above.any() and threshold == 3.0


def test_otsu_watershed_splits_two_touching_discs():
    shape = (100, 140)
    a, b = disc(shape, 50, 50, 20), disc(shape, 50, 86, 20)  # centres 36 apart: a waist 2 x 9 px wide
    rng = np.random.default_rng(1)
    plane = 10.0 + 100.0 * (a | b) + rng.normal(0, 2.0, shape)
    found = otsu_watershed(plane)
    assert found.dtype == np.int32 and set(np.unique(found)) == {0, 1, 2}
    reference = np.where(a & ~b, 1, 0) + np.where(b & ~a, 2, 0)
    reference[a & b] = 1
    result = match_instances(reference, found)
    assert result.true_positives == 2 and result.f1 == 1.0 and result.mean_matched_iou > 0.85
    # dark discs on a bright ground: the minority class is still the objects
    assert match_instances(reference, otsu_watershed(200.0 - plane)).f1 == 1.0
    assert not otsu_watershed(np.full(shape, 5.0)).any()


# ------------------------------------------------------------------------------------ instances
def test_identical_label_images_match_perfectly():
    labels = squares((0, 0, 10, 10), (0, 20, 10, 30), (15, 5, 25, 50))
    result = match_instances(labels, labels)
    assert (result.n_reference, result.n_predicted, result.true_positives) == (3, 3, 3)
    assert result.f1 == 1.0 and result.mean_matched_iou == 1.0 and result.count_error == 0.0
    relabelled = np.where(labels > 0, labels * 7 + 10, 0)  # ids need not be 1..N
    assert match_instances(labels, relabelled).f1 == 1.0


def test_shifted_objects_match_only_above_half_iou():
    reference = squares((0, 0, 10, 10), (15, 30, 25, 40))
    predicted = squares((0, 2, 10, 12), (15, 34, 25, 44))  # shifted 2 px (IoU 80/120) and 4 px (IoU 60/140)
    result = match_instances(reference, predicted)
    assert result.true_positives == 1
    assert result.f1 == pytest.approx(2 * 1 / 4)
    assert result.mean_matched_iou == pytest.approx(80 / 120)
    assert match_instances(reference, predicted, threshold=0.7).true_positives == 0  # 2/3 < 0.7


def test_merged_objects():
    reference = squares((0, 0, 10, 10), (0, 10, 10, 20))  # two touching 10x10 squares
    merged = squares((0, 0, 10, 20))
    result = match_instances(reference, merged)  # IoU exactly 0.5 with each: not a match
    assert (result.n_reference, result.n_predicted, result.true_positives) == (2, 1, 0)
    assert result.f1 == 0.0 and math.isnan(result.mean_matched_iou) and result.count_error == 0.5
    uneven = squares((0, 0, 10, 14), (0, 14, 10, 20))  # 140 + 60 px merged: IoU 0.7 with the larger
    result = match_instances(uneven, merged)
    assert result.true_positives == 1
    assert result.f1 == pytest.approx(2 * 1 / 3) and result.mean_matched_iou == pytest.approx(0.7)


def test_split_objects():
    reference = squares((0, 0, 10, 20))
    halves = squares((0, 0, 10, 10), (0, 10, 10, 20))
    result = match_instances(reference, halves)
    assert (result.true_positives, result.f1, result.count_error) == (0, 0.0, 1.0)
    unequal = squares((0, 0, 10, 16), (0, 16, 10, 20))  # 160 of 200 px: IoU 0.8
    result = match_instances(reference, unequal)
    assert result.f1 == pytest.approx(2 / 3) and result.mean_matched_iou == pytest.approx(0.8)


def test_empty_label_images():
    empty = np.zeros((10, 10), np.int32)
    one = squares((0, 0, 5, 5), shape=(10, 10))
    both = match_instances(empty, empty)
    assert (both.n_reference, both.n_predicted, both.f1, both.count_error) == (0, 0, 1.0, 0.0)
    assert math.isnan(both.mean_matched_iou)
    nothing_found = match_instances(one, empty)
    assert (nothing_found.f1, nothing_found.count_error, nothing_found.n_predicted) == (0.0, 1.0, 0)
    nothing_there = match_instances(empty, one)
    assert nothing_there.f1 == 0.0 and nothing_there.count_error == float("inf")


def test_bad_matching_arguments_are_refused():
    labels = squares((0, 0, 5, 5))
    with pytest.raises(ValueError, match="at least 0.5"):
        match_instances(labels, labels, threshold=0.3)
    with pytest.raises(ValueError, match="differ in shape"):
        match_instances(labels, labels[:, :-1])


def test_heldout_matching_judges_only_what_the_annotation_can():
    from napari_medplib.scoring import heldout_instance_match

    annotated = np.zeros((40, 60), np.int32)
    annotated[2:10, 2:10] = 1  # trained on
    annotated[2:10, 20:28] = 2  # held out
    annotated[20:28, 2:10] = 3  # held out
    predicted = np.zeros_like(annotated)
    predicted[2:10, 2:10] = 7  # the trained object: not judged
    predicted[2:10, 20:28] = 8  # held-out object 2 found
    predicted[20:24, 2:10] = 9  # held-out object 3 half found: a false positive and a miss
    predicted[30:36, 40:46] = 5  # on unannotated pixels: judged only when fully annotated
    partial = heldout_instance_match(annotated, [2, 3], predicted)
    assert (partial.n_reference, partial.n_predicted, partial.true_positives) == (2, 2, 1)
    assert partial.f1 == pytest.approx(0.5)
    full = heldout_instance_match(annotated, [2, 3], predicted, fully_annotated=True)
    assert (full.n_predicted, full.true_positives) == (3, 1) and full.f1 == pytest.approx(2 / 5)
    assert heldout_instance_match(annotated, [2, 3], np.zeros_like(annotated)).f1 == 0.0
