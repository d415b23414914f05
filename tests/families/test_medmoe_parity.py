"""Med-MoE parity with the reference test vectors (``medmoe-tiny-ref``; see its README).

The folder is loaded with our loader, exactly as it is laid out, and every recorded array is reproduced
within the README's tolerances: ids, pixels, expert choices, greedy ids and text exactly, float outputs
within 1e-4. Every dimension is read from the fixture, so another fixture made the same way (other sizes,
other seed) can be pointed to with ``$MEDMOE_TINY_REF``. The fixture must be present: its absence is a
failure, not a skip.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from napari_medplib.families.medmoe import MedMoECheckpointError, detect, medmoe_fixture_dir

FIXTURE = medmoe_fixture_dir()
TOL = 1e-4
PIXEL_TOL = 1e-5


def _cases() -> list[dict]:
    assert FIXTURE.is_dir(), f"Med-MoE reference fixture not found at {FIXTURE} (set MEDMOE_TINY_REF)"
    cases = json.loads((FIXTURE / "cases.json").read_text())["cases"]
    if isinstance(cases, dict):
        cases = [{"name": name, **case} for name, case in cases.items()]
    for case in cases:
        case_file = FIXTURE / "cases" / case["name"] / "case.json"
        if case_file.is_file():
            case.update({k: v for k, v in json.loads(case_file.read_text()).items() if k not in case})
    return cases


CASES = _cases()
CASE_IDS = [c["name"] for c in CASES]


def _expected(case: dict) -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "cases" / case["name"] / "expected.npz") as data:
        return dict(data)


def _image(case: dict) -> np.ndarray:
    """The case image as the reference opens it (``.convert("RGB")``)."""
    return np.asarray(Image.open(FIXTURE / "cases" / case["name"] / "image.png").convert("RGB"))


def _mode(case: dict) -> str:
    return "crop" if case["preprocess"] == "vqa_med" else "pad"


def _max_diff(actual: torch.Tensor, expected: np.ndarray) -> float:
    assert tuple(actual.shape) == tuple(expected.shape), (tuple(actual.shape), expected.shape)
    return float((actual.detach().float().cpu() - torch.from_numpy(expected).float()).abs().max())


@pytest.fixture(scope="module")
def model():
    from napari_medplib.families.medmoe import load

    return load(FIXTURE, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def prompt_outputs(model):
    """Prompt forward of every case, from the recorded ids and pixels (computed once)."""
    outputs = {}
    for case in CASES:
        expected = _expected(case)
        with torch.no_grad():
            ids = torch.from_numpy(expected["input_ids"])[None]
            pixels = torch.from_numpy(expected["pixel_values"])[None]
            features, tokens = model.encode_image(pixels)
            out = model(ids, image_tokens=tokens, output_hidden_states=True)
        outputs[case["name"]] = (features[0], tokens[0], out)
    return outputs


@pytest.fixture(scope="module")
def greedy_outputs(model):
    outputs = {}
    for case in CASES:
        expected = _expected(case)
        outputs[case["name"]] = model.generate_from_ids(
            expected["input_ids"].tolist(), torch.from_numpy(expected["pixel_values"]),
            max_new_tokens=len(expected["generated_ids"]), temperature=0.0, return_step_logits=True,
        )
    return outputs


def test_fixture_is_med_moe():
    assert detect(FIXTURE)


def test_loaded_model_matches_the_reference_load(model):
    """Vocabulary cut to the tokenizer (resize_token_embeddings), MoE layers as configured."""
    vocab = _expected(CASES[0])["logits"].shape[-1]
    assert len(model.tokenizer) == vocab
    assert model.language_model.embed_tokens.weight.shape[0] == vocab
    assert model.language_model.lm_head.weight.shape[0] == vocab
    assert model.language_model.lm_head.bias is None
    expected = _expected(CASES[0])
    assert model.moe_layers_idx == expected["moe_layers"].tolist()
    assert model.capabilities == {"regions": False, "masks": False, "streaming": True, "experts": True}
    for moe in model.language_model.moe_layers():
        assert moe.router.weight.dtype == torch.float32 and moe.router.bias is not None
        assert moe.meta_expert is not None


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_pixels_prompt_and_ids(model, case):
    from napari_medplib.families.medmoe.preprocess import prepare_image

    expected = _expected(case)
    pixel_values, pixels = prepare_image(_image(case), model.processor, _mode(case))
    np.testing.assert_array_equal(pixels, expected["pixel_uint8"])
    assert _max_diff(pixel_values, expected["pixel_values"]) <= PIXEL_TOL
    assert _max_diff(model.prepare_image(_image(case), _mode(case)), expected["pixel_values"]) <= PIXEL_TOL
    prompt = model.build_prompt(case["question"])
    assert prompt == case["prompt"]
    assert model.tokenize_prompt(prompt) == expected["input_ids"].tolist()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_prompt_forward(prompt_outputs, case):
    expected = _expected(case)
    features, tokens, out = prompt_outputs[case["name"]]
    positions = torch.from_numpy(expected["logits_positions"]).long()
    expanded = expected["final_hidden"].shape[0]
    assert out.hidden_states.shape[1] == expanded
    assert out.image_token_start == case.get("image_token_start", out.image_token_start)
    assert _max_diff(features, expected["clip_patch_features"]) <= TOL
    assert _max_diff(tokens, expected["image_tokens"]) <= TOL
    logits = out.logits[0, positions]
    assert _max_diff(logits, expected["logits"]) <= TOL
    assert logits.argmax(-1).tolist() == expected["logits"].argmax(-1).tolist()
    assert _max_diff(out.hidden_states[0], expected["final_hidden"]) <= TOL
    layer_inputs = torch.stack([h[0, positions] for h in out.layer_inputs])
    assert _max_diff(layer_inputs, expected["layer_inputs"]) <= TOL


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_routing(prompt_outputs, case):
    """Router logits (with bias), combine weights (raw top-1 probability) and expert choices per MoE layer."""
    expected = _expected(case)
    out = prompt_outputs[case["name"]][2]
    assert len(out.routing) == len(expected["moe_layers"])
    router_logits = torch.stack([r.router_logits for r in out.routing])
    assert _max_diff(router_logits, expected["moe_router_logits"]) <= TOL
    dense = torch.stack(
        [torch.zeros_like(r.router_logits).scatter(1, r.expert_ids, r.combine_weights) for r in out.routing]
    )
    assert _max_diff(dense, expected["moe_combine_weights"]) <= TOL
    experts = torch.stack([r.expert_ids for r in out.routing])
    np.testing.assert_array_equal(experts.numpy(), expected["moe_experts"].astype(np.int64))
    weights = torch.stack([r.combine_weights for r in out.routing])
    assert _max_diff(weights, expected["moe_expert_weights"]) <= TOL


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_greedy_generation(model, greedy_outputs, case):
    expected = _expected(case)
    result, choices = greedy_outputs[case["name"]]
    assert result.all_ids == expected["generated_ids"].tolist()
    assert result.text == case["generated_text"]
    assert _max_diff(result.step_logits, expected["generated_step_logits"]) <= TOL
    # routing of the fed-back tokens (generation steps 1..T-1), [T-1, n_moe, E] in the fixture
    assert _max_diff(choices.answer_router_logits.permute(1, 0, 2), expected["gen_moe_router_logits"]) <= TOL
    dense = torch.zeros_like(choices.answer_router_logits).scatter(2, choices.answer_experts, choices.answer_weights)
    assert _max_diff(dense.permute(1, 0, 2), expected["gen_moe_combine_weights"]) <= TOL
    reference_choice = torch.from_numpy(expected["gen_moe_combine_weights"]).argmax(-1).permute(1, 0)
    assert torch.equal(choices.answer_experts[..., 0], reference_choice)
    # the prompt part of the report is the prompt forward's routing
    np.testing.assert_array_equal(choices.prompt_experts.numpy(), expected["moe_experts"].astype(np.int64))
    assert choices.counts("answer").sum(1).tolist() == [len(expected["generated_ids"]) - 1] * len(choices.layers)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_generate_from_image_streams_the_reference_answer(model, case):
    """The public entry point: image + question -> the reference's greedy text, streamed piece by piece."""
    expected = _expected(case)
    pieces: list[str] = []
    text, ids, choices = model.generate(
        _image(case), case["question"], max_new_tokens=len(expected["generated_ids"]), on_text=pieces.append,
        image_mode=_mode(case),
    )
    assert ids == expected["generated_ids"].tolist()
    assert text == case["generated_text"]
    assert "".join(pieces).strip() == text
    assert choices.layers == expected["moe_layers"].tolist()


def test_sampling_is_seeded(model):
    case = CASES[0]
    image = _image(case)
    first = model.generate(image, case["question"], max_new_tokens=6, temperature=0.8, seed=3)
    again = model.generate(image, case["question"], max_new_tokens=6, temperature=0.8, seed=3)
    assert first[1] == again[1] and first[0] == again[0]
    assert len(first[1]) <= 6


def test_cached_decoding_matches_one_full_forward(model, greedy_outputs):
    """The KV cache path equals a no-cache forward over prompt + generated ids."""
    case = CASES[0]
    expected = _expected(case)
    result, _ = greedy_outputs[case["name"]]
    ids = torch.tensor([expected["input_ids"].tolist() + result.all_ids[:-1]])
    with torch.no_grad():
        out = model(ids, torch.from_numpy(expected["pixel_values"])[None])
    steps = len(result.all_ids)
    assert _max_diff(out.logits[0, -steps:], result.step_logits.numpy()) <= TOL


# ---------------------------------------------------------------------------- errors
def _copy_fixture(tmp_path: Path) -> Path:
    folder = tmp_path / "medmoe"
    shutil.copytree(FIXTURE, folder, ignore=shutil.ignore_patterns("cases", "cases.json", "README.md"))
    return folder


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith(("model", "pytorch_model")))


def _merged_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint (one file or shards), the weight files removed."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(folder):
        if path.suffix == ".safetensors":
            state.update(load_file(path))
        path.unlink()
    return state


def _tower_dir(folder: Path) -> Path:
    return folder / json.loads((folder / "config.json").read_text())["mm_image_tower"]


def _tokenizer_files() -> list[Path]:
    names = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
             "added_tokens.json")
    return [FIXTURE / n for n in names if (FIXTURE / n).is_file()]


def _error(folder: Path, **kwargs) -> str:
    from napari_medplib.families.medmoe import load

    with pytest.raises(MedMoECheckpointError) as info:
        load(folder, **kwargs)
    return str(info.value)


def test_errors_name_what_is_wrong(tmp_path):
    assert "does not exist" in _error(tmp_path / "nowhere")
    assert not detect(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert "no config.json" in _error(tmp_path / "empty")

    folder = _copy_fixture(tmp_path)
    config = json.loads((folder / "config.json").read_text())

    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llava_phi"}))
    assert not detect(folder)
    assert "not a Med-MoE checkpoint" in _error(folder)

    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "moe"}))
    assert "'moe'" in _error(folder)

    (folder / "config.json").write_text(json.dumps({**config, "moe": {**config["moe"], "top_k_experts": 3}}))
    assert "top_k_experts" in _error(folder)

    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": config["hidden_size"] * 2}))
    assert "wrong shape" in _error(folder)

    (folder / "config.json").write_text(json.dumps({**config, "mm_image_tower": "clip-missing"}))
    message = _error(folder)
    assert "clip-missing" in message and "image_tower" in message

    (folder / "config.json").write_text(json.dumps(config))
    for path in _weight_files(folder):
        path.unlink()
    assert "no weights" in _error(folder)


def test_partial_shards_are_reported(tmp_path):
    from safetensors.torch import save_file

    folder = _copy_fixture(tmp_path)
    state = _merged_state(folder)
    keys = sorted(state)
    half = len(keys) // 2
    save_file({k: state[k] for k in keys[:half]}, folder / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {k: "model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors"
                  for i, k in enumerate(keys)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    message = _error(folder)
    assert "model-00002-of-00002.safetensors" in message and "incomplete" in message

    save_file({k: state[k] for k in keys[half:] if ".mlp.meta_moe." not in k or k.endswith("bias")},
              folder / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    message = _error(folder)
    assert "missing" in message and "meta_expert" in message


def test_tower_weights_fall_back_to_the_checkpoint_copies(tmp_path):
    """A tower folder without weights: the checkpoint's own CLIP copies (bit-identical here) are used."""
    from napari_medplib.families.medmoe import load

    folder = _copy_fixture(tmp_path)
    for path in _weight_files(_tower_dir(folder)):
        path.unlink()
    has_copies = any(k.startswith("model.image_tower.") for k in _merged_state(_copy_fixture(tmp_path / "b")))
    if not has_copies:
        assert "tower" in _error(folder)
        return
    model = load(folder)
    expected = _expected(CASES[0])
    with torch.no_grad():
        features, _ = model.encode_image(torch.from_numpy(expected["pixel_values"])[None])
    assert _max_diff(features[0], expected["clip_patch_features"]) <= TOL


# ---------------------------------------------------------------------------- StableLM base, top-2
def _stablelm_folder(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A tiny StableLM-2 Med-MoE folder in the released layout whose MoE layer reduces to expert 0
    (router bias makes p_0 exactly 1, the meta expert's down_proj is zero), next to the equivalent
    dense transformers ``StableLmForCausalLM``."""
    from safetensors.torch import save_file
    from transformers import StableLmConfig, StableLmForCausalLM

    torch.manual_seed(7)
    hidden, vocab = 32, _expected(CASES[0])["logits"].shape[-1]
    hf = StableLmForCausalLM(StableLmConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, partial_rotary_factor=0.25, layer_norm_eps=1e-5, use_qkv_bias=True,
    )).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            param.normal_(1.0 if name.endswith("layernorm.weight") or name.endswith("norm.weight") else 0.0, 0.2)
    state: dict[str, torch.Tensor] = {}
    for key, value in hf.state_dict().items():
        if key.startswith("model.layers.0.mlp."):
            rest = key[len("model.layers.0.mlp."):]
            state[f"model.layers.0.mlp.deepspeed_moe.experts.deepspeed_experts.0.{rest}"] = value.clone()
            for e in (1, 2, 3):
                state[f"model.layers.0.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.{rest}"] = torch.randn_like(value)
            meta = torch.zeros_like(value) if rest.startswith("down_proj") else torch.randn_like(value)
            state[f"model.layers.0.mlp.meta_moe.{rest}"] = meta
        else:
            state[key] = value.clone()
    state["model.layers.0.mlp.deepspeed_moe.gate.wg.weight"] = torch.zeros(4, hidden)
    state["model.layers.0.mlp.deepspeed_moe.gate.wg.bias"] = torch.tensor([100.0, 0.0, 0.0, 0.0])
    tower = _tower_dir(FIXTURE)
    clip_config = json.loads((tower / "config.json").read_text())
    clip_hidden = clip_config.get("vision_config", clip_config)["hidden_size"]
    state["model.mm_projector.image_spatial_proj.0.weight"] = torch.randn(hidden, clip_hidden) * 0.1
    state["model.mm_projector.image_spatial_proj.0.bias"] = torch.zeros(hidden)
    state["model.mm_projector.image_spatial_proj.2.weight"] = torch.randn(hidden, hidden) * 0.1
    state["model.mm_projector.image_spatial_proj.2.bias"] = torch.zeros(hidden)
    folder = tmp_path / "stablelm-medmoe"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    for path in _tokenizer_files():
        shutil.copy(path, folder / path.name)
    shutil.copytree(tower, folder / "clip")
    config = {  # StableLM-2's own field names (norm_eps, rope_pct), as its remote-code config writes them
        "model_type": "moe_llava_stablelm", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
        "norm_eps": 1e-5, "rope_pct": 0.25, "rope_theta": 10000, "use_qkv_bias": True, "max_position_embeddings": 2048,
        "mm_image_tower": "clip", "mm_hidden_size": clip_hidden, "image_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
        "moe": {"moe_enable": True, "moe_mode": "sparse", "moe_layers_idx": [0], "num_experts": [4], "top_k_experts": 1},
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder, hf


def test_stablelm_base_matches_transformers(tmp_path):
    from napari_medplib.families.medmoe import detect, load

    folder, hf = _stablelm_folder(tmp_path)
    assert detect(folder)
    model = load(folder)
    ids = torch.randint(0, len(model.tokenizer) - 1, (1, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids).logits
    assert ours.routing[0].expert_ids.unique().tolist() == [0]
    assert _max_diff(ours.logits, theirs.numpy()) <= 1e-5
    text, new_ids, choices = model.generate(np.zeros((40, 60), np.uint8), "What is shown?", max_new_tokens=3)
    assert len(new_ids) <= 3 and choices.layers == [0]


def test_top2_routing_renormalises_and_adds_the_meta_expert():
    from napari_medplib.families.medmoe.modeling import MedMoESparseMoE

    torch.manual_seed(0)

    def make() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))

    moe = MedMoESparseMoE(make, 8, num_experts=4, top_k=2).eval()
    moe.generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 10, 8)
    with torch.no_grad():
        y = moe(x)[0]
        record = moe.last_routing
        assert torch.equal(record.expert_ids[:, 0], record.router_logits.argmax(-1))
        assert (record.expert_ids[:, 0] != record.expert_ids[:, 1]).all()
        torch.testing.assert_close(record.combine_weights.sum(-1), torch.ones(10))
        manual = moe.meta_expert(x[0]) + sum(
            record.combine_weights[:, j : j + 1] * torch.stack([moe.experts[int(e)](x[0, t]) for t, e in enumerate(record.expert_ids[:, j])])
            for j in range(2)
        )
    torch.testing.assert_close(y, manual, atol=1e-6, rtol=1e-6)


def test_detect_and_package_import_are_light():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from napari_medplib.families import medmoe\n"
        f"assert medmoe.detect({str(FIXTURE)!r})\n"
        "print(','.join(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
