"""Checkpoint loading: released layout (safetensors / .bin shards), key mapping, clear errors, 7B layout."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from napari_medplib.model.checkpoint import CheckpointError, empty_parameters, map_released_key
from napari_medplib.model.config import MedPLIBConfig, MoEConfig
from napari_medplib.model.convert import TOKENIZER_FILES, save_pretrained, to_released_key
from napari_medplib.model.medplib import MedPLIBModel
from napari_medplib.testing import reference_fixture_dir

FIXTURE = reference_fixture_dir()
TINY_CLIP = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "image_size": 336, "patch_size": 14, "projection_dim": 8, "hidden_act": "quick_gelu",
             "layer_norm_eps": 1e-5, "num_channels": 3}


def tiny_model() -> MedPLIBModel:
    cfg = MedPLIBConfig(
        vocab_size=907, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, moe=MoEConfig(num_experts=2, top_k=1), vision_config=dict(TINY_CLIP),
        mm_vision_tower="clip", mm_hidden_size=16, out_dim=16, folder=str(FIXTURE),
    )
    return MedPLIBModel.from_config(cfg, seed=3)


@pytest.fixture(scope="module")
def model() -> MedPLIBModel:
    assert FIXTURE.is_dir(), f"reference fixture not found at {FIXTURE} (set MEDPLIB_TINY_REF)"
    return tiny_model()


def _save(model, folder: Path, **kwargs) -> Path:
    return save_pretrained(model, folder, layout="released", max_shard_bytes=200_000, **kwargs)


def _same_weights(a: MedPLIBModel, b: MedPLIBModel) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_key_mapping():
    assert map_released_key("model.layers.3.mlp.deepspeed_moe.gate.wg.weight") == "language_model.layers.3.mlp.router.weight"
    assert (
        map_released_key("model.layers.0.mlp.deepspeed_moe.experts.deepspeed_experts.1.down_proj.weight")
        == "language_model.layers.0.mlp.experts.1.down_proj.weight"
    )
    assert map_released_key("model.layers.0.mlp.meta_moe.up_proj.weight") == "language_model.layers.0.mlp.shared_expert.up_proj.weight"
    assert map_released_key("model.layers.2.self_attn.rotary_emb.inv_freq") is None
    assert map_released_key("model.visual_model.mask_decoder.iou_token.weight") == "sam.mask_decoder.iou_token.weight"
    assert map_released_key("model.text_hidden_fcs.0.2.bias") == "text_hidden_fcs.2.bias"
    assert map_released_key("model.region_fea_adapter.weight") == "region_encoder.adapter.weight"
    assert map_released_key("lm_head.weight") == "language_model.lm_head.weight"
    for key in ("language_model.layers.1.mlp.experts.0.gate_proj.weight", "mm_projector.2.bias", "text_hidden_fcs.0.weight"):
        assert map_released_key(to_released_key(key)) == key


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_released_layout_round_trip(model, tmp_path, safe):
    folder = _save(model, tmp_path / "ckpt", safe_serialization=safe)
    index = "model.safetensors.index.json" if safe else "pytorch_model.bin.index.json"
    keys = json.loads((folder / index).read_text())["weight_map"]
    assert "model.layers.1.mlp.deepspeed_moe.gate.wg.weight" in keys
    assert "model.vision_tower.vision_tower.vision_model.pre_layrnorm.weight" in keys
    loaded = MedPLIBModel.from_pretrained(folder)
    assert _same_weights(model, loaded)
    assert loaded.sam is None  # no model.visual_model.* weights in this tiny checkpoint


def test_bf16_load_keeps_routers_float32(model, tmp_path):
    loaded = MedPLIBModel.from_pretrained(_save(model, tmp_path / "ckpt"), dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert loaded.language_model.layers[0].mlp.router.weight.dtype == torch.float32
    assert loaded.vision_tower.dtype == torch.bfloat16


def _shard_of(folder: Path, key: str) -> Path:
    index = next(folder.glob("*.index.json"))
    return folder / json.loads(index.read_text())["weight_map"][key]


def _rewrite_safetensors(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_key_names_the_shard(model, tmp_path):
    folder = _save(model, tmp_path / "ckpt")
    key = "model.layers.1.mlp.deepspeed_moe.experts.deepspeed_experts.0.up_proj.weight"
    shard = _shard_of(folder, key)
    _rewrite_safetensors(shard, lambda t: t.pop(key))
    with pytest.raises(CheckpointError) as err:
        MedPLIBModel.from_pretrained(folder)
    message = str(err.value)
    assert "missing (1)" in message and "layers.1.mlp.experts.0.up_proj.weight" in message and shard.name in message


def test_wrong_shape_names_the_file(model, tmp_path):
    folder = _save(model, tmp_path / "ckpt")
    key = "model.mm_projector.2.weight"
    shard = _shard_of(folder, key)
    _rewrite_safetensors(shard, lambda t: t.__setitem__(key, torch.zeros(5, 5)))
    with pytest.raises(CheckpointError, match=rf"(?s)wrong shape.*mm_projector\.2\.weight: file {re.escape(shard.name)} has \(5, 5\)"):
        MedPLIBModel.from_pretrained(folder)


def test_unexpected_key_is_listed(model, tmp_path):
    folder = _save(model, tmp_path / "ckpt")
    shard = _shard_of(folder, "lm_head.weight")
    _rewrite_safetensors(shard, lambda t: t.__setitem__("model.extra_head.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=rf"(?s)unexpected \(1\).*model\.extra_head\.weight \(in {re.escape(shard.name)}\)"):
        MedPLIBModel.from_pretrained(folder)


def test_missing_shard_file(model, tmp_path):
    folder = _save(model, tmp_path / "ckpt")
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"(?s)incomplete.*{re.escape(victim.name)}"):
        MedPLIBModel.from_pretrained(folder)


class NotATensor:  # pickled into a .bin, must be refused by weights_only loading
    pass


def test_bin_with_code_objects_is_refused(model, tmp_path):
    folder = _save(model, tmp_path / "ckpt", safe_serialization=False)
    shard = sorted(folder.glob("pytorch_model-*.bin"))[0]
    state = torch.load(shard, weights_only=True)
    state["evil"] = NotATensor()
    torch.save(state, shard)
    with pytest.raises(CheckpointError, match=rf"(?s){re.escape(shard.name)}.*weights_only=True"):
        MedPLIBModel.from_pretrained(folder)


def test_wrong_folders(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        MedPLIBModel.from_pretrained(tmp_path / "nope")
    # A folder with a config and tokenizer but only CLIP weights is not a MedPLIB checkpoint.
    folder = tmp_path / "clip_only"
    folder.mkdir()
    shutil.copy(FIXTURE / "config.json", folder)
    shutil.copytree(FIXTURE / "clip", folder / "clip")
    for name in TOKENIZER_FILES:
        shutil.copy(FIXTURE / name, folder)
    with pytest.raises(CheckpointError, match="no weights"):
        MedPLIBModel.from_pretrained(folder)
    shutil.copy(FIXTURE / "clip" / "model.safetensors", folder)
    with pytest.raises(CheckpointError, match="not a MedPLIB checkpoint"):
        MedPLIBModel.from_pretrained(folder)


def _pattern(key: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", re.sub(r"\.\d+\.", ".N.", key))


def test_7b_config_builds_the_released_names_and_shapes():
    """The 7B model (meta device, no memory) has exactly the released checkpoint's LLM/CLIP/projector names."""
    cfg = MedPLIBConfig()  # defaults = MedPLIB-7b-2e
    with empty_parameters():
        big = MedPLIBModel(cfg)
    shapes = {to_released_key(k): tuple(v.shape) for k, v in big.state_dict().items()}
    documented = {  # reference notes, section 4 and 3
        "model.embed_tokens.weight": (32267, 4096),
        "lm_head.weight": (32267, 4096),
        "model.layers.31.self_attn.q_proj.weight": (4096, 4096),
        "model.layers.31.mlp.deepspeed_moe.gate.wg.weight": (2, 4096),
        "model.layers.0.mlp.deepspeed_moe.experts.deepspeed_experts.1.gate_proj.weight": (11008, 4096),
        "model.layers.0.mlp.deepspeed_moe.experts.deepspeed_experts.0.up_proj.weight": (11008, 4096),
        "model.layers.0.mlp.deepspeed_moe.experts.deepspeed_experts.1.down_proj.weight": (4096, 11008),
        "model.vision_tower.vision_tower.vision_model.embeddings.position_embedding.weight": (577, 1024),
        "model.vision_tower.vision_tower.vision_model.encoder.layers.23.mlp.fc1.weight": (4096, 1024),
        "model.mm_projector.0.weight": (4096, 1024),
        "model.mm_projector.2.weight": (4096, 4096),
        "model.region_fea_adapter.weight": (4096, 1024),
        "model.text_hidden_fcs.0.0.weight": (4096, 4096),
        "model.text_hidden_fcs.0.2.weight": (256, 4096),
        "model.text_hidden_fcs.0.2.bias": (256,),
    }
    for key, shape in documented.items():
        assert shapes.get(key) == shape, key
    assert not any(".mlp.gate_proj" in k or "deepspeed_experts.2" in k for k in shapes)
    assert sum(1 for k in shapes if k.endswith("gate.wg.weight")) == 32
    # Same name patterns as the released-layout fixture (which the reference itself saved).
    fixture_keys = json.loads((FIXTURE / "model.safetensors.index.json").read_text())["weight_map"]
    expected = {_pattern(k) for k in fixture_keys if "visual_model" not in k and "inv_freq" not in k}
    assert {_pattern(k) for k in shapes} == expected
    params = sum(v.numel() for v in big.state_dict().values())
    assert 11.3e9 < params < 11.5e9  # ≈ 11.07 B LLM + 0.30 B CLIP + 0.04 B projectors (SAM not included)


def test_empty_parameters_only_touches_the_calling_thread():
    import threading

    built = {}

    def other() -> None:
        built["other"] = torch.nn.Linear(2, 2)

    with empty_parameters():
        here = torch.nn.Linear(2, 2)
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert here.weight.is_meta
    assert not built["other"].weight.is_meta
    assert not torch.nn.Linear(2, 2).weight.is_meta  # restored afterwards


def test_converter_command_writes_a_loadable_clean_folder(tmp_path, capsys):
    from napari_medplib.model import convert

    assert convert.main([str(FIXTURE), str(tmp_path / "clean"), "--dtype", "float32"]) == 0
    assert "wrote" in capsys.readouterr().out
    config = json.loads((tmp_path / "clean" / "config.json").read_text())
    clip = json.loads((FIXTURE / "clip" / "config.json").read_text())["vision_config"]
    assert config["vision_config"]["hidden_size"] == clip["hidden_size"]  # no CLIP folder needed any more
    assert not (tmp_path / "clean" / "clip").exists()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "clean" / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    assert "language_model.layers.0.mlp.router.weight" in keys and any(k.startswith("sam.") for k in keys)
    original, clean = MedPLIBModel.from_pretrained(FIXTURE), MedPLIBModel.from_pretrained(tmp_path / "clean")
    assert _same_weights(original, clean)


def test_a_failed_save_leaves_the_earlier_weights_whole(tmp_path, monkeypatch):
    import safetensors.torch

    from napari_medplib.testing import tiny_model

    folder = save_pretrained(tiny_model(0), tmp_path / "m")
    before = (folder / "model.safetensors").read_bytes()

    def half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\0" * 100)
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(OSError, match="space"):
        save_pretrained(tiny_model(1), folder)
    assert (folder / "model.safetensors").read_bytes() == before
    assert not [p for p in folder.iterdir() if "tmp" in p.name or p.name.startswith(".")]
