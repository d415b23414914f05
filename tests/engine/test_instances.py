"""instances.py: seeds, NMS, label assembly from per-seed logits, tiles merged without seam duplicates."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medplib.engine import instances as inst


def discs(shape, centres, radius):
    """A label image of discs 1..n (later discs win where they overlap)."""
    labels = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for i, (cy, cx) in enumerate(centres, start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = i
    return labels


def best_iou(labels, truth):
    """For every true object, the best IoU of any predicted label."""
    out = []
    for t in range(1, truth.max() + 1):
        true = truth == t
        ids = np.unique(labels[true])
        ious = [((labels == i) & true).sum() / ((labels == i) | true).sum() for i in ids if i]
        out.append(max(ious, default=0.0))
    return np.array(out)


# touching pairs and a chain: the necks are narrower than the discs
CENTRES = [(40, 40), (40, 58), (100, 60), (118, 70), (180, 180), (180, 198), (198, 189), (60, 200)]
TRUTH = discs((256, 256), CENTRES, 10)


def oracle_logits(seeds, truth, low=64):
    """What a perfect SAM says for a point: +6 on the low-res cells of the object under it, -6 elsewhere."""
    h, w = truth.shape
    out = []
    for y, x in seeds:
        obj = truth == truth[int(round(y)), int(round(x))]
        share = obj.reshape(low, h // low, low, w // low).mean(axis=(1, 3))
        out.append(np.where(share > 0.5, 6.0, -6.0).astype(np.float32))
    return np.stack(out)


def test_distance_seeds_give_one_seed_per_touching_disc():
    seeds = inst.distance_seeds(TRUTH > 0, diameter=20)
    owners = TRUTH[np.rint(seeds[:, 0]).astype(int), np.rint(seeds[:, 1]).astype(int)]
    assert sorted(owners.tolist()) == list(range(1, len(CENTRES) + 1))
    assert inst.distance_seeds(np.zeros((8, 8), bool)).shape == (0, 2)


def test_nms_removes_duplicates_and_keeps_the_better_score():
    a = np.zeros((4, 16, 16), bool)
    a[0, 2:8, 2:8] = True
    a[1, 2:8, 3:8] = True  # near duplicate of 0
    a[2, 10:14, 10:14] = True
    keep = inst.nms(a, [0.5, 0.9, 0.7, 0.1])  # mask 3 is empty
    assert keep.tolist() == [1, 2]


def test_touching_discs_become_exactly_n_labels():
    seeds = inst.distance_seeds(TRUTH > 0, diameter=20)
    seeds = np.concatenate([seeds, seeds[:2] + 1.0])  # duplicate seeds in two objects
    logits = oracle_logits(seeds, TRUTH)
    scores = np.linspace(0.9, 0.5, len(seeds))
    geometry = inst.LogitGeometry((256, 256), (256, 256), (0, 0))
    labels = inst.assemble_labels(logits, scores, seeds, geometry, TRUTH > 0, min_area=20)
    assert labels.dtype == np.int32 and labels.max() == len(CENTRES)
    assert set(np.unique(labels).tolist()) == set(range(len(CENTRES) + 1))
    assert (best_iou(labels, TRUTH) > 0.8).all()
    assert not (labels[TRUTH == 0]).any()  # cut to the grounded mask


def test_unseeded_grounded_objects_are_added_and_rims_join_their_object():
    geometry = inst.LogitGeometry((256, 256), (256, 256), (0, 0))
    seeds = np.array([CENTRES[0]], np.float32)
    logits = oracle_logits(seeds, TRUTH)
    labels = inst.assemble_labels(logits, [0.9], seeds, geometry, TRUTH > 0, min_area=20)
    # disc 1 from its seed; disc 2 (touching it, beyond the rim) and the unseeded groups {3, 4}, {5, 6, 7}
    # and {8} as one object per connected piece: splitting needs seeds
    assert labels.max() == 5 and best_iou(labels, TRUTH)[[0, 1, 7]].min() > 0.9


def test_counter_seeds_map_grid_cells_to_image_pixels():
    peaks = np.zeros((84, 84), bool)
    peaks[42, 21] = True  # CLIP-frame pixel (170, 86) of a square image scaled 336/672
    seeds = inst.counter_seeds(peaks, (672, 672))
    assert seeds.shape == (1, 2)
    np.testing.assert_allclose(seeds[0], [(42.5 * 4) * 2 - 0.5, (21.5 * 4) * 2 - 0.5])
    # a wide image is centre-padded: cells in the padding are dropped
    peaks[2, 40] = True
    assert len(inst.counter_seeds(peaks, (100, 400))) == 1


def test_tile_grid_covers_the_plane_with_overlap():
    tiles = inst.tile_grid((700, 500), 256, 64)
    covered = np.zeros((700, 500), int)
    for y0, x0, y1, x1 in tiles:
        assert y1 - y0 <= 256 and x1 - x0 <= 256
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1
    cores = np.zeros((700, 500), int)
    for t in tiles:
        y0, x0, y1, x1 = inst.tile_core(t, tiles, (700, 500))
        cores[y0:y1, x0:x1] += 1
    assert (cores == 1).all()  # cores partition the plane
    with pytest.raises(ValueError, match="overlap"):
        inst.tile_grid((10, 10), 8, 8)


def test_tiles_merge_without_seam_duplicates():
    rng = np.random.default_rng(0)
    centres = [(int(y), int(x)) for y, x in rng.integers(12, 500, size=(40, 2))]
    truth = discs((512, 512), centres, 9)
    from napari_medplib.engine.instances import relabel_sequential

    truth = relabel_sequential(truth, min_area=30)
    tiles = inst.tile_grid((512, 512), 160, 48)
    tile_labels = []
    for y0, x0, y1, x1 in tiles:  # each tile labels what it sees with its own ids
        crop = truth[y0:y1, x0:x1]
        tile_labels.append(((y0, x0, y1, x1), relabel_sequential(crop * 3 + (crop > 0))))
    merged = inst.merge_tiles(tile_labels, (512, 512))
    assert merged.max() == truth.max()
    assert (best_iou(merged, truth) > 0.9).all()


def test_an_object_larger_than_the_overlap_is_joined_across_the_seam():
    truth = np.zeros((300, 300), np.int32)
    truth[100:200, 40:260] = 1  # wider than any tile
    tiles = inst.tile_grid((300, 300), 128, 32)
    merged = inst.merge_tiles([(t, (truth[t[0]:t[2], t[1]:t[3]] > 0).astype(np.int32)) for t in tiles], (300, 300))
    assert merged.max() == 1 and ((merged > 0) == (truth > 0)).all()


def test_fragments_join_the_neighbour_they_touch_most_or_vanish():
    from napari_medplib.engine.instances import absorb_fragments

    labels = np.zeros((40, 60), np.int32)
    labels[5:25, 5:25] = 1  # 400 px
    labels[5:25, 30:50] = 2  # 400 px
    labels[25:28, 10:15] = 3  # a 15-px sliver under object 1 (median area 100: under 25 px): joins it
    labels[30:40, 0:10] = 4  # 100 px: a quarter of the median area or more, an object of its own
    labels[35:37, 55:57] = 5  # 4 px touching nothing: dropped
    out = absorb_fragments(labels, ratio=0.25)
    assert len(np.unique(out)) - 1 == 3
    assert len(np.unique(out[5:28, 5:25])) == 2 and (out[25:28, 10:15] == out[10, 10]).all()
    assert not out[35:37, 55:57].any() and out[35, 5] > 0
    even = np.zeros((10, 30), np.int32)
    even[:, :10], even[:, 10:20], even[:, 20:] = 1, 2, 3  # equal objects: nothing changes
    assert (absorb_fragments(even) == even).all()
