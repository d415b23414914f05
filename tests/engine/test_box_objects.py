"""Version-3 region geometry in the engine: a box <region> also tells the model the object in it (SAM's
mask of the box, kept inside it) and how bright the object is against the frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medplib import Region
from napari_medplib.engine import Session
from napari_medplib.testing import tiny_model


def _session(version: int) -> Session:
    model = tiny_model(0, region_geometry=True, region_geometry_version=version, point_region_mask="object")
    return Session.from_model(model, name=f"tiny-v{version}")


def _spy(session: Session) -> list[dict]:
    """What the region encoder receives, per call: masks, object masks, brightness."""
    seen: list[dict] = []
    original = session.model.encode_regions

    def spy(patch_features, region_masks, generator=None, object_masks=None, brightness=None, **kwargs):
        seen.append({"masks": np.asarray(region_masks).copy(),
                     "objects": None if object_masks is None else np.asarray(object_masks).copy(),
                     "brightness": None if brightness is None else brightness.clone()})
        return original(patch_features, region_masks, generator, object_masks, brightness, **kwargs)

    session.model.encode_regions = spy
    return seen


def _fake_box_sam(session: Session, fill: float, calls: list) -> None:
    """SAM's box mask replaced by a known one: +fill on a 16-px-wide low-res band through the box's centre
    that spills past the box on the left and right (SAM frame), so the cut at the box shows."""

    def logits(image_embeddings, boxes_xyxy):
        calls.append(boxes_xyxy.clone())
        out = torch.full((boxes_xyxy.shape[0], 1, 64, 64), -10.0)
        for k, (_x0, y0, _x1, y1) in enumerate(boxes_xyxy.tolist()):
            r = int((y0 + y1) / 8)
            out[k, 0, r - 2 : r + 2, :] = fill  # the whole row band: wider than the box
        return out

    session.model.box_object_logits = logits


def test_a_box_region_reads_sams_object_inside_the_box_and_the_frames_brightness():
    session = _session(3)
    seen, calls = _spy(session), []
    _fake_box_sam(session, 10.0, calls)
    image = np.zeros((100, 200), np.uint16)
    image[40:60, 80:120] = 4000  # a bright object in a dark field; 100 x 200: padding above and below
    try:
        session.ask(image, "How bright is the object in <region>?", [Region.box(30, 70, 70, 130)], max_new_tokens=1)
    finally:
        session.close()
    assert len(calls) == 1  # SAM was asked for the box's object, in its frame (x0, y0, x1, y1) * 256 / 200
    np.testing.assert_allclose(calls[0].numpy(), [[70 * 1.28, 30 * 1.28 + 64, 130 * 1.28, 70 * 1.28 + 64]], atol=1e-3)
    call = seen[-1]
    box, obj = call["masks"][0] > 0, call["objects"][0] > 0
    assert obj.any() and not (obj & ~box).any()  # the band spilled past the box: cut at the box
    assert obj.sum() < 0.5 * box.sum()
    brightness = call["brightness"]
    assert brightness.shape == (336, 336)
    assert torch.isnan(brightness[:50]).all() and torch.isnan(brightness[-50:]).all()  # padding: 84 rows each side
    assert not torch.isnan(brightness[90:246]).any()
    assert float(torch.nanquantile(brightness[84:252].flatten(), 0.99)) > 0.9  # the object is the bright part


@pytest.mark.parametrize(("version", "fill", "region", "expected_calls", "has_object"), [
    (2, 10.0, Region.box(30, 70, 70, 130), 0, False),  # version 2: no object, no brightness
    (3, -10.0, Region.box(30, 70, 70, 130), 1, False),  # SAM finds nothing: the box stands for itself
    (3, 10.0, Region.polygon([[20, 20], [20, 60], [60, 40]]), 0, False),  # only boxes have an object of their own
])
def test_only_boxes_of_version_3_models_get_an_object(version, fill, region, expected_calls, has_object):
    session = _session(version)
    seen, calls = _spy(session), []
    _fake_box_sam(session, fill, calls)
    try:
        session.ask(np.zeros((100, 200), np.float32), "What is <region>?", [region], max_new_tokens=1)
    finally:
        session.close()
    assert len(calls) == expected_calls
    objects = seen[-1]["objects"]
    assert (objects is not None and objects.any()) == has_object
    assert (seen[-1]["brightness"] is not None) == (version == 3)


def test_the_frames_grey_levels_are_sorted_once_per_image():
    """Later questions about the same image reuse the sorted levels kept with its cached features."""
    from napari_medplib.model import medplib

    session = _session(3)
    calls = []
    original = medplib.frame_levels
    medplib.frame_levels = lambda brightness: (calls.append(1), original(brightness))[1]
    try:
        image = np.random.default_rng(0).random((64, 64)).astype(np.float32)
        for question in ("What is <region>?", "How bright is the object in <region>?"):
            session.ask(image, question, [Region.box(10, 10, 30, 30), Region.point(40, 40)], max_new_tokens=1)
    finally:
        medplib.frame_levels = original
        session.close()
    assert len(calls) == 1
