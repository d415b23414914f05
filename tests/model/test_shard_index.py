"""A shard index may only name files of the model folder."""

import json

import pytest

from napari_medplib.model.checkpoint import CheckpointError, weight_files


def _folder(tmp_path, weight_map):
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    (folder / "model-00001.safetensors").write_bytes(b"x")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("name", ["../outside.safetensors", "OUTSIDE", "sub/../../outside.safetensors"])
def test_index_pointing_outside_the_folder_is_refused(tmp_path, name):
    name = str(tmp_path / "outside.safetensors") if name == "OUTSIDE" else name
    folder = _folder(tmp_path, {"model.layers.0.x": "model-00001.safetensors", "lm_head.weight": name})
    with pytest.raises(CheckpointError, match="outside the model folder"):
        weight_files(folder)


def test_index_inside_the_folder_and_linked_blobs_are_fine(tmp_path):
    folder = _folder(tmp_path, {"model.layers.0.x": "model-00001.safetensors"})
    (folder / "model-00002.safetensors").symlink_to(tmp_path / "outside.safetensors")  # HF cache layout
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "model-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    files, _ = weight_files(folder)
    assert [f.name for f in files] == ["model-00001.safetensors", "model-00002.safetensors"]


@pytest.mark.parametrize("weight_map", [["a", "b"], {"a": 3}, "x"])
def test_malformed_weight_map_is_a_checkpoint_error(tmp_path, weight_map):
    with pytest.raises(CheckpointError, match="not a valid shard index"):
        weight_files(_folder(tmp_path, weight_map))
