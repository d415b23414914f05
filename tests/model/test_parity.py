"""End-to-end parity with the reference outputs in shared/fixtures/medplib-tiny-ref (see its README).

Every case is loaded from the fixture folder with our own loader and every recorded array is
reproduced within the README's "Recommended tolerances" (ids, routing and greedy tokens exactly).
The fixture must be present (it is in CI): its absence is a failure, not a skip.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_medplib.testing import reference_fixture_dir

FIXTURE = reference_fixture_dir()
TOL = 1e-4


def _cases() -> list[dict]:
    assert FIXTURE.is_dir(), f"reference fixture not found at {FIXTURE} (set MEDPLIB_TINY_REF)"
    return json.loads((FIXTURE / "cases.json").read_text())["cases"]


CASES = _cases()
CASE_IDS = [c["name"] for c in CASES]


@pytest.fixture(scope="module")
def model():
    from napari_medplib.model.medplib import MedPLIBModel

    return MedPLIBModel.from_pretrained(FIXTURE, dtype=torch.float32)


@pytest.fixture(scope="module")
def prompt_outputs(model):
    """Prompt forward of every case (computed once)."""
    outputs = {}
    for case in CASES:
        expected = _expected(case)
        masks = [torch.from_numpy(expected["region_mask_24"])[None]] if "region_mask_24" in expected else None
        with torch.no_grad():
            outputs[case["name"]] = model(
                torch.from_numpy(expected["input_ids"])[None],
                torch.from_numpy(expected["clip_pixel_values"])[None],
                region_masks=masks,
            )
    return outputs


def _expected(case: dict) -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "cases" / case["name"] / "expected.npz") as data:
        return dict(data)


def _max_diff(actual: torch.Tensor, expected: np.ndarray) -> float:
    return float((actual.detach().float().cpu() - torch.from_numpy(expected).float()).abs().max())


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_prompt_ids_are_exact(model, case):
    from napari_medplib.model.tokenizer import format_question, get_template, tokenize_prompt

    expected = _expected(case)
    question, order = format_question(case["question"], num_regions=1 if "region" in case else 0)
    prompt = get_template(case["template"]).build_prompt([(question, None)])
    assert prompt == case["prompt"]
    assert order == ([0] if "region" in case else [])
    assert tokenize_prompt(prompt, model.tokenizer) == expected["input_ids"].tolist()
    if "tf_input_ids" in expected:
        assert tokenize_prompt(case["teacher_forced_prompt"], model.tokenizer) == expected["tf_input_ids"].tolist()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_prompt_forward(prompt_outputs, case):
    expected = _expected(case)
    out = prompt_outputs[case["name"]]
    assert out.hidden_states.shape[1] == case["expanded_length"]
    assert _max_diff(out.image_features.patch_features[0], expected["clip_patch_features"]) <= TOL
    assert _max_diff(out.image_features.image_tokens[0], expected["image_tokens"]) <= TOL
    if "region_features" in expected:
        assert _max_diff(out.region_features[0], expected["region_features"]) <= TOL
        assert not out.region_empty[0].any()
        region_slot = int(np.flatnonzero(expected["input_ids"] == -300)[0])
        assert int(out.position_map[0, region_slot]) == case["region_token_position"]
    positions = torch.from_numpy(expected["logits_positions"]).long()
    assert _max_diff(out.logits[0, positions], expected["logits"]) <= TOL
    assert _max_diff(out.hidden_states[0, positions], expected["final_hidden"]) <= TOL
    router_logits = torch.stack([r.router_logits for r in out.routing])  # [layers, L, E]
    assert _max_diff(router_logits, expected["moe_router_logits"]) <= TOL
    experts = torch.stack([r.expert_ids[:, 0] for r in out.routing])
    np.testing.assert_array_equal(experts.numpy(), expected["moe_expert"])
    gate_probs = torch.stack([r.gate_probs[:, 0] for r in out.routing])
    assert _max_diff(gate_probs, expected["moe_gate_prob"]) <= TOL


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_greedy_generation(model, case):
    expected = _expected(case)
    masks = [torch.from_numpy(expected["region_mask_24"])[None]] if "region_mask_24" in expected else None
    pieces: list[str] = []
    result = model.generate(
        torch.from_numpy(expected["input_ids"]),
        torch.from_numpy(expected["clip_pixel_values"])[None],
        region_masks=masks,
        max_new_tokens=len(expected["generated_ids"]),
        return_step_logits=True,
        stream=pieces.append,
    )
    assert result.ids == expected["generated_ids"].tolist()
    assert _max_diff(result.step_logits, expected["generated_step_logits"]) <= TOL
    assert result.text == case["generated_text"]
    assert "".join(pieces) == result.text
    assert result.finish_reason == "max_new_tokens"


GROUNDING = [c for c in CASES if "answer" in c]


@pytest.mark.parametrize("case", GROUNDING, ids=[c["name"] for c in GROUNDING])
@torch.no_grad()
def test_grounding_reference_mode(model, case):
    expected = _expected(case)
    tf_ids = torch.from_numpy(expected["tf_input_ids"])[None]
    out = model(tf_ids, torch.from_numpy(expected["clip_pixel_values"])[None])
    seg_id = model.tokenizer.seg_token_id
    positions = model.seg_hidden_positions(tf_ids, out.position_map, seg_id, rule="reference")
    assert positions == [int(expected["seg_hidden_position"])]
    assert model.seg_hidden_positions(tf_ids, out.position_map, seg_id) == positions  # the answer ends with <SEG>
    seg_hidden = out.hidden_states[0, positions]
    assert _max_diff(seg_hidden[0], expected["seg_hidden_state"]) <= TOL

    sam_pixels = torch.from_numpy(expected["sam_pixel_values"])[None]
    assert _max_diff(model.sam.encode_image(sam_pixels)[0], expected["sam_image_embedding"]) <= TOL
    result = model.ground(
        seg_hidden, sam_pixels, tuple(expected["sam_resize_hw"]), tuple(expected["original_hw"]), mode="reference"
    )
    assert _max_diff(result.prompt_embeddings[0], expected["seg_prompt_embedding"]) <= TOL
    assert _max_diff(result.low_res_logits[0, 0], expected["low_res_mask_logits"]) <= TOL
    assert _max_diff(result.iou_predictions[0], expected["iou_prediction"]) <= TOL
    assert _max_diff(result.mask_logits[0], expected["mask_logits"]) <= TOL
    differing = (result.masks[0].numpy() != expected["pred_mask"].astype(bool)).mean()
    assert differing <= 1e-3


@torch.no_grad()
def test_region_features_from_precomputed_tokens_match(model, prompt_outputs):
    """Passing cached image features and region tokens gives the same logits as from pixels."""
    case = next(c for c in CASES if "region" in c)
    expected = _expected(case)
    reference = prompt_outputs[case["name"]]
    again = model(
        torch.from_numpy(expected["input_ids"])[None],
        image_features=reference.image_features,
        region_features=reference.region_features,
        logits_positions=slice(-1, None),
    )
    assert _max_diff(again.logits[0, -1], reference.logits[0, -1].numpy()) <= 1e-5


@torch.no_grad()
def test_bf16_on_cpu_stays_close(prompt_outputs):
    """bf16 is not bit-comparable (see the fixture README); check it loosely."""
    from napari_medplib.model.medplib import MedPLIBModel

    model16 = MedPLIBModel.from_pretrained(FIXTURE, dtype="bfloat16", load_sam=False)
    case = CASES[0]
    expected = _expected(case)
    out = model16(torch.from_numpy(expected["input_ids"])[None], torch.from_numpy(expected["clip_pixel_values"])[None])
    reference = prompt_outputs[case["name"]]
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()
    cosine = torch.nn.functional.cosine_similarity(out.logits[0, -1], reference.logits[0, -1], dim=0)
    assert cosine > 0.98
    agree = torch.stack([(a.expert_ids == b.expert_ids).float().mean() for a, b in zip(out.routing, reference.routing, strict=True)])
    assert agree.mean() > 0.9


@pytest.mark.gpu
@torch.no_grad()
def test_cuda_reproduces_the_reference():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from napari_medplib.model.medplib import MedPLIBModel

    model = MedPLIBModel.from_pretrained(FIXTURE, device="cuda")
    for case in CASES:
        expected = _expected(case)
        masks = [torch.from_numpy(expected["region_mask_24"])[None]] if "region_mask_24" in expected else None
        pixels = torch.from_numpy(expected["clip_pixel_values"])[None].cuda()
        out = model(torch.from_numpy(expected["input_ids"])[None], pixels, region_masks=masks)
        positions = torch.from_numpy(expected["logits_positions"]).long()
        assert _max_diff(out.logits[0, positions], expected["logits"]) <= 2e-3
        experts = torch.stack([r.expert_ids[:, 0] for r in out.routing]).cpu()
        assert (experts.numpy() == expected["moe_expert"]).mean() > 0.999
        result = model.generate(torch.from_numpy(expected["input_ids"]), pixels, region_masks=masks, max_new_tokens=16)
        assert result.ids == expected["generated_ids"].tolist()
        if "tf_input_ids" in expected:
            tf_ids = torch.from_numpy(expected["tf_input_ids"])[None]
            tf_out = model(tf_ids, pixels)
            seg = tf_out.hidden_states[0, model.seg_hidden_positions(tf_ids, tf_out.position_map, model.tokenizer.seg_token_id)]
            grounding = model.ground(
                seg, torch.from_numpy(expected["sam_pixel_values"])[None].cuda(), tuple(expected["sam_resize_hw"]),
                tuple(expected["original_hw"]), mode="reference",
            )
            differing = (grounding.masks[0].cpu().numpy() != expected["pred_mask"].astype(bool)).mean()
            assert differing <= 1e-3
