"""Regions as SAM prompts of a <SEG> about them (models trained with ``seg_region_prompts``)."""

from __future__ import annotations

import numpy as np
import pytest
from engine_helpers import force_seg

from napari_medplib import Region
from napari_medplib.engine.prompts import seg_region_prompt
from napari_medplib.model.seg_prompts import SegRegionPrompt


def test_each_region_kind_becomes_a_box_or_a_point():
    assert seg_region_prompt(Region.point(12, 7)) == SegRegionPrompt(point=(12.0, 7.0))
    assert seg_region_prompt(Region.point(12, 7, positive=False)) is None  # not "the object there"
    assert seg_region_prompt(Region.box(30, 40, 5, 8)) == SegRegionPrompt(box=(5.0, 8.0, 30.0, 40.0))
    polygon = Region.polygon([[10, 20], [10, 40], [30, 40], [30, 20]]).with_image_shape((90, 130))
    assert seg_region_prompt(polygon) == SegRegionPrompt(box=tuple(float(v) for v in polygon.bbox))
    mask = np.zeros((90, 130), bool)
    mask[50:60, 3:9] = True
    assert seg_region_prompt(Region.mask(mask)) == SegRegionPrompt(box=(50.0, 3.0, 59.0, 8.0))


@pytest.mark.parametrize("flag", [True, False])
def test_ask_gives_the_question_regions_to_sam_when_the_model_uses_them(flag, image16, monkeypatch):
    from napari_medplib.engine import Session
    from napari_medplib.model.preprocess import image_to_sam_boxes
    from napari_medplib.testing import tiny_model

    session = Session.from_model(tiny_model(seg_region_prompts=flag), name="tiny")
    sam = session.model.sam
    calls = []
    original = sam.decode_with_text_prompt

    def spy(embeddings, prompts, **prompt_kwargs):
        calls.append({k: v for k, v in prompt_kwargs.items() if v is not None})
        return original(embeddings, prompts, **prompt_kwargs)

    monkeypatch.setattr(sam, "decode_with_text_prompt", spy)
    handle = force_seg(session.model)
    try:
        reply = session.ask(image16, "Segment the nucleus in <region>.", [Region.box(3, 3, 30, 30)], max_new_tokens=2)
        no_region = session.ask(image16, "Segment the nuclei.", max_new_tokens=2)
    finally:
        handle.remove()
        session.close()
    assert len(reply.masks) == 2 and len(no_region.masks) == 2
    assert len(calls) == 2 and calls[1] == {}  # no region: MedPLIB's text-only decoding
    if flag:  # both <SEG>s are about the one region, given as SAM's box prompt (90 x 130 -> (177, 256), pad 39)
        expected = image_to_sam_boxes([(3, 3, 30, 30)], image16.shape, (177, 256), (39, 0))
        assert set(calls[0]) == {"boxes"}
        np.testing.assert_allclose(calls[0]["boxes"].numpy(), np.repeat(expected, 2, axis=0), rtol=1e-6)
    else:
        assert calls[0] == {}


@pytest.mark.parametrize("flag", [True, False])
def test_seg_masks_stay_inside_the_box_their_region_gave_sam(flag, image16, monkeypatch):
    """A decoder that paints every pixel: with region prompts a box region's masks are cut to the box;
    a point region's are not; a model without region prompts never saw the box and is not cut."""
    import torch

    from napari_medplib.engine import Session
    from napari_medplib.testing import tiny_model

    session = Session.from_model(tiny_model(seg_region_prompts=flag), name="tiny")
    sam = session.model.sam
    original = sam.decode_with_text_prompt

    def paint(embeddings, prompts, **prompt_kwargs):
        low_res, iou = original(embeddings, prompts, **prompt_kwargs)
        return torch.full_like(low_res, 10.0), iou

    monkeypatch.setattr(sam, "decode_with_text_prompt", paint)
    handle = force_seg(session.model)
    try:
        boxed = session.ask(image16, "Segment the nucleus in <region>.", [Region.box(3, 5, 30, 40)], max_new_tokens=1)
        pointed = session.ask(image16, "Segment the nucleus at <region>.", [Region.point(20, 20)], max_new_tokens=1)
    finally:
        handle.remove()
        session.close()
    inside = np.zeros(image16.shape, bool)
    inside[3:31, 5:41] = True
    assert (boxed.masks[0] == inside).all() if flag else boxed.masks[0].all()
    assert pointed.masks[0].all()
