"""The assembled model on a tiny random configuration: N regions, grounding, bf16, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medplib.model.config import tiny_config
from napari_medplib.model.medplib import MedPLIBModel
from napari_medplib.testing import reference_fixture_dir

FIXTURE = reference_fixture_dir()


@pytest.fixture(scope="module")
def model() -> MedPLIBModel:
    from napari_medplib.model.sam import SamMed2D
    from napari_medplib.model.sam_encoder import SamMed2DConfig
    from napari_medplib.model.tokenizer import MedPLIBTokenizer

    assert FIXTURE.is_dir(), f"reference fixture not found at {FIXTURE} (set MEDPLIB_TINY_REF)"
    torch.manual_seed(0)
    sam = SamMed2D.from_config(SamMed2DConfig(
        embed_dim=32, depth=1, num_heads=2, global_attn_indexes=(0,), adapter_hidden=8, decoder_depth=1,
        decoder_mlp_dim=64, iou_head_hidden_dim=32,
    ))
    config = tiny_config(folder=str(FIXTURE))
    return MedPLIBModel.from_config(config, tokenizer=MedPLIBTokenizer.from_pretrained(FIXTURE), sam=sam, seed=1)


def _inputs(model, question: str, num_regions: int):
    from napari_medplib.model.tokenizer import encode_question

    ids, order = encode_question(model.tokenizer, question, num_regions)
    masks = torch.zeros(num_regions, 24, 24, dtype=torch.uint8)
    for r in range(num_regions):
        masks[r, 2 * r : 2 * r + 3, 5:9] = 1
    pixels = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(2))
    return torch.tensor(ids), masks[order], pixels


@torch.no_grad()
def test_two_regions_are_spliced_in_order(model):
    ids, masks, pixels = _inputs(model, "Compare <region2> and <region1>.", 2)
    out = model(ids, pixels, region_masks=[masks])
    assert out.hidden_states.shape[1] == len(ids) - 1 + 576
    slots = (ids == -300).nonzero().flatten()
    tokens, _ = model.encode_regions(out.image_features.patch_features[0], masks)
    embeds, _, pmap = model.build_inputs_embeds(ids[None], out.image_features.image_tokens, [tokens])
    for j, slot in enumerate(slots):
        assert torch.equal(embeds[0, pmap[0, slot]], tokens[j])
    assert not torch.equal(tokens[0], tokens[1])
    swapped = model(ids, pixels, region_masks=[masks.flip(0)], logits_positions=slice(-1, None))
    assert not torch.allclose(swapped.logits[0, -1], out.logits[0, -1])  # the order matters


def test_placeholder_mismatch_is_a_clear_error(model):
    ids, _masks, pixels = _inputs(model, "What is <region>?", 1)
    with pytest.raises(ValueError, match=r"1 region slot.*0 region token"):
        model(ids, pixels, region_features=[torch.zeros(0, 32)])
    with pytest.raises(ValueError, match="clip_pixel_values or image_features"):
        model(ids)


@torch.no_grad()
def test_generate_then_ground_in_both_modes(model):
    ids, _masks, pixels = _inputs(model, "Segment the nucleus.", 0)
    result = model.generate(ids, pixels, max_new_tokens=3)
    assert len(result.ids) == 3 and isinstance(result.text, str)
    seg_hidden = torch.cat([result.step_hidden[:2]])  # any states: exercise the SAM path
    sam_pixels = torch.randn(1, 3, 256, 256)
    for mode in ("corrected", "reference"):
        grounding = model.ground(seg_hidden, sam_pixels, resize_hw=(128, 256), original_hw=(100, 200), mode=mode)
        assert grounding.masks.shape == (2, 100, 200) and grounding.masks.dtype == torch.bool
        assert grounding.prompt_embeddings.shape == (2, 256)
    embeddings = model.sam.encode_image(sam_pixels)
    again = model.ground(seg_hidden, image_embeddings=embeddings, resize_hw=(128, 256), original_hw=(100, 200))
    torch.testing.assert_close(again.mask_logits, model.ground(seg_hidden, sam_pixels, (128, 256), (100, 200)).mask_logits)


@torch.no_grad()
def test_bf16_cast_keeps_router_fp32_and_runs(model, tmp_path):
    from copy import deepcopy

    model16 = deepcopy(model).cast("bfloat16")
    assert model16.dtype == torch.bfloat16
    assert model16.language_model.layers[0].mlp.router.weight.dtype == torch.float32
    ids, masks, pixels = _inputs(model, "What is <region>?", 1)
    result = model16.generate(ids, pixels, region_masks=[masks], max_new_tokens=3)
    assert len(result.ids) == 3 and result.step_hidden.dtype == torch.bfloat16


@torch.no_grad()
def test_our_layout_round_trip_with_sam(model, tmp_path):
    from napari_medplib.model.convert import save_pretrained

    folder = save_pretrained(model, tmp_path / "ours")
    loaded = MedPLIBModel.from_pretrained(folder)
    assert loaded.sam is not None
    ids, masks, pixels = _inputs(model, "What is <region>?", 1)
    a = model(ids, pixels, region_masks=[masks], logits_positions=slice(-1, None)).logits
    b = loaded(ids, pixels, region_masks=[masks], logits_positions=slice(-1, None)).logits
    assert torch.equal(a, b)
    sam_pixels = torch.randn(1, 3, 256, 256)
    np.testing.assert_array_equal(model.sam.encode_image(sam_pixels).numpy(), loaded.sam.encode_image(sam_pixels).numpy())


def test_bad_sam_weights_raise_checkpoint_error(model, tmp_path):
    from safetensors.torch import load_file, save_file

    from napari_medplib.model.config import CheckpointError
    from napari_medplib.model.convert import save_pretrained

    folder = save_pretrained(model, tmp_path / "released", layout="released")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.visual_model.mask_decoder.iou_token.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"visual_model.*iou_token"):
        MedPLIBModel.from_pretrained(folder)
    assert MedPLIBModel.from_pretrained(folder, load_sam=False).sam is None


@torch.no_grad()
def test_empty_region_is_reported_by_generate(model):
    from napari_medplib.model.region_encoder import EmptyRegionWarning

    ids, masks, pixels = _inputs(model, "What are <region1> and <region2>?", 2)
    masks[1] = 0
    with pytest.warns(EmptyRegionWarning, match="region 2"):
        result = model.generate(ids, pixels, region_masks=[masks], max_new_tokens=1)
    assert result.region_empty == [False, True]
