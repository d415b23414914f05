"""Conversations -> teacher-forced ids/labels, region grids and mask targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medplib.model.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, REGION_TOKEN_INDEX
from napari_medplib.model.tokenizer import MedPLIBTokenizer, encode_question
from napari_medplib.train import Conversation, RegionSpec
from napari_medplib.train.batches import (
    BatchError,
    build_sequence,
    collate,
    expand_labels,
    pack_conversations,
    prepare_image,
)
from napari_medplib.train.data import synthetic_items
from napari_medplib.train.recipe import RECIPES_DIR


@pytest.fixture(scope="module")
def tokenizer():
    return MedPLIBTokenizer.from_pretrained(RECIPES_DIR / "tokenizer")


def _mask(hw, rows, cols):
    m = np.zeros(hw, bool)
    m[rows, cols] = True
    return m


def test_first_turn_equals_the_inference_prompt_and_labels_are_the_answer(tokenizer):
    conv = Conversation("What is in <region>?", "nucleus", "region_vqa", "category",
                        [RegionSpec("box", box=(10, 10, 30, 40))], canonical="nucleus")
    seq = build_sequence(tokenizer, [conv], (64, 64))
    prompt, _ = encode_question(tokenizer, conv.question, 1)  # what the engine feeds at inference
    n = len(prompt)
    assert seq.input_ids[:n].tolist() == prompt
    assert (seq.labels[:n] == IGNORE_INDEX).all()
    answer = seq.labels[n:].tolist()
    assert answer[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer[:-1]) == "nucleus"
    assert seq.input_ids[n:].tolist() == answer  # teacher forcing: the labels are the inputs
    assert seq.region_masks.shape == (1, 336, 336) and seq.region_masks.sum() > 0


def test_multi_turn_has_one_image_one_bos_and_masks_in_seg_order(tokenizer):
    hw = (64, 64)
    a, b = _mask(hw, slice(0, 10), slice(0, 10)), _mask(hw, slice(30, 60), slice(5, 50))
    convs = [
        Conversation("Please segment the nuclei.", "It is <SEG>.", "grounding", "semantic", target_masks=[a]),
        Conversation("How many cells are in <region>?", "3", "region_vqa", "count",
                     [RegionSpec("point", point=(40, 20))], canonical="3"),
        Conversation("Segment the nucleus and the cell.", "Sure, <SEG> and <SEG>.", "grounding", "multi",
                     target_masks=[b, a]),
    ]
    seq = build_sequence(tokenizer, convs, hw)
    ids = seq.input_ids.tolist()
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and ids.count(tokenizer.bos_token_id) == 1
    assert ids.count(REGION_TOKEN_INDEX) == 1 and seq.region_masks.shape[0] == 1
    assert ids.count(tokenizer.seg_token_id) == 3
    assert [m.sum() for m in seq.target_masks] == [a.sum(), b.sum(), a.sum()]
    # every label is an answer token or </s>; three answers -> three </s>
    labelled = seq.labels[seq.labels != IGNORE_INDEX].tolist()
    assert labelled.count(tokenizer.eos_token_id) == 3 and labelled.count(tokenizer.seg_token_id) == 3
    assert seq.tasks == ["grounding", "region_vqa", "grounding"]


def test_without_image_tokens_the_image_slot_is_dropped_but_regions_and_answers_stay(tokenizer):
    conv = Conversation("Where in the image is <region>?", "top left", "region_vqa", "position",
                        [RegionSpec("box", box=(2, 2, 12, 12))], canonical="top left")
    with_image = build_sequence(tokenizer, [conv, conv], (64, 64))
    without = build_sequence(tokenizer, [conv, conv], (64, 64), with_image=False)
    assert IMAGE_TOKEN_INDEX in with_image.input_ids.tolist()
    assert IMAGE_TOKEN_INDEX not in without.input_ids.tolist()
    assert without.input_ids.tolist().count(REGION_TOKEN_INDEX) == 2
    torch.testing.assert_close(without.region_masks, with_image.region_masks)
    answers = lambda seq: seq.labels[seq.labels != IGNORE_INDEX].tolist()  # noqa: E731
    assert answers(without) == answers(with_image)


def test_seg_count_mismatch_is_a_clear_error(tokenizer):
    conv = Conversation("Segment it.", "It is <SEG>.", "grounding", "semantic", target_masks=[np.zeros((4, 4), bool)])
    conv.target_masks = []
    with pytest.raises(BatchError, match=r"1 <SEG> token.*0 target mask"):
        build_sequence(tokenizer, [conv], (4, 4))
    with pytest.raises(BatchError, match="at least one"):
        build_sequence(tokenizer, [], (4, 4))


def test_pack_filters_tasks_and_chunks(tokenizer):
    _, convs = next(synthetic_items(1, seed=3, n_per_task=3, size=(64, 64)))
    chunks = pack_conversations(convs, ["vqa", "region_vqa"], 2, np.random.default_rng(0))
    flat = [c for chunk in chunks for c in chunk]
    assert all(len(c) <= 2 for c in chunks)
    assert sorted(id(c) for c in flat) == sorted(id(c) for c in convs if c.task != "grounding")


def test_pack_puts_at_most_one_region_conversation_in_a_sequence(tokenizer):
    _, convs = next(synthetic_items(1, seed=3, n_per_task=4, size=(128, 128)))
    assert sum(bool(c.regions) for c in convs) >= 3
    for turns in (1, 3, 6):
        chunks = pack_conversations(convs, ["vqa", "region_vqa", "grounding"], turns, np.random.default_rng(1))
        assert all(1 <= len(chunk) <= turns for chunk in chunks)
        assert all(sum(bool(c.regions) for c in chunk) <= 1 for chunk in chunks)
        flat = [c for chunk in chunks for c in chunk]
        assert sorted(id(c) for c in flat) == sorted(id(c) for c in convs)


def test_collate_and_expand_labels_put_labels_on_the_expanded_positions(tokenizer):
    sample, convs = next(synthetic_items(1, seed=1, n_per_task=2, size=(64, 64)))
    image = prepare_image(sample)
    assert image.rgb.dtype == np.uint8 and image.clip_pixels.shape == (1, 3, 336, 336)
    seqs = [build_sequence(tokenizer, convs[:1], image.original_hw), build_sequence(tokenizer, convs[:3], image.original_hw)]
    batch = collate(seqs, [image, image], tokenizer.pad_token_id)
    assert batch.input_ids.shape[1] == max(len(s.input_ids) for s in seqs)
    assert batch.attention_mask.sum(1).tolist() == [len(s.input_ids) for s in seqs]
    # position map by hand: every id 1 position, the image 576
    pmap = torch.full(batch.input_ids.shape, -1)
    for b, seq in enumerate(seqs):
        pos, out = 0, []
        for i in seq.input_ids.tolist():
            out.append(pos)
            pos += 576 if i == IMAGE_TOKEN_INDEX else 1
        pmap[b, : len(out)] = torch.tensor(out)
    expanded = expand_labels(batch.labels, pmap, int(pmap.max()) + 1)
    for b, seq in enumerate(seqs):
        kept = expanded[b][expanded[b] != IGNORE_INDEX]
        assert kept.tolist() == seq.labels[seq.labels != IGNORE_INDEX].tolist()


def test_a_seg_about_a_region_carries_that_region_as_its_sam_prompt(tokenizer):
    from napari_medplib.model.seg_prompts import SegRegionPrompt

    hw = (64, 64)
    a, b = _mask(hw, slice(0, 10), slice(0, 10)), _mask(hw, slice(30, 60), slice(5, 50))
    convs = [
        Conversation("Please segment the nucleus in <region>.", "It is <SEG>.", "grounding", "instance",
                     [RegionSpec("point", point=(5, 4))], target_masks=[a]),
        Conversation("Please segment the nuclei.", "It is <SEG>.", "grounding", "semantic", target_masks=[b]),
        Conversation("Segment <region>.", "It is <SEG>.", "grounding", "instance",
                     [RegionSpec("mask", mask=b)], target_masks=[b]),
    ]
    seq = build_sequence(tokenizer, convs, hw)
    assert seq.seg_regions == [SegRegionPrompt(point=(5.0, 4.0)), None, SegRegionPrompt(box=(30.0, 5.0, 59.0, 49.0))]
    batch = collate([seq], [prepare_image(next(synthetic_items(1, seed=0, size=hw))[0])], tokenizer.pad_token_id)
    assert batch.seg_regions == [seq.seg_regions]
