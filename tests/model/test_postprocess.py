"""Mask post-processing: reference crop parity, and the corrected mode's geometry on non-square images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from napari_medplib.model.postprocess import (
    masks_from_logits,
    postprocess_masks,
    reference_kept_band,
)
from napari_medplib.model.preprocess import centre_pad_offsets, resize_longest_side_hw
from napari_medplib.testing import reference_fixture_dir


def fixture_dir() -> Path:
    path = reference_fixture_dir()
    assert path.is_dir(), f"reference fixture not found at {path} (set MEDPLIB_TINY_REF)"
    return path


def grounding_cases() -> list[dict]:
    cases = json.loads((fixture_dir() / "cases.json").read_text())["cases"]
    found = [c for c in cases if c["kind"] == "grounding"]
    assert len(found) >= 2, "the fixture should have a square and a non-square grounding case"
    return found


GROUNDING = {c["name"]: c for c in grounding_cases()}


@pytest.mark.parametrize("name", sorted(GROUNDING))
def test_reference_mode_matches_fixture(name):
    case = GROUNDING[name]
    expected = np.load(fixture_dir() / "cases" / name / "expected.npz")
    low_res = torch.from_numpy(expected["low_res_mask_logits"])[None, None]  # (1, 1, 64, 64)
    resize_hw = tuple(int(v) for v in expected["sam_resize_hw"])
    original_hw = tuple(int(v) for v in expected["original_hw"])

    logits = postprocess_masks(low_res, resize_hw, original_hw, mode="reference")
    assert logits.shape == (1, *original_hw)
    assert np.abs(logits[0].numpy() - expected["mask_logits"]).max() <= 1e-4

    mask = masks_from_logits(logits, threshold=case["mask_threshold"])[0].numpy()
    np.testing.assert_array_equal(mask, expected["pred_mask"].astype(bool))
    png = np.asarray(Image.open(fixture_dir() / "cases" / name / "pred_mask.png")) > 0
    np.testing.assert_array_equal(mask, png)

    rows, cols = reference_kept_band(resize_hw)
    assert list(rows) == case["postprocess_kept_lowres_rows"]
    assert list(cols) == case["postprocess_kept_lowres_cols"]


def test_reference_band_table():
    # short side at 256 scale -> kept band (reference notes, section (c))
    assert reference_kept_band((256, 191)) == ((0, 64), (0, 64))
    assert reference_kept_band((128, 256)) == ((32, 64), (0, 64))
    assert reference_kept_band((256, 100)) == ((0, 64), (46, 64))
    assert reference_kept_band((256, 50)) == ((0, 64), (7, 57))


def _blob_logits(original_hw, box, input_size=256, low=64):
    """Low-res logits that are +10 where a cell centre maps into ``box`` (y0, x0, y1, x1) of the
    original image, through the real resize and centre padding; -10 elsewhere."""
    resize_hw = resize_longest_side_hw(*original_hw, input_size)
    pad = centre_pad_offsets(resize_hw, input_size)
    stride = input_size / low
    centres = (np.arange(low) + 0.5) * stride  # cell centres in the padded frame
    rows = (centres - pad[0]) * original_hw[0] / resize_hw[0]  # -> original image coordinates
    cols = (centres - pad[1]) * original_hw[1] / resize_hw[1]
    inside = ((rows >= box[0]) & (rows < box[2]))[:, None] & ((cols >= box[1]) & (cols < box[3]))[None, :]
    logits = np.where(inside, 10.0, -10.0).astype(np.float32)
    return torch.from_numpy(logits)[None, None], resize_hw, pad


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.mark.parametrize(
    "original_hw, box",
    [((256, 512), (96, 300, 200, 460)), ((600, 300), (40, 30, 300, 140)), ((333, 700), (250, 10, 330, 200))],
    ids=["wide", "tall", "wide-odd"],
)
def test_corrected_mode_puts_blob_back_in_place(original_hw, box):
    low_res, resize_hw, pad = _blob_logits(original_hw, box)
    truth = np.zeros(original_hw, bool)
    truth[box[0] : box[2], box[1] : box[3]] = True

    corrected = masks_from_logits(postprocess_masks(low_res, resize_hw, original_hw, pad))[0].numpy()
    assert _iou(corrected, truth) > 0.9
    ys, xs = np.nonzero(corrected)
    cell = 4 * max(original_hw) / 256  # one low-res cell in image pixels
    assert abs(ys.mean() - (box[0] + box[2] - 1) / 2) < cell
    assert abs(xs.mean() - (box[1] + box[3] - 1) / 2) < cell

    # the reference crop misregisters the same logits on non-square images
    reference = masks_from_logits(postprocess_masks(low_res, resize_hw, original_hw, mode="reference"))[0].numpy()
    assert _iou(reference, truth) < 0.6


def test_modes_agree_on_square_images():
    generator = torch.Generator().manual_seed(0)
    low_res = torch.randn(3, 1, 64, 64, generator=generator) * 4
    for size in (352, 256, 97):
        reference = postprocess_masks(low_res, (256, 256), (size, size), mode="reference")
        corrected = postprocess_masks(low_res, (256, 256), (size, size), (0, 0))
        assert corrected.shape == reference.shape == (3, size, size)
        assert (corrected - reference).abs().max() <= 1e-5


def test_pad_defaults_to_centre_padding_and_inputs_are_checked():
    low_res = torch.randn(2, 64, 64)  # (N, h, w) accepted too
    hw = resize_longest_side_hw(100, 61, 256)
    with_default = postprocess_masks(low_res, hw, (100, 61))
    explicit = postprocess_masks(low_res, hw, (100, 61), centre_pad_offsets(hw, 256))
    assert torch.equal(with_default, explicit)
    with pytest.raises(ValueError, match="mode"):
        postprocess_masks(low_res, hw, (100, 61), mode="fancy")
    with pytest.raises(ValueError, match="low_res_logits"):
        postprocess_masks(torch.zeros(2, 3, 64, 64), hw, (100, 61))
    with pytest.raises(ValueError, match="threshold"):
        masks_from_logits(low_res, threshold=1.5)


def test_threshold_is_on_sigmoid():
    logits = torch.tensor([-2.3, -2.1, 0.0])  # sigmoid: 0.091, 0.109, 0.5
    assert masks_from_logits(logits).tolist() == [False, True, True]
    assert masks_from_logits(logits, threshold=0.5).tolist() == [False, False, False]


def test_corrected_mode_equals_grid_sample_of_the_same_geometry():
    # independent route: sample the 64x64 map at each output pixel centre with grid_sample
    generator = torch.Generator().manual_seed(1)
    low_res = torch.randn(2, 1, 64, 64, generator=generator) * 4
    original_hw = (333, 700)
    resize_hw = resize_longest_side_hw(*original_hw, 256)
    top, left = centre_pad_offsets(resize_hw, 256)
    ys = ((torch.arange(original_hw[0]) + 0.5) * resize_hw[0] / original_hw[0] + top) / 256 * 2 - 1
    xs = ((torch.arange(original_hw[1]) + 0.5) * resize_hw[1] / original_hw[1] + left) / 256 * 2 - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None].expand(2, -1, -1, -1)
    expected = torch.nn.functional.grid_sample(
        low_res, grid.float(), mode="bilinear", padding_mode="border", align_corners=False
    )[:, 0]
    corrected = postprocess_masks(low_res, resize_hw, original_hw, (top, left))
    assert corrected.shape == (2, *original_hw)
    assert (corrected - expected).abs().max() <= 1e-4
