"""A clicked point as a <region>: MedPLIB's square, or SAM's mask of the clicked object
(``config.point_region_mask = "object"``, our extension)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_helpers import spy_region_masks

from napari_medplib import Region
from napari_medplib.engine import Session
from napari_medplib.testing import tiny_model


def _session(mode: str) -> Session:
    return Session.from_model(tiny_model(0, region_geometry=True, point_region_mask=mode), name="tiny")


def _fake_sam(session: Session, fill: float, calls: list) -> None:
    """SAM's point mask replaced by a known one: +fill in a 6x6 low-res patch around the point (SAM frame)."""

    def logits(image_embeddings, points_xy):
        calls.append(points_xy.clone())
        out = torch.full((points_xy.shape[0], 1, 64, 64), -10.0)
        for k, (x, y) in enumerate(points_xy.tolist()):
            r, c = int(y / 4), int(x / 4)
            out[k, 0, r - 3 : r + 3, c - 3 : c + 3] = fill
        return out

    session.model.point_object_logits = logits


def _square_then_object(fill: float, image: np.ndarray, region: Region):
    """The region masks a square model and an object model (SAM faked, see _fake_sam) give the encoder."""
    square_session, object_session = _session("square"), _session("object")
    try:
        square = spy_region_masks(square_session.model)
        square_session.ask(image, "What is <region>?", [region], max_new_tokens=1)
        objects, calls = spy_region_masks(object_session.model), []
        _fake_sam(object_session, fill, calls)
        reply = object_session.ask(image, "What is <region>?", [region], max_new_tokens=1)
    finally:
        square_session.close()
        object_session.close()
    return square[-1], objects[-1], calls, reply


def test_an_object_point_region_is_the_clicked_objects_mask():
    square, objects, calls, reply = _square_then_object(10.0, np.zeros((200, 200), np.float32), Region.point(100, 60))
    # SAM got the click in its frame: (x, y) = (col, row) * 256 / 200
    np.testing.assert_allclose(calls[0].numpy(), [[60 * 256 / 200, 100 * 256 / 200]], atol=1e-4)
    square_mask, object_mask = square[0] > 0, objects[0] > 0
    # MedPLIB's square: 41x41 image pixels = ~69x69 on the 336 frame; the object: a 6x6 low-res patch
    # (24x24 SAM pixels = ~19x19 image pixels = ~32x32 frame pixels), both around the click
    assert square_mask.sum() > 4000 and 600 < object_mask.sum() < 1400
    rows, cols = np.nonzero(object_mask)
    assert abs(rows.mean() - 100 * 336 / 200) < 6 and abs(cols.mean() - 60 * 336 / 200) < 6
    assert [r.kind for r in reply.regions] == ["point"]  # the reply reports the user's region as drawn


@pytest.mark.parametrize("fill", [-10.0, -1.0])  # -1: p = 0.27, a mask at the reference's 0.1, not an object
def test_where_sam_finds_nothing_the_point_stays_the_square(fill):
    square, objects, calls, _ = _square_then_object(fill, np.zeros((200, 200), np.float32), Region.point(100, 60))
    assert len(calls) == 1
    np.testing.assert_array_equal(objects, square)


@pytest.mark.parametrize(("mode", "region", "expected_calls"), [
    ("square", Region.point(50, 50), 0),  # MedPLIB's behaviour: SAM is not asked
    ("object", Region.point(50, 50, positive=False), 0),  # a background click is not an object
    ("object", Region.box(10, 10, 60, 60), 0),
    ("object", Region.point(50, 50), 1),
])
def test_only_positive_points_of_object_models_ask_sam(mode, region, expected_calls):
    session = _session(mode)
    calls: list = []
    _fake_sam(session, 10.0, calls)
    try:
        session.ask(np.zeros((120, 120), np.float32), "What is <region>?", [region], max_new_tokens=1)
    finally:
        session.close()
    assert len(calls) == expected_calls


def test_object_points_run_through_the_real_sam_on_reduced_planes(monkeypatch):
    """No stand-ins: the tiny random SAM's mask (or the square) reaches the region encoder, on a plane the
    engine reduces (masks come back at image resolution and are read on the reduced plane)."""
    from napari_medplib.engine import image as image_module

    monkeypatch.setattr(image_module, "LARGE_SIDE", 64)
    session = _session("object")
    seen = spy_region_masks(session.model)
    try:
        reply = session.ask(np.random.default_rng(0).random((150, 203)).astype(np.float32), "What is <region>?",
                            [Region.point(70, 90)], max_new_tokens=1)
    finally:
        session.close()
    assert seen[-1].shape == (1, 336, 336) and seen[-1].any() and reply.empty_regions == []


def test_the_option_is_checked_and_saved():
    from napari_medplib.model.config import CheckpointError, MedPLIBConfig

    model = tiny_model(0, point_region_mask="object")
    data = model.config.to_dict()
    assert data["point_region_mask"] == "object"
    assert MedPLIBConfig.from_pretrained_dict(data).point_region_mask == "object"
    del data["point_region_mask"]  # released checkpoints: MedPLIB's square
    assert MedPLIBConfig.from_pretrained_dict(data).point_region_mask == "square"
    with pytest.raises(CheckpointError, match="point_region_mask must be one of square, object"):
        tiny_model(0, point_region_mask="blob")
