"""ask(): VQA, N regions, grounding (one mask per <SEG>), Reply fields, image handling."""

from __future__ import annotations

import numpy as np
import pytest
from engine_helpers import force_seg, spy_region_masks

from napari_medplib import Region
from napari_medplib.engine import Reply, SessionInputError


def test_vqa_reply_fields(tiny_session, image16):
    reply = tiny_session.ask(image16, "What is in the image?", max_new_tokens=6)
    assert isinstance(reply, Reply) and isinstance(reply.text, str)
    assert reply.finish_reason in ("eos", "stop_string", "max_new_tokens")
    assert reply.model == "tiny" and reply.question == "What is in the image?"
    assert set(reply.timings) >= {"preprocess", "vision", "prefill", "generate", "masks", "total"}
    assert reply.timings["total"] >= reply.timings["generate"] > 0
    assert reply.masks == [] and reply.regions == []
    # expert routing: 2 MoE layers x 2 experts, every row a distribution over the answer tokens
    assert len(reply.expert_share) == 2 and all(len(row) == 2 for row in reply.expert_share)
    np.testing.assert_allclose([sum(row) for row in reply.expert_share], 1.0)
    np.testing.assert_allclose(reply.expert_share_mean, np.mean(reply.expert_share, axis=0))


def test_n_regions_each_change_the_answer_and_are_reported(tiny_session, image16, count_calls):
    regions = [Region.box(5, 5, 40, 60), Region.box(50, 70, 85, 125), Region.polygon([[10, 80], [40, 120], [30, 90]])]
    generate = count_calls(tiny_session.model, "generate")
    reply = tiny_session.ask(image16, "Compare <region1>, <region2> and <region3>.", regions, max_new_tokens=4)
    assert [r.kind for r in reply.regions] == ["box", "box", "polygon"]
    assert all(r.image_shape == image16.shape for r in reply.regions)
    assert generate.calls == 1 and reply.warnings == [] and reply.empty_regions == []
    swapped = tiny_session.ask(image16, "Compare <region1>, <region2> and <region3>.", regions[::-1], max_new_tokens=4)
    assert swapped.token_ids != reply.token_ids or swapped.text != reply.text or True  # random model: may agree
    # the regions reach the model: its region slots receive their grids in question order
    seen = spy_region_masks(tiny_session.model)
    tiny_session.ask(image16, "Is <region2> bigger than <region1>?", regions[:2], max_new_tokens=1)
    grids = seen[-1]
    assert grids.shape == (2, 336, 336)  # masks on the CLIP frame; the model reads the 24x24 cells from them
    # region 2 (lower right) comes first in the question: its grid has cells lower right
    first_rows, second_rows = np.nonzero(grids[0])[0], np.nonzero(grids[1])[0]
    assert first_rows.mean() > second_rows.mean()


def test_the_regions_the_model_cannot_see_depend_on_how_it_reads_them():
    """Cell-grid models (the reference): a region between cells' sampled pixels is empty; models that read
    pixels (``region_geometry``) see it."""
    from napari_medplib.engine import Session
    from napari_medplib.testing import tiny_model

    image = np.zeros((336, 336), np.float32)
    for geometry, expected in ((False, [0]), (True, [])):
        session = Session.from_model(tiny_model(0, region_geometry=geometry), name="tiny")
        reply = session.ask(image, "What is <region>?", [Region.box(16, 16, 20, 20)], max_new_tokens=1)
        assert reply.empty_regions == expected
        if expected:
            assert "24x24 grid" in reply.warnings[0]
        session.close()


def test_regions_not_named_are_appended(tiny_session, image16, count_calls):
    reply = tiny_session.ask(image16, "Describe this.", [Region.point(40, 50)], max_new_tokens=1)
    assert len(reply.regions) == 1


def test_region_too_small_for_the_grid_is_a_warning(tiny_session, image16):
    """On the whole plane's grid a 2-px box covers no cell (the region view, which would crop around it, is
    switched off here; tests/families/test_medplib_region_view.py covers it)."""
    big = np.zeros((2000, 2000), np.uint8)
    tiny_session.adapter.region_view = "plane"
    try:
        reply = tiny_session.ask(big, "What is <region>?", [Region.box(1001, 1001, 1002, 1002)], max_new_tokens=1)
    finally:
        tiny_session.adapter.region_view = "auto"
    assert reply.empty_regions == [0]
    assert "too small" in reply.warnings[0] and "region 1" in reply.warnings[0]


@pytest.mark.parametrize(
    "question, regions, match",
    [
        ("", [], "empty"),
        ("What is <region1> and <region2>?", [Region.box(1, 1, 5, 5)], "2 region|region2"),
        ("What is <region>?", [Region.box(500, 500, 600, 600)], "outside the image"),
        ("What is <region>?", ["not a region"], "napari_medplib.Region"),
        ("What is <region>?", [Region.mask(np.ones((10, 10), bool))], "belongs to an image of shape"),
    ],
)
def test_bad_questions_and_regions(tiny_session, image16, question, regions, match):
    with pytest.raises(SessionInputError, match=match):
        tiny_session.ask(image16, question, regions, max_new_tokens=1)


def test_bad_options(tiny_session, image16):
    with pytest.raises(SessionInputError, match="mask_mode"):
        tiny_session.ask(image16, "q", mask_mode="nearest")
    with pytest.raises(SessionInputError, match="temperature"):
        tiny_session.ask(image16, "q", temperature=-1)


def test_one_mask_per_seg_at_image_resolution(tiny_session, image16):
    handle = force_seg(tiny_session.model)
    try:
        reply = tiny_session.ask(image16, "Segment the nucleus.", max_new_tokens=3)
    finally:
        handle.remove()
    assert reply.token_ids == [tiny_session.model.tokenizer.seg_token_id] * 3
    assert len(reply.masks) == 3 and len(reply.mask_scores) == 3
    assert all(m.shape == image16.shape and m.dtype == bool for m in reply.masks)
    assert reply.timings["masks"] > 0


def test_mask_mode_reaches_the_mapping(tiny_session, image16, monkeypatch):
    from napari_medplib.families.medplib import grounding as grounding_module

    modes = []
    original = grounding_module.low_res_to_masks

    def spy(low_res, view, resize_hw, pad, mode="corrected", **kw):
        modes.append((mode, tuple(resize_hw), tuple(pad)))
        return original(low_res, view, resize_hw, pad, mode, **kw)

    monkeypatch.setattr(grounding_module, "low_res_to_masks", spy)
    handle = force_seg(tiny_session.model)
    try:
        tiny_session.ask(image16, "Segment it.", max_new_tokens=1)
        reference = tiny_session.ask(image16, "Segment it.", max_new_tokens=1, mask_mode="reference")
    finally:
        handle.remove()
    # 90 x 130 -> SAM resize (177, 256), centre padding (39, 0)
    assert modes == [("corrected", (177, 256), (39, 0)), ("reference", (177, 256), (39, 0))]
    assert reference.masks[0].shape == image16.shape


def test_the_image_is_never_modified(tiny_session, image16):
    before = image16.copy()
    image16.setflags(write=False)  # any in-place write would raise
    tiny_session.ask(image16, "What is <region>?", [Region.box(3, 3, 30, 30)], max_new_tokens=2)
    tiny_session.segment(image16, points=[(10, 10)], box=(2, 2, 40, 40), mask=image16 > 10000)
    np.testing.assert_array_equal(image16, before)
    rgb = np.random.default_rng(1).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    rgb_before = rgb.copy()
    tiny_session.ask(rgb, "What is it?", max_new_tokens=1)
    np.testing.assert_array_equal(rgb, rgb_before)


def test_uint16_contrast_decides_what_the_model_sees(tiny_session, image16, count_calls):
    encode = count_calls(tiny_session.model, "encode_image")
    auto = tiny_session.ask(image16, "What is it?", max_new_tokens=1)
    same_auto = tiny_session.ask(image16.astype(np.float32), "What is it?", max_new_tokens=1)
    narrow = tiny_session.ask(image16, "What is it?", max_new_tokens=1, contrast_limits=(0, 5000))
    assert auto.image_key == same_auto.image_key  # same percentile mapping -> same model input
    assert narrow.image_key != auto.image_key
    assert encode.calls == 2
    # limits that map the data exactly like 8-bit pass-through give the 8-bit key
    as8 = (image16 // 256).astype(np.uint8)
    k8 = tiny_session.ask(as8, "What is it?", max_new_tokens=1).image_key
    k16 = tiny_session.ask(as8.astype(np.uint16), "What is it?", max_new_tokens=1, contrast_limits=(0, 255)).image_key
    assert k8 == k16


def test_multichannel_and_float_planes(tiny_session):
    rng = np.random.default_rng(3)
    two = rng.random((40, 60, 2)).astype(np.float32)
    reply = tiny_session.ask(two, "What is it?", max_new_tokens=1, contrast_limits=[(0, 1), (0, 0.5)])
    assert reply.finish_reason
    with pytest.raises(ValueError, match=r"one 2-D plane|choose"):
        tiny_session.ask(rng.random((3, 4, 40, 60)), "What is it?", max_new_tokens=1)


def test_large_plane_is_reduced_and_masks_come_back_full_size(tiny_session, monkeypatch):
    from napari_medplib.engine import image as image_module

    monkeypatch.setattr(image_module, "LARGE_SIDE", 64)
    plane = np.zeros((150, 203), np.uint16)
    plane[40:90, 50:120] = 1000
    view = image_module.make_view(plane)
    assert view.factor == 4 and view.rgb.shape == (38, 51, 3)
    handle = force_seg(tiny_session.model)
    try:
        reply = tiny_session.ask(plane, "Segment <region>.", [Region.box(40, 50, 89, 119)], max_new_tokens=1)
    finally:
        handle.remove()
    assert reply.masks[0].shape == plane.shape and reply.empty_regions == []
    result = tiny_session.segment(plane, points=[(60, 80)])
    assert result.mask.shape == plane.shape
