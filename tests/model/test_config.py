"""Reading released config.json files: LLaMA/LLaVA fields, the MoE dict, the CLIP tower path."""

from __future__ import annotations

import json

import pytest

from napari_medplib.model.config import CLIP_VIT_L14_336, CheckpointError, MedPLIBConfig, MoEConfig
from napari_medplib.testing import reference_fixture_dir

FIXTURE = reference_fixture_dir()


def released_7b_config(tower: str = "/home/authors/clip-vit-large-patch14-336") -> dict:
    """The released config.json as the reference notes describe it (7B, 32 MoE layers)."""
    return {
        "architectures": ["MedPLIBForCausalLM"], "model_type": "medplib_moe_llama",
        "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_scaling": None,
        "hidden_act": "silu", "vocab_size": 32267, "tie_word_embeddings": False, "bos_token_id": 1,
        "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "bfloat16", "use_cache": False,
        "mm_vision_tower": tower, "vision_tower": tower, "mm_hidden_size": 1024, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_use_im_start_end": True,
        "out_dim": 256, "region_fea_adapter": True, "region_geo_sampler": False, "max_sample_point": 512,
        "moe": {
            "moe_enable": True, "moe_mode": "dense", "moe_layers_idx": list(range(32)), "num_experts": [2] * 32,
            "top_k_experts": 1, "capacity_factor": 1.5, "eval_capacity_factor": 2, "min_capacity": 0,
            "use_residual": False, "ep_size": 1, "router_aux_loss_coef": 0.0, "train_modules": [],
        },
    }


def test_fixture_config():
    assert FIXTURE.is_dir(), f"reference fixture not found at {FIXTURE} (set MEDPLIB_TINY_REF)"
    cfg = MedPLIBConfig.from_pretrained(FIXTURE)
    raw = json.loads((FIXTURE / "config.json").read_text())
    heads = raw["num_attention_heads"]
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (
        raw["hidden_size"], raw["num_hidden_layers"], raw["vocab_size"])
    assert cfg.head_dim == raw["hidden_size"] // heads and cfg.rms_norm_eps == raw["rms_norm_eps"]
    assert cfg.rope_theta == raw.get("rope_theta", 10000.0)
    moe = raw["moe"]
    assert cfg.moe == MoEConfig(
        num_experts=moe["num_experts"][0], top_k=moe["top_k_experts"],
        moe_layers=None if moe["moe_layers_idx"] == list(range(raw["num_hidden_layers"])) else tuple(moe["moe_layers_idx"]),
        capacity_factor=moe["capacity_factor"], eval_capacity_factor=moe["eval_capacity_factor"],
    )
    assert not cfg.moe.renormalize
    # mm_vision_tower "clip" is resolved against the checkpoint folder.
    vision = json.loads((FIXTURE / raw["mm_vision_tower"] / "config.json").read_text())["vision_config"]
    assert cfg.vision_config["hidden_size"] == vision["hidden_size"]
    assert cfg.vision_config["num_hidden_layers"] == vision["num_hidden_layers"]
    assert cfg.num_patches == (vision["image_size"] // vision["patch_size"]) ** 2
    assert cfg.mm_hidden_size == raw["mm_hidden_size"] == vision["hidden_size"]


def test_released_7b_config_with_author_path_falls_back_to_known_clip(tmp_path):
    with pytest.warns(UserWarning, match="ViT-L/14-336"):
        cfg = MedPLIBConfig.from_pretrained_dict(released_7b_config(), tmp_path)
    assert cfg.vision_config == CLIP_VIT_L14_336
    assert cfg.moe.num_experts == 2 and cfg.moe.top_k == 1 and cfg.moe.moe_layers is None


def test_clip_folder_copied_next_to_checkpoint_is_found(tmp_path):
    clip = tmp_path / "clip-vit-large-patch14-336"
    clip.mkdir()
    (clip / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": {**CLIP_VIT_L14_336, "num_hidden_layers": 2}}))
    cfg = MedPLIBConfig.from_pretrained_dict(released_7b_config(), tmp_path)
    assert cfg.vision_config["num_hidden_layers"] == 2


def test_unknown_vision_tower_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"mm_vision_tower.*Fix"):
        MedPLIBConfig.from_pretrained_dict(released_7b_config("/nowhere/my-tower"), tmp_path)


def test_sparse_moe_layers_and_med_moe_options():
    data = released_7b_config()
    data["moe"].update(moe_layers_idx=list(range(0, 32, 2)), num_experts=[4] * 16, top_k_experts=2)
    data["moe"].update(router_bias=True, shared_expert=True)
    with pytest.warns(UserWarning):
        cfg = MedPLIBConfig.from_pretrained_dict(data)
    assert cfg.moe.moe_layers == list(range(0, 32, 2)) and cfg.moe.is_moe_layer(4) and not cfg.moe.is_moe_layer(5)
    assert cfg.moe.top_k == 2 and cfg.moe.renormalize and cfg.moe.router_bias and cfg.moe.shared_expert
    data["moe"]["moe_enable"] = False
    with pytest.warns(UserWarning):
        assert MedPLIBConfig.from_pretrained_dict(data).moe is None


def test_round_trip_through_to_dict():
    with pytest.warns(UserWarning):
        cfg = MedPLIBConfig.from_pretrained_dict(released_7b_config())
    again = MedPLIBConfig.from_pretrained_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.to_dict() == cfg.to_dict()


def test_not_a_medplib_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="not a MedPLIB"):
        MedPLIBConfig.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        MedPLIBConfig.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig.from_released({"num_experts": [2, 2], "top_k_experts": 3}, 2)


@pytest.mark.parametrize("content", ["null", "[1, 2]", '"text"'])
def test_a_config_that_is_not_an_object_is_a_checkpoint_error(tmp_path, content):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match="not an object"):
        MedPLIBConfig.from_pretrained(tmp_path)


def test_a_config_declaring_too_many_layers_is_refused_before_building(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 100_000,
                                                      "vocab_size": 100, "model_type": "llava_llama"}))
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        MedPLIBConfig.from_pretrained(tmp_path)
