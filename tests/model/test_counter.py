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


def test_heatmap_shape_and_count_tokens():
    model = tiny_model(count_nouns=NOUNS)
    counter = model.counter
    assert isinstance(counter, ObjectCounter)
    heat = counter.heatmap(torch.randn(2, 3, 336, 336))
    assert heat.shape == (2, 2, 336 // COUNT_STRIDE, 336 // COUNT_STRIDE)
    tokens = counter.tokens(torch.tensor([[0, 3], [3, 1000]]))
    assert tokens.shape == (2, 2, model.config.hidden_size)
    assert torch.allclose(tokens[0, 1], tokens[1, 0] - counter.noun_embed[0] + counter.noun_embed[1])  # same count 3
    expected = counter.noun_embed[1] + counter.count_embed.weight[model.config.count_max]
    assert torch.allclose(tokens[1, 1], expected)  # 1000 objects read as count_max


@torch.no_grad()
def test_count_tokens_follow_the_image_tokens_and_change_the_answer():
    plain, counting = tiny_model(), tiny_model(count_nouns=NOUNS)
    assert plain.counter is None
    pixels = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    assert plain.encode_image(pixels).image_tokens.shape[1] == 576
    features = counting.encode_image(pixels)
    assert features.image_tokens.shape[1] == 576 + len(NOUNS)
    _, counts = counting.counter(pixels)
    assert torch.equal(features.image_tokens[0, 576:], counting.counter.tokens(counts)[0])
    ids = torch.tensor([1, 5, -200, 7, 9])
    out = counting(ids, image_features=features)
    assert out.hidden_states.shape[1] == len(ids) - 1 + 576 + len(NOUNS)
    other = features.image_tokens.clone()
    other[0, 576:] = counting.counter.tokens(counts + 1)[0]
    moved = counting(ids, image_features=type(features)(features.patch_features, other))
    assert not torch.allclose(moved.hidden_states[0, -1], out.hidden_states[0, -1])  # the LLM reads them


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
def test_counts_need_no_gradient_but_tokens_train(dtype):
    model = tiny_model(count_nouns=NOUNS).to(dtype)
    tokens, counts = model.counter(torch.randn(1, 3, 336, 336, dtype=dtype))
    assert counts.dtype == torch.long and tokens.requires_grad and tokens.dtype == dtype


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
