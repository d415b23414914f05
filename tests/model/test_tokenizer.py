"""Tokenizer (reference-exact slow LLaMA behaviour) and conversation templates."""

from __future__ import annotations

import json

import pytest

from napari_medplib.model.config import CheckpointError
from napari_medplib.model.tokenizer import (
    MEDPLIB_ADDED_TOKENS,
    MedPLIBTokenizer,
    format_question,
    get_template,
    tokenize_prompt,
)
from napari_medplib.testing import reference_fixture_dir

FIXTURE = reference_fixture_dir()


@pytest.fixture(scope="module")
def tok() -> MedPLIBTokenizer:
    assert FIXTURE.is_dir(), f"reference fixture not found at {FIXTURE} (set MEDPLIB_TINY_REF)"
    return MedPLIBTokenizer.from_pretrained(FIXTURE)


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    return json.loads((FIXTURE / "cases.json").read_text())["cases"]


def test_special_token_ids_follow_reference_order(tok):
    spec = json.loads((FIXTURE / "cases.json").read_text())["special_token_ids"]
    for token, idx in spec.items():
        assert tok.token_to_id(token) == idx
    import sentencepiece

    base = sentencepiece.SentencePieceProcessor(model_file=str(FIXTURE / "tokenizer.model")).get_piece_size()
    assert len(tok) == base + 267
    assert [tok.id_to_token(base + i) for i in range(len(MEDPLIB_ADDED_TOKENS))] == MEDPLIB_ADDED_TOKENS
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)


def test_fixture_prompts_and_tokens(tok, cases):
    for case in cases:
        assert tokenize_prompt(case["prompt"], tok) == case["input_ids"], case["name"]
        pieces = [p for p in case["input_tokens"] if not p.startswith("<IMAGE") and not p.startswith("<REGION")]
        assert ["<s>", *tok.tokenize(case["prompt"].replace("<image>", ""))] == pieces, case["name"]


def test_decode_matches_reference_text(tok, cases):
    for case in cases:
        assert tok.decode(case["generated_ids"]).strip() == case["generated_text"], case["name"]


def test_whitespace_next_to_added_tokens_is_stripped(tok):
    assert tok.encode("a <SEG> b", add_bos=False) == tok.encode("a<SEG>b", add_bos=False)
    # ... but not next to </s>: the text after it keeps its own dummy prefix and spaces.
    assert tok.encode("a</s> b", add_bos=False)[:2] == [*tok.encode("a", add_bos=False), 2]
    assert tok.encode("x")[0] == 1 and tok.encode("x", add_bos=False)[0] != 1


def test_decode_keeps_added_tokens_with_spaces_and_drops_bos_eos(tok):
    ids = [1, *tok.encode("hello", add_bos=False), tok.seg_token_id, *tok.encode("there", add_bos=False), 2]
    assert tok.decode(ids) == "hello <SEG> there"
    assert tok.decode(ids, skip_special_tokens=False).startswith("<s>")


def test_utf8_characters_round_trip_through_byte_pieces(tok):
    text = "µm → Zellkern ü"
    assert tok.decode(tok.encode(text)) == text


def test_two_regions_get_their_own_slots_in_order(tok):
    question, order = format_question("Compare <region2> with <region1>.", num_regions=2)
    prompt = get_template("medplib_v1").build_prompt([(question, None)])
    ids = tokenize_prompt(prompt, tok)
    assert order == [1, 0]
    assert ids.count(-200) == 1 and ids.count(-300) == 2
    region_open, region_close = tok.token_to_id("<region>"), tok.token_to_id("</region>")
    for slot in [i for i, t in enumerate(ids) if t == -300]:
        assert ids[slot - 1] == region_open and ids[slot + 1] == region_close
    assert ids.index(-200) < ids.index(-300)


def test_bare_region_tags_and_unmentioned_regions(tok):
    text, order = format_question("Is <region> bigger than <region>?", num_regions=3)
    assert order == [0, 1, 2]
    assert text.count("<region></region>") == 3
    assert text.startswith("<im_start><image><im_end>\n")
    with pytest.raises(ValueError, match="region"):
        format_question("What is <region3>?", num_regions=2)
    with pytest.raises(ValueError, match="more <region> tags"):
        format_question("<region> and <region>", num_regions=1)


def test_templates_and_multi_turn(tok):
    v1, human = get_template("v1"), get_template("medplib_v1")
    assert "curious user" in v1.system and "curious human" in human.system
    prompt = v1.build_prompt([("Q1", "A1"), ("Q2", None)])
    assert prompt.endswith("USER: Q1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:")
    assert 2 in tokenize_prompt(prompt, tok)  # the </s> separator is the eos id
    with pytest.raises(ValueError, match="unknown conversation template"):
        get_template("chatml")


def test_missing_tokenizer_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"tokenizer\.model"):
        MedPLIBTokenizer.from_pretrained(tmp_path)


def test_encode_question_matches_the_fixture_and_handles_history(tok, cases):
    from napari_medplib.model.tokenizer import encode_question

    case = next(c for c in cases if "region" in c)
    ids, order = encode_question(tok, case["question"], num_regions=1, template=case["template"])
    assert ids == case["input_ids"] and order == [0]
    history = [("What is <region1>?", "A cell.")]
    ids2, order2 = encode_question(tok, "And <region2>?", num_regions=3, history=history)
    # earlier turns keep their slots; region 3, never named, is appended to the current question
    assert ids2.count(-200) == 1 and ids2.count(-300) == 3 and order2 == [0, 1, 2]
    assert ids2.index(-200) < ids2.index(-300)
    assert ids2.count(2) == 1  # the finished turn ends with </s>


def test_a_corrupt_tokenizer_file_is_a_checkpoint_error(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00not a sentencepiece model" * 20)
    with pytest.raises(CheckpointError, match=r"not a SentencePiece model.*re-download"):
        MedPLIBTokenizer.from_pretrained(tmp_path)
