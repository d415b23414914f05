"""Whole-stack grounding: linking objects across planes, one contrast per stack, batched answers."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest
from engine_helpers import force_seg

from napari_medplib.engine.stack import (
    link_planes,
    link_replies,
    reply_instances,
    stack_contrast_limits,
)


def _spheres(shape, spheres):
    """(Z, Y, X) labels: sphere k (centre, radius) -> k + 1."""
    zz, yy, xx = np.indices(shape)
    labels = np.zeros(shape, np.int32)
    for k, ((cz, cy, cx), r) in enumerate(spheres):
        labels[(zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k + 1
    return labels


def _scrambled(volume, seed=0):
    """Per-plane ids that say nothing about the other planes (as a per-plane segmenter gives them)."""
    rng = np.random.default_rng(seed)
    out = np.zeros_like(volume)
    for z, plane in enumerate(volume):
        ids = np.unique(plane[plane > 0])
        new = rng.permutation(len(ids)) + 1 + rng.integers(0, 50)
        for old, n in zip(ids, new, strict=True):
            out[z][plane == old] = n
    return out


def _assert_one_id_per_object(truth, linked):
    seen = {}
    for k in np.unique(truth[truth > 0]):
        ids = np.unique(linked[truth == k])
        assert ids.tolist() != [0] and len(ids) == 1, f"object {k} got ids {ids.tolist()}"
        seen[int(k)] = int(ids[0])
    assert len(set(seen.values())) == len(seen), f"objects share ids: {seen}"


def test_spheres_one_id_each_and_touching_spheres_stay_two():
    truth = _spheres((24, 48, 48), [((6, 12, 12), 5), ((12, 30, 18), 6), ((12, 30, 30), 6), ((16, 12, 36), 4)])
    assert ((truth[12, 30, 23:26] > 0).all()), "the two middle spheres touch"
    linked = link_planes(list(_scrambled(truth)))
    assert linked.shape == truth.shape and linked.dtype == np.int32
    _assert_one_id_per_object(truth, linked)
    assert sorted(np.unique(linked[linked > 0]).tolist()) == [1, 2, 3, 4]


def test_object_that_ends_and_one_that_starts_get_different_ids():
    # the same place, a gap of one plane between them
    truth = _spheres((20, 32, 32), [((4, 16, 16), 3), ((12, 16, 16), 3)])
    linked = link_planes(list(truth > 0))  # bool planes work too
    _assert_one_id_per_object(truth, linked)


def test_link_planes_needs_overlap_above_min_iou():
    a = np.zeros((2, 20, 20), np.int32)
    a[0, 0:10, 0:10] = 1
    a[1, 8:18, 8:18] = 1  # IoU 4 / 196
    assert len(np.unique(link_planes(a, min_iou=0.2))) == 3
    assert len(np.unique(link_planes(a, min_iou=0.0))) == 2
    with pytest.raises(ValueError, match="shape"):
        link_planes([a[0], a[1][:5]])


def test_reply_instances_uses_instances_else_components_and_link_replies_keeps_segs_apart():
    mask = np.zeros((10, 10), bool)
    mask[1:3, 1:3] = mask[6:9, 6:9] = True
    plain = SimpleNamespace(masks=[mask])
    assert reply_instances(plain)[0].max() == 2
    split = np.zeros((10, 10), np.int32)
    split[1:3, 1:3] = 7
    assert reply_instances(SimpleNamespace(masks=[mask], instances=[split]))[0].max() == 7
    other = np.zeros((10, 10), bool)
    other[5, 0:3] = True
    volume = link_replies([SimpleNamespace(masks=[mask, other]), None, SimpleNamespace(masks=[mask])])
    assert volume.shape == (3, 10, 10)
    # <SEG> 1: two objects, new ones after the empty plane (1, 2 then 3, 4); <SEG> 2's are numbered after
    assert np.unique(volume[0]).tolist() == [0, 1, 2, 5]
    assert not volume[1].any()
    assert np.unique(volume[2]).tolist() == [0, 3, 4]


def test_stack_contrast_is_shared_so_an_empty_plane_stays_dark():
    rng = np.random.default_rng(0)
    stack = rng.normal(300, 30, (6, 40, 40)).clip(0).astype(np.uint16)
    stack[2:4, 10:20, 10:20] += 3000
    limits = stack_contrast_limits(stack)
    assert limits[1] > 2000
    from napari_medplib.imaging import to_model_rgb

    assert to_model_rgb(stack[0], limits).mean() < 40  # noise only: dark, as on the other planes
    assert to_model_rgb(stack[0]).mean() > 80  # its own percentiles stretch the noise over the range
    assert stack_contrast_limits(stack.astype(np.uint8)) is None  # 8-bit data passes through


# ---- Session.ask_planes on a tiny random model -------------------------------------------------------
@pytest.fixture
def stack():
    rng = np.random.default_rng(1)
    volume = rng.normal(400, 40, (5, 30, 26)).clip(0).astype(np.uint16)
    volume[1:4, 8:18, 6:16] += 2500
    return volume


def test_ask_planes_gives_the_masks_of_ask_plane_by_plane(tiny_session, stack):
    force_seg(tiny_session.model)
    limits = stack_contrast_limits(stack)
    batched = tiny_session.ask_planes(stack, "Please segment the nucleus.", max_new_tokens=3, batch_size=2)
    tiny_session.clear_cache()
    single = [tiny_session.ask(p, "Please segment the nucleus.", max_new_tokens=3, contrast_limits=limits)
              for p in stack]
    assert len(batched) == len(single) == len(stack)
    for b, s in zip(batched, single, strict=True):
        assert b.text == s.text and b.token_ids == s.token_ids and b.finish_reason == s.finish_reason
        assert b.image_key == s.image_key  # the same contrast: the stack's
        assert len(b.masks) == len(s.masks) == 3
        for mb, ms in zip(b.masks, s.masks, strict=True):
            np.testing.assert_array_equal(mb, ms)
        np.testing.assert_allclose(b.mask_scores, s.mask_scores, atol=1e-5)
        assert b.expert_share_mean == pytest.approx(s.expert_share_mean)


def test_ask_planes_text_answers_match_ask(tiny_session, stack):
    batched = tiny_session.ask_planes(list(stack[:3]), "What is this?", max_new_tokens=5, batch_size=3,
                                      contrast_limits=(0, 4000))
    single = [tiny_session.ask(p, "What is this?", max_new_tokens=5, contrast_limits=(0, 4000)) for p in stack[:3]]
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]


def test_ask_planes_progress_and_cancel(tiny_session, stack):
    seen = []
    replies = tiny_session.ask_planes(stack, "Please segment the nucleus.", max_new_tokens=2, batch_size=2,
                                      on_progress=lambda stage, done, total: seen.append((done, total)))
    assert len(replies) == 5 and seen == [(0, 5), (2, 5), (4, 5), (5, 5)]
    cancel = threading.Event()

    def stop_after_first(stage, done, total):
        if done:
            cancel.set()

    replies = tiny_session.ask_planes(stack, "Please segment the nucleus.", max_new_tokens=2, batch_size=2,
                                      cancel=cancel, on_progress=stop_after_first)
    assert len(replies) == 2


def test_ask_planes_rejects_bad_input(tiny_session, stack):
    from napari_medplib.engine import SessionInputError

    with pytest.raises(SessionInputError, match="stack"):
        tiny_session.ask_planes(stack[0], "Please segment the nucleus.")
    with pytest.raises(SessionInputError, match="batch_size"):
        tiny_session.ask_planes(stack, "Please segment the nucleus.", batch_size=0)


def test_ask_planes_bundled_model_answers_of_different_lengths_match_ask():
    """Rows that finish early leave the batch's KV cache; the others' answers and masks must not change.
    Planes of different synthetic styles get answers of different lengths ("fluorescence microscopy of
    nuclei" vs "phase-contrast microscopy of bacteria"); a grounding question gives masks to compare."""
    from napari_medplib import Session
    from napari_medplib.train.synth import make_sample

    styles = ["nuclei", "brightfield", "bacteria", "em_neurites", "organelles", "nuclei"]
    volume = np.stack([make_sample(style, [3, 4], size=(96, 96), bit_depth=8).image for style in styles])
    with Session.load() as session:
        limits = stack_contrast_limits(volume)
        for question in ("What kind of microscopy is this?", "Please segment the nuclei."):
            batched = session.ask_planes(volume, question, batch_size=6)
            single = [session.ask(p, question, contrast_limits=limits) for p in volume]
            if question.startswith("What"):
                assert len({len(r.token_ids) for r in single}) > 1, "the answers should differ in length"
            else:
                assert all(len(r.masks) == 1 for r in single)
            for b, s in zip(batched, single, strict=True):
                assert b.text == s.text and b.token_ids == s.token_ids
                for mb, ms in zip(b.masks, s.masks, strict=True):
                    np.testing.assert_array_equal(mb, ms)
