"""Region prompts for <SEG> masks (our ``seg_region_prompts`` extension): pairing, decoding, the flag."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medplib.model.seg_prompts import (
    SegRegionPrompt,
    decode_seg_with_regions,
    pair_with_segs,
)
from napari_medplib.testing import tiny_model

BOX = SegRegionPrompt(box=(10.0, 20.0, 40.0, 60.0))
POINT = SegRegionPrompt(point=(70.0, 30.0))


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3, seg_region_prompts=True).eval()


def test_a_prompt_is_a_box_or_a_point():
    with pytest.raises(ValueError, match="either a box or a point"):
        SegRegionPrompt()
    with pytest.raises(ValueError, match="either a box or a point"):
        SegRegionPrompt(box=(0, 0, 1, 1), point=(0, 0))
    mask = np.zeros((50, 50), bool)
    mask[5:9, 12:30] = True
    assert SegRegionPrompt.from_mask(mask) == SegRegionPrompt(box=(5.0, 12.0, 8.0, 29.0))
    assert SegRegionPrompt.from_mask(np.zeros((4, 4), bool)) is None


def test_pairing_rules():
    assert pair_with_segs(2, [BOX]) == [BOX, BOX]  # one region: every <SEG> is about it
    assert pair_with_segs(2, [BOX, POINT]) == [BOX, POINT]  # k-th mask, k-th region
    assert pair_with_segs(3, [BOX, POINT]) == [None, None, None]  # unknown pairing
    assert pair_with_segs(1, []) == [None]


@torch.no_grad()
def test_mixed_prompts_decode_like_one_by_one(model):
    sam = model.sam
    embeddings = sam.encode_image(torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0)))
    seg = torch.randn(3, sam.config.prompt_embed_dim, generator=torch.Generator().manual_seed(1))
    hw, resize, pad = (100, 200), (128, 256), (64, 0)
    low_res, iou = decode_seg_with_regions(sam, embeddings, seg, [POINT, None, BOX], hw, resize, pad)
    assert low_res.shape == (3, 1, 64, 64) and iou.shape == (3, 1)
    for i, region in enumerate([POINT, None, BOX]):
        alone, alone_iou = decode_seg_with_regions(sam, embeddings, seg[i : i + 1], [region], hw, resize, pad)
        torch.testing.assert_close(low_res[i], alone[0])
        torch.testing.assert_close(iou[i], alone_iou[0])
    text_only, _ = sam.decode_with_text_prompt(embeddings, seg)
    torch.testing.assert_close(low_res[1], text_only[1])  # no region: MedPLIB's path exactly
    assert not torch.allclose(low_res[0], text_only[0], atol=1e-4)  # the point reaches the decoder
    assert not torch.allclose(low_res[2], text_only[2], atol=1e-4)  # the box too
    with pytest.raises(ValueError, match="2 region prompts"):
        decode_seg_with_regions(sam, embeddings, seg, [BOX, BOX], hw, resize, pad)


def test_text_prompt_rejects_misshapen_boxes_and_points(model):
    sam = model.sam
    embeddings = torch.zeros(1, sam.config.prompt_embed_dim, *(sam.config.image_embedding_size,) * 2)
    seg = torch.zeros(2, sam.config.prompt_embed_dim)
    with pytest.raises(ValueError, match="boxes must be"):
        sam.decode_with_text_prompt(embeddings, seg, boxes=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="points must be"):
        sam.decode_with_text_prompt(embeddings, seg, points=torch.zeros(2, 2), point_labels=torch.ones(2, 1))
    with pytest.raises(ValueError, match="together"):
        sam.decode_with_text_prompt(embeddings, seg, points=torch.zeros(2, 1, 2))


@torch.no_grad()
def test_ground_uses_regions_only_when_the_model_was_trained_with_them(model):
    plain = tiny_model(seed=3).eval()  # the same weights, flag off (a released checkpoint)
    assert not plain.config.seg_region_prompts
    pixels = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    seg_hidden = torch.randn(1, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    kwargs = {"resize_hw": (128, 256), "original_hw": (100, 200)}
    with_box = model.ground(seg_hidden, pixels, regions=[BOX], **kwargs).mask_logits
    without = model.ground(seg_hidden, pixels, **kwargs).mask_logits
    assert not torch.allclose(with_box, without, atol=1e-4)
    ignored = plain.ground(seg_hidden, pixels, regions=[BOX], **kwargs).mask_logits
    torch.testing.assert_close(ignored, plain.ground(seg_hidden, pixels, **kwargs).mask_logits)
    torch.testing.assert_close(ignored, without)  # same weights: the flag alone decides


def test_the_flag_round_trips_through_config_json(tmp_path):
    from napari_medplib.model.medplib import MedPLIBModel
    from napari_medplib.testing import make_tiny_model_folder

    assert MedPLIBModel.from_pretrained(make_tiny_model_folder(tmp_path / "on", seg_region_prompts=True)).config.seg_region_prompts
    assert not MedPLIBModel.from_pretrained(make_tiny_model_folder(tmp_path / "off")).config.seg_region_prompts
