"""A box prompt's masks are kept inside the box (``Session.segment(clip_to_box=True)``, the default)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medplib.engine.prompts import box_pixels, keep_inside_box


def test_box_pixels_round_to_the_nearest_pixel_and_stay_in_the_image():
    assert box_pixels((2, 3, 5, 7), (10, 10)) == (slice(2, 6), slice(3, 8))  # inclusive corners
    assert box_pixels((2.4, 2.6, 5.4, 5.6), (10, 10)) == (slice(2, 6), slice(3, 7))  # half a pixel of slack
    assert box_pixels((5, 7, 2, 3), (10, 10)) == (slice(2, 6), slice(3, 8))  # corners in any order
    assert box_pixels((-4, -4, 20, 3), (10, 10)) == (slice(0, 10), slice(0, 4))  # cut to the image


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_keep_inside_box_drops_exactly_the_pixels_outside(kind):
    mask = np.ones((2, 8, 9), bool)
    if kind == "torch":
        mask = torch.from_numpy(mask)
    kept = np.asarray(keep_inside_box(mask, (1, 2, 3, 5)))
    expected = np.zeros((8, 9), bool)
    expected[1:4, 2:6] = True
    assert kept.shape == (2, 8, 9) and (kept == expected).all()
    assert np.asarray(mask).all()  # the input is not changed


def paint_everything(session, monkeypatch):
    """SAM's decoder says "object" at every pixel, for every candidate."""

    def decode(embeddings, points=None, point_labels=None, boxes=None, mask_inputs=None, multimask_output=False):
        k = 3 if multimask_output else 1
        return torch.full((1, k, 64, 64), 10.0), torch.ones(1, k)

    monkeypatch.setattr(session.model.sam, "decode_with_prompts", decode)


def box_mask(shape, box):
    out = np.zeros(shape, bool)
    y0, x0, y1, x1 = box
    out[y0 : y1 + 1, x0 : x1 + 1] = True
    return out


@pytest.mark.parametrize("multimask", [False, True])
def test_segment_keeps_box_masks_inside_the_box(tiny_session, image16, monkeypatch, multimask):
    paint_everything(tiny_session, monkeypatch)
    box = (20, 30, 49, 69)
    result = tiny_session.segment(image16, box=box, multimask=multimask)
    assert all((m == box_mask(image16.shape, box)).all() for m in result.masks)
    raw = tiny_session.segment(image16, box=box, multimask=multimask, clip_to_box=False)
    assert all(m.all() for m in raw.masks)


def test_windowed_box_masks_are_cut_in_image_pixels(tiny_session, monkeypatch):
    """On a large plane the box is moved into the crop for SAM; the cut uses the box in image pixels."""
    paint_everything(tiny_session, monkeypatch)
    image = (np.random.default_rng(0).random((700, 1100)) * 1000).astype(np.uint16)
    box = (300, 850, 379, 949)
    result = tiny_session.segment(image, box=box)
    assert result.window != (0, 0, 700, 1100)  # a crop was used
    assert (result.mask == box_mask(image.shape, box)).all()


def test_points_only_are_not_cut(tiny_session, image16, monkeypatch):
    paint_everything(tiny_session, monkeypatch)
    assert tiny_session.segment(image16, points=[(30, 40)]).mask.all()
