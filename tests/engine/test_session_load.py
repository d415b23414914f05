"""Session.load: folders, names, the local HF cache (never the network), the bundled default, errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from napari_medplib.engine import (
    DeviceError,
    InvalidModelError,
    ModelLoadError,
    ModelNotFoundError,
    Session,
    loading,
)


def test_load_a_folder_and_answer(tiny_model_folder, image16):
    events = []
    session = Session.load(tiny_model_folder, device="auto" if not torch.cuda.is_available() else "cpu",
                           on_progress=lambda *e: events.append(e))
    assert session.model_name == "tiny-medplib" and session.device == "cpu" and session.dtype == "float32"
    assert events[0] == ("loading", 0, 2) and events[-1] == ("loading", 2, 2)
    reply = session.ask(image16, "What is it?", max_new_tokens=2)
    assert reply.model == "tiny-medplib"
    assert session.segment(image16, points=[(10, 10)]).mask.shape == image16.shape
    session.close()


def test_dtype_on_request(tiny_model_folder):
    session = Session.load(str(tiny_model_folder), device="cpu", dtype="bfloat16")
    assert session.dtype == "bfloat16"
    assert session.model.language_model.layers[0].mlp.router.weight.dtype == torch.float32


def test_bundled_default_absent_says_how_to_point_at_a_model(monkeypatch, tmp_path):
    monkeypatch.setattr(loading, "bundled_model_dir", lambda: tmp_path / "bundled_model")
    monkeypatch.delenv("MEDPLIB_MODEL_PATH", raising=False)
    with pytest.raises(ModelNotFoundError) as err:
        Session.load()
    message = str(err.value)
    assert "bundled" in message and "MEDPLIB_MODEL_PATH" in message and "--model" in message
    assert "\n" not in message


def test_default_from_env_or_bundled(monkeypatch, tmp_path, tiny_model_folder):
    monkeypatch.setattr(loading, "bundled_model_dir", lambda: tmp_path / "none")
    monkeypatch.setenv("MEDPLIB_MODEL_PATH", str(tiny_model_folder))
    assert Session.load(device="cpu").model_name == "tiny-medplib"
    monkeypatch.delenv("MEDPLIB_MODEL_PATH")
    monkeypatch.setattr(loading, "bundled_model_dir", lambda: tiny_model_folder)
    assert Session.load(device="cpu").model_name == "bundled"


def test_a_name_is_found_in_the_search_paths(monkeypatch, tiny_model_folder):
    monkeypatch.setenv("MEDPLIB_MODEL_PATH", str(tiny_model_folder.parent))
    assert Session.load("tiny-medplib", device="cpu").model_name == "tiny-medplib"


def test_missing_folder_and_not_a_model_folder(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such model folder"):
        Session.load(tmp_path / "missing" / "model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidModelError, match=r"not a MedPLIB model folder.*config.json"):
        Session.load(tmp_path / "empty")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InvalidModelError, match="not a model folder"):
        Session.load(tmp_path / "file.txt")


def test_broken_model_folders(tmp_path, tiny_model_folder):
    broken = shutil.copytree(tiny_model_folder, tmp_path / "broken")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(InvalidModelError, match="not valid JSON"):
        Session.load(broken, device="cpu")
    no_weights = shutil.copytree(tiny_model_folder, tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError):
        Session.load(no_weights, device="cpu")
    no_tokenizer = shutil.copytree(tiny_model_folder, tmp_path / "no_tokenizer")
    (no_tokenizer / "tokenizer.model").unlink()
    with pytest.raises(InvalidModelError, match=r"tokenizer.model"):
        Session.load(no_tokenizer, device="cpu")


def test_hub_id_only_from_the_local_cache(monkeypatch, tmp_path, tiny_model_folder):
    import huggingface_hub.constants

    cache = tmp_path / "hf"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match=r"not in the local Hugging Face cache.*huggingface-cli download"):
        Session.load("acme/tiny-medplib", device="cpu")
    repo = cache / "models--acme--tiny-medplib"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    shutil.copytree(tiny_model_folder, repo / "snapshots" / "0123abcd")
    session = Session.load("acme/tiny-medplib", device="cpu")
    assert session.model_name == "acme/tiny-medplib"


def test_device_choice(monkeypatch):
    assert loading.pick_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loading.pick_device("auto") in ("cpu", "mps")
    with pytest.raises(DeviceError, match="CUDA is not available"):
        loading.pick_device("cuda")
    with pytest.raises(DeviceError, match="unknown device"):
        loading.pick_device("tpu")
    assert loading.pick_dtype("cpu") == torch.float32
    assert loading.pick_dtype("mps") == torch.bfloat16
    assert loading.pick_dtype("cpu", "bf16") == torch.bfloat16
    with pytest.raises(DeviceError, match="unknown dtype"):
        loading.pick_dtype("cpu", "int3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert loading.pick_device("auto") == "cuda" and loading.pick_dtype("cuda") == torch.bfloat16


def test_fingerprint_follows_the_weights(tiny_model_folder, tmp_path):
    a = loading.folder_fingerprint(tiny_model_folder)
    copy = shutil.copytree(tiny_model_folder, tmp_path / "copy")
    assert loading.folder_fingerprint(copy) == a
    (copy / "model.safetensors").write_bytes(b"0")
    assert loading.folder_fingerprint(copy) != a


def test_unknown_template_is_refused(tiny_model_folder):
    with pytest.raises(ValueError, match="template"):
        Session.load(tiny_model_folder, device="cpu", template="chatml")


def test_testing_helpers_build_loadable_models(tmp_path):
    from napari_medplib.model.medplib import MedPLIBModel
    from napari_medplib.testing import make_tiny_model_folder, tiny_model

    folder = make_tiny_model_folder(tmp_path / "t", seed=3)
    loaded = MedPLIBModel.from_pretrained(folder)
    built = tiny_model(seed=3)
    ids = torch.tensor(loaded.tokenizer.encode("What is the nucleus?"))
    np.testing.assert_array_equal(
        loaded(ids, logits_positions=slice(-1, None)).logits.detach().numpy(),
        built(ids, logits_positions=slice(-1, None)).logits.detach().numpy(),
    )
    assert len(loaded.tokenizer) == loaded.config.vocab_size == 907


def test_int8_llm_weights_on_request(tiny_model_folder, image16):
    """``llm_weights="int8"``: the LLM's linears and experts hold int8 weights (quantised before reaching
    the device), answers still come, and the fingerprint tells the two apart (caches do not mix)."""
    from napari_medplib.engine.errors import ModelLoadError
    from napari_medplib.model.quantize import Int8Experts, Int8Linear

    with Session.load(tiny_model_folder, device="cpu") as full, \
            Session.load(tiny_model_folder, device="cpu", llm_weights="int8") as small:
        kinds = {type(m) for m in small.model.language_model.modules()}
        assert Int8Linear in kinds and Int8Experts in kinds
        assert not {Int8Linear, Int8Experts} & {type(m) for m in full.model.language_model.modules()}
        assert small.fingerprint != full.fingerprint and small.fingerprint.startswith(full.fingerprint)
        assert small.ask(image16, "What is this?", max_new_tokens=3).finish_reason
    with pytest.raises(ModelLoadError, match="llm_weights"):
        Session.load(tiny_model_folder, device="cpu", llm_weights="int4")


def test_int8_llm_weights_are_refused_for_text_families(tmp_path):
    from napari_medplib.engine.errors import ModelLoadError
    from napari_medplib.engine.loading import load_weights
    from napari_medplib.families.registry import MEDMOE

    with pytest.raises(ModelLoadError, match="MedPLIB models.*llm_weights='full'"):
        load_weights(MEDMOE, tmp_path, "cpu", None, "int8")
