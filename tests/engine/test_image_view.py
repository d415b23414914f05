"""Plane -> model view (key, reduction) and SAM logits -> full-resolution masks (exact, tiled)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medplib.engine.image import low_res_to_masks, make_view
from napari_medplib.model.postprocess import masks_from_logits, postprocess_masks
from napari_medplib.model.preprocess import prepare_sam_image


def _blob_logits(n: int = 2) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    blobs = [8 - ((yy - 20 - 10 * i) ** 2 + (xx - 30) ** 2) / 20 for i in range(n)]
    return torch.stack(blobs)[:, None]  # (n, 1, 64, 64)


@pytest.mark.parametrize("mode", ["corrected", "reference"])
def test_masks_equal_postprocess_and_tiling_changes_nothing(mode):
    plane = np.zeros((90, 130), np.uint8)
    view = make_view(plane)
    sam = prepare_sam_image(view.rgb)
    logits = _blob_logits()
    expected = masks_from_logits(postprocess_masks(logits, sam.resize_hw, (90, 130), pad=sam.pad, mode=mode))
    whole = low_res_to_masks(logits, view, sam.resize_hw, sam.pad, mode)
    tiled = low_res_to_masks(logits, view, sam.resize_hw, sam.pad, mode, tile_bytes=4 * 130 * 7)
    for m, w, t in zip(expected.numpy(), whole, tiled, strict=True):
        np.testing.assert_array_equal(w, m)
        assert (t != m).sum() <= 2  # the same interpolation, band by band (float rounding at the edge)
        assert m.any() and not m.all()


def test_modes_differ_on_non_square_planes():
    view = make_view(np.zeros((90, 130), np.uint8))
    sam = prepare_sam_image(view.rgb)
    corrected = low_res_to_masks(_blob_logits(1), view, sam.resize_hw, sam.pad, "corrected")[0]
    reference = low_res_to_masks(_blob_logits(1), view, sam.resize_hw, sam.pad, "reference")[0]
    assert not np.array_equal(corrected, reference)


def test_view_key_follows_content_not_identity():
    a = np.arange(600, dtype=np.uint8).reshape(20, 30)
    assert make_view(a).key == make_view(a.copy()).key
    b = a.copy()
    b[0, 0] += 1
    assert make_view(b).key != make_view(a).key
    view = make_view(a)
    assert not view.rgb.flags.writeable and view.factor == 1 and view.frame_hw == (20, 30)


def test_large_plane_reduction_keeps_the_frame(monkeypatch):
    from napari_medplib.engine import image as image_module

    monkeypatch.setattr(image_module, "LARGE_SIDE", 100)
    plane = np.full((250, 180), 7, np.uint8)
    before = plane.copy()
    view = image_module.make_view(plane)
    assert view.factor == 3 and view.rgb.shape == (84, 60, 3) and view.frame_hw == (252, 180)
    assert (view.rgb == 7).all()  # 8-bit data keeps pass-through values after the block mean
    np.testing.assert_array_equal(plane, before)
    sam = prepare_sam_image(view.rgb)
    masks = image_module.low_res_to_masks(_blob_logits(1), view, sam.resize_hw, sam.pad)
    assert masks[0].shape == (250, 180)
