"""The object counter (our extension): peaks are objects, counts become tokens after the image tokens,
a model without count nouns is unchanged, and the counter's weights survive save and load."""

from __future__ import annotations

import pytest
import torch

from napari_medplib.model.counter import COUNT_STRIDE, ObjectCounter, count_peaks
from napari_medplib.testing import make_tiny_model_folder, tiny_model

NOUNS = ["cells", "nuclei"]


def test_each_peak_above_the_threshold_is_one_object():
    logits = torch.full((1, 2, 12, 12), -6.0)
    for row, col in ((2, 2), (2, 4), (9, 9)):  # two objects two cells apart: still two peaks
        logits[0, 1, row, col] = 3.0
        logits[0, 1, row + 1, col] = 1.0  # a shoulder, not a peak
    logits[0, 0, 6, 6] = -0.5  # a bump below p = 0.5
    peaks = count_peaks(logits, 0.5)
    assert peaks.sum(dim=(-2, -1)).tolist() == [[0, 3]]
    assert peaks[0, 1, 2, 2] and not peaks[0, 1, 3, 2]
    assert count_peaks(logits, 0.3).sum(dim=(-2, -1)).tolist() == [[1, 3]]  # sigmoid(-0.5) = 0.38


def test_heatmap_shape_and_count_tables():
    model = tiny_model(count_nouns=NOUNS)
    counter = model.counter
    assert isinstance(counter, ObjectCounter)
    heat = counter.heatmap(torch.randn(2, 3, 336, 336))
    assert heat.shape == (2, 2, 336 // COUNT_STRIDE, 336 // COUNT_STRIDE)
    with torch.no_grad():
        counter.image_count_embed.normal_()
    bias = counter.image_bias(torch.tensor([[0, 3], [2, 1000]]))
    assert bias.shape == (2, model.config.hidden_size)
    table = counter.image_count_embed
    assert torch.allclose(bias[0], table[0, 0] + table[1, 3])
    assert torch.allclose(bias[1], table[0, 2] + table[1, model.config.count_max])  # 1000 objects read as count_max


@torch.no_grad()
def test_counts_condition_every_image_token_once_trained():
    plain, counting = tiny_model(), tiny_model(count_nouns=NOUNS)
    assert plain.counter is None
    pixels = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    before = plain.encode_image(pixels)
    features = counting.encode_image(pixels)
    assert features.image_tokens.shape == before.image_tokens.shape == (1, 576, counting.config.hidden_size)
    assert features.count_peaks.shape == (1, len(NOUNS), 84, 84)
    assert torch.equal(features.image_tokens, counting.mm_projector(features.patch_features))  # zero tables
    counting.counter.image_count_embed.normal_(generator=torch.Generator().manual_seed(1))
    counted = counting.encode_image(pixels)
    counts = features.count_peaks.sum(dim=(-2, -1))
    expected = features.image_tokens + counting.counter.image_bias(counts)[:, None]
    assert torch.allclose(counted.image_tokens, expected)
    ids = torch.tensor([1, 5, -200, 7, 9])
    out = counting(ids, image_features=counted)
    assert out.hidden_states.shape[1] == len(ids) - 1 + 576
    more = counted.count_peaks.clone()
    more[0, 1, 10:20:3, 10:20:3] = True  # nine more nuclei
    other = counting.image_tokens(counted.patch_features, more)
    moved = counting(ids, image_features=type(counted)(counted.patch_features, other))
    assert not torch.allclose(moved.hidden_states[0, -1], out.hidden_states[0, -1])  # the LLM reads the counts
    with pytest.raises(ValueError, match="count_peaks"):
        counting.image_tokens(counted.patch_features)


def test_the_counter_survives_save_and_load(tmp_path):
    from napari_medplib.model.medplib import MedPLIBModel

    folder = make_tiny_model_folder(tmp_path / "m", count_nouns=NOUNS)
    saved = tiny_model(count_nouns=NOUNS).state_dict()
    loaded = MedPLIBModel.from_pretrained(folder)
    assert loaded.config.count_nouns == NOUNS
    for key, value in saved.items():
        if key.startswith("counter."):
            assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_counts_need_no_gradient_but_the_tables_train(dtype):
    model = tiny_model(count_nouns=NOUNS).to(dtype)
    peaks = model.count_peaks(torch.randn(1, 3, 336, 336, dtype=dtype))
    assert peaks.dtype == torch.bool and not peaks.requires_grad
    tokens = model.image_tokens(torch.randn(1, 576, model.config.mm_hidden_size, dtype=dtype), peaks)
    assert tokens.requires_grad and tokens.dtype == dtype
    tokens.sum().backward()
    assert model.counter.image_count_embed.grad is not None


def test_regions_count_the_centres_inside_them():
    peaks = torch.zeros(2, 84, 84, dtype=torch.bool)
    peaks[1, 10, 10] = peaks[1, 10, 20] = peaks[0, 50, 50] = True
    masks = torch.zeros(2, 336, 336, dtype=torch.uint8)
    masks[0, 36:46, 36:46] = 1  # covers cell (10, 10)'s centre pixel (42, 42) only
    masks[1, 30:90, 30:220] = 1  # (42, 42) and (42, 82) inside; (202, 202) of cell (50, 50) is not
    assert ObjectCounter.region_counts(masks, peaks).tolist() == [[0, 1], [0, 2]]


@torch.no_grad()
def test_region_counts_change_region_tokens_only_once_trained():
    model = tiny_model(count_nouns=NOUNS)
    pixels = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    features = model.encode_image(pixels)
    peaks = torch.zeros(2, 84, 84, dtype=torch.bool)
    peaks[1, 10, 10] = True
    masks = torch.zeros(1, 336, 336, dtype=torch.uint8)
    masks[0, 20:60, 20:60] = 1
    plain, _ = model.encode_regions(features.patch_features[0], masks)
    counted, _ = model.encode_regions(features.patch_features[0], masks, count_peaks=peaks)
    assert torch.equal(plain, counted)  # zero-initialised: as before the counter
    model.counter.region_count_embed[1, 1] = 1.0
    counted, _ = model.encode_regions(features.patch_features[0], masks, count_peaks=peaks)
    assert torch.allclose(counted, plain + 1.0)
