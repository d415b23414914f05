"""Decoding loop: greedy/sampled choice, eos, stop strings, streaming of multi-byte text, cancellation,
and the hidden states kept for <SEG> grounding."""

from __future__ import annotations

import threading

import pytest
import torch

from napari_medplib.model.generation import (
    GenerationConfig,
    IncrementalDecoder,
    generate_tokens,
    select_next_token,
)
from napari_medplib.testing import reference_fixture_dir

FIXTURE = reference_fixture_dir()


def test_greedy_and_nucleus_selection():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    assert select_next_token(logits, 0.0, 1.0, None) == 1
    g = torch.Generator().manual_seed(0)
    assert {select_next_token(logits, 1.0, 0.01, g) for _ in range(20)} == {1}  # top_p keeps the top token only
    draws = {select_next_token(logits, 1.0, 1.0, g) for _ in range(200)}
    assert {1, 2} <= draws
    a = [select_next_token(logits, 0.7, 0.9, torch.Generator().manual_seed(5)) for _ in range(5)]
    b = [select_next_token(logits, 0.7, 0.9, torch.Generator().manual_seed(5)) for _ in range(5)]
    assert a == b
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0.0)


def _chars_model(script: list[int], vocab: int = 8):
    """A fake model emitting ``script`` greedily; hidden state = index of the step."""
    calls = []

    def logits_for(step: int) -> torch.Tensor:
        out = torch.zeros(vocab)
        out[script[step]] = 1.0
        return out

    def step(token: int):
        calls.append(token)
        return logits_for(len(calls)), torch.full((3,), float(len(calls)))

    return step, logits_for(0), torch.zeros(3), calls


ALPHABET = {3: "a", 4: "b", 5: "#", 6: " ", 7: "c"}


def _decode(ids):
    return "".join(ALPHABET.get(i, "") for i in ids)


def test_eos_stops_and_is_not_in_ids():
    step, logits, hidden, calls = _chars_model([3, 4, 2, 7])
    result = generate_tokens(step, logits, hidden, _decode, GenerationConfig(max_new_tokens=10))
    assert result.ids == [3, 4] and result.all_ids == [3, 4, 2]
    assert result.finish_reason == "eos" and result.text == "ab"
    assert calls == [3, 4]  # eos is never fed back
    assert result.step_hidden[:, 0].tolist() == [0.0, 1.0, 2.0]  # state that predicted each id


def test_stop_string_is_cut_and_never_streamed():
    step, logits, hidden, _ = _chars_model([3, 5, 5, 4, 5, 5, 5, 7, 7])
    pieces: list[str] = []
    cfg = GenerationConfig(max_new_tokens=20, stop_strings=["###"])
    result = generate_tokens(step, logits, hidden, _decode, cfg, stream=pieces.append)
    assert result.finish_reason == "stop_string"
    assert result.text == "a##b"
    assert "".join(pieces) == "a##b"  # the held-back '#'s were released once they were not a stop


def test_max_new_tokens_and_cancellation():
    step, logits, hidden, calls = _chars_model([3] * 50)
    result = generate_tokens(step, logits, hidden, _decode, GenerationConfig(max_new_tokens=4))
    assert result.ids == [3, 3, 3, 3] and result.finish_reason == "max_new_tokens"
    assert len(calls) == 3  # no wasted forward after the last token

    stop = threading.Event()
    step, logits, hidden, calls = _chars_model([3] * 50)
    seen: list[str] = []

    def stream(piece: str) -> None:
        seen.append(piece)
        if len(seen) == 3:
            stop.set()

    result = generate_tokens(step, logits, hidden, _decode, GenerationConfig(max_new_tokens=40), stream, stop)
    assert result.finish_reason == "cancelled" and len(result.ids) == 3
    counter = iter(range(100))
    result = generate_tokens(step, logits, hidden, _decode, GenerationConfig(max_new_tokens=40), should_stop=lambda: next(counter) >= 2)
    assert result.finish_reason == "cancelled" and len(result.ids) == 2


@pytest.fixture(scope="module")
def tokenizer():
    from napari_medplib.model.tokenizer import MedPLIBTokenizer

    assert FIXTURE.is_dir(), f"reference fixture not found at {FIXTURE} (set MEDPLIB_TINY_REF)"
    return MedPLIBTokenizer.from_pretrained(FIXTURE)


def test_streaming_waits_for_complete_utf8_characters(tokenizer):
    text = "Zelle µm → ü <SEG> ok"
    ids = tokenizer.encode(text, add_bos=False)
    assert any(3 <= i < 259 for i in ids)  # byte-fallback pieces are involved
    decoder = IncrementalDecoder(tokenizer.decode)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids).strip()


@pytest.fixture(scope="module")
def model():
    from napari_medplib.model.medplib import MedPLIBModel

    assert FIXTURE.is_dir(), f"reference fixture not found at {FIXTURE} (set MEDPLIB_TINY_REF)"
    return MedPLIBModel.from_pretrained(FIXTURE)


def _prompt(model):
    from napari_medplib.model.tokenizer import format_question, get_template, tokenize_prompt

    question, _ = format_question("Where is the nucleus?")
    prompt = get_template("v1").build_prompt([(question, None)])
    return torch.tensor(tokenize_prompt(prompt, model.tokenizer))


def test_step_hidden_states_match_a_teacher_forced_forward(model):
    """The state kept for token j is the final-norm state of the position that predicted it."""
    ids = _prompt(model)
    pixels = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    result = model.generate(ids, pixels, max_new_tokens=5)
    full = torch.cat([ids, torch.tensor(result.ids[:-1])])[None]
    with torch.no_grad():
        out = model(full, pixels)
    start = int(out.position_map[0, len(ids) - 1])  # ASSISTANT ':' predicts the first new token
    torch.testing.assert_close(result.step_hidden, out.hidden_states[0, start : start + 5], rtol=1e-4, atol=1e-4)
    assert result.expert_counts.shape == (4, 2) and int(result.expert_counts.sum()) == 4 * 5


def test_sampling_is_reproducible_with_a_seed(model):
    ids = _prompt(model)
    pixels = torch.zeros(1, 3, 336, 336)
    features = model.encode_image(pixels)
    runs = [model.generate(ids, image_features=features, max_new_tokens=6, temperature=0.8, top_p=0.9, seed=7).ids for _ in range(2)]
    assert runs[0] == runs[1]
    other = model.generate(ids, image_features=features, max_new_tokens=6, temperature=5.0, seed=8).ids
    assert other != runs[0]


def test_prefix_cache_reuse_gives_the_same_answer(model):
    ids = _prompt(model)
    pixels = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(1))
    split = int((ids == model.tokenizer.token_to_id("<im_end>")).nonzero()[0]) + 1
    prefix = model.prefill(ids[:split], pixels)
    assert prefix.length == split - 1 + 576
    plain = model.generate(ids, pixels, max_new_tokens=4, return_step_logits=True)
    for _ in range(2):  # the prefix is not consumed by a use
        reused = model.generate(ids, prefix=prefix, max_new_tokens=4, return_step_logits=True)
        assert reused.ids == plain.ids
        torch.testing.assert_close(reused.step_logits, plain.step_logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="cached prefix"):
        model.generate(torch.cat([ids[:3], ids[4:]]), prefix=prefix, max_new_tokens=2)


def test_seg_hidden_positions_rules(model):
    seg = model.tokenizer.seg_token_id
    ids = torch.tensor([1, 5, -200, 7, seg, 8, seg, 9])
    pmap = torch.tensor([0, 1, 2, 578, 579, 580, 581, 582])
    assert model.seg_hidden_positions(ids, pmap, seg) == [578, 580]
    assert model.seg_hidden_positions(ids, pmap, seg, rule="reference") == [578]
    one = torch.tensor([1, 5, -200, 7, seg, 8, 9])
    assert model.seg_hidden_positions(one, pmap[:7], seg, rule="reference") == [580]  # the reference's hidden[-2]
    assert model.seg_hidden_positions(one, pmap[:7], seg) == [578]


def test_answer_seg_hidden_picks_the_predicting_states(model):
    from napari_medplib.model.generation import GenerationResult

    seg = model.tokenizer.seg_token_id
    hidden = torch.arange(4.0)[:, None].expand(4, 3)
    result = GenerationResult(ids=[5, seg, 6, seg], text="", finish_reason="eos", step_hidden=hidden)
    assert model.answer_seg_hidden(result)[:, 0].tolist() == [1.0, 3.0]
