"""Inputs -> items: files, folders, globs, stacks and OME-Zarr; keys follow content, plane and options."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_medplib.batch import Actions, BatchError, BatchOptions
from napari_medplib.batch.inputs import expand, list_items

GROUND = BatchOptions(Actions(ground=("Please segment the nuclei.",)), model_fingerprint="m")


def _write_inputs(folder):
    rng = np.random.default_rng(0)
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", rng.integers(0, 255, (40, 50), np.uint8))
    Image.fromarray(rng.integers(0, 255, (30, 20), np.uint8)).save(folder / "b.png")
    tifffile.imwrite(folder / "stack.ome.tif", rng.integers(0, 4000, (2, 5, 32, 48), np.uint16),
                     metadata={"axes": "TZYX"}, ome=True)
    (folder / "notes.txt").write_text("not an image")
    (folder / "a.geojson").write_text("{}")
    return folder


def test_folder_glob_and_file_inputs(tmp_path):
    folder = _write_inputs(tmp_path / "in")
    paths, problems = expand([str(folder)])
    assert [p.name for p in paths] == ["a.tif", "b.png", "stack.ome.tif"] and not problems
    paths, problems = expand([str(folder / "*.tif"), str(folder / "a.tif"), str(tmp_path / "missing.tif")])
    assert [p.name for p in paths] == ["a.tif", "stack.ome.tif"]  # a.tif once
    assert problems == [f"{tmp_path / 'missing.tif'}: no such file or folder"]
    _, problems = expand([str(folder / "notes.txt"), str(tmp_path / "*.czi")])
    assert "not an image file we read" in problems[0] and "matches no image file" in problems[1]


def test_stack_planes_become_items_named_after_the_plane(tmp_path):
    folder = _write_inputs(tmp_path / "in")
    listing = list_items([str(folder)], GROUND)
    names = [item.name for item in listing.items]
    assert names[:2] == ["a", "b"] and len(names) == 2 + 10
    assert "stack_T0_Z0" in names and "stack_T1_Z4" in names
    stack = [item for item in listing.items if item.name == "stack_T1_Z3"][0]
    assert stack.plane == (("T", 1), ("Z", 3)) and stack.shape == (32, 48)
    one = list_items([str(folder / "stack.ome.tif")], BatchOptions(GROUND.actions, plane={"T": 1, "Z": 2},
                                                                   model_fingerprint="m"))
    assert [item.plane for item in one.items] == [(("T", 1), ("Z", 2))]
    bad = list_items([str(folder / "stack.ome.tif")], BatchOptions(GROUND.actions, plane={"Z": 9},
                                                                   model_fingerprint="m"))
    assert "Z=9 is out of range (0..4)" in bad.items[0].problem


def test_keys_follow_content_plane_options_and_name(tmp_path):
    folder = _write_inputs(tmp_path / "in")
    key = list_items([str(folder / "a.tif")], GROUND).items[0].key
    (tmp_path / "moved").mkdir()
    shutil.copy(folder / "a.tif", tmp_path / "moved" / "a.tif")
    assert list_items([str(tmp_path / "moved" / "a.tif")], GROUND).items[0].key == key  # moved: still done
    shutil.copy(folder / "a.tif", tmp_path / "twin.tif")
    assert list_items([str(tmp_path / "twin.tif")], GROUND).items[0].key != key  # a twin gets its own outputs
    other = BatchOptions(Actions(ground=("Please segment the cells.",)), model_fingerprint="m")
    assert list_items([str(folder / "a.tif")], other).items[0].key != key
    new_model = BatchOptions(GROUND.actions, model_fingerprint="other")
    assert list_items([str(folder / "a.tif")], new_model).items[0].key != key
    elsewhere = BatchOptions(GROUND.actions, model_fingerprint="m", device="cuda", threads=4)
    assert list_items([str(folder / "a.tif")], elsewhere).items[0].key == key  # where it runs changes nothing
    tifffile.imwrite(tmp_path / "moved" / "a.tif", np.zeros((40, 50), np.uint8))
    assert list_items([str(tmp_path / "moved" / "a.tif")], GROUND).items[0].key != key  # edited: runs again


def test_identical_files_each_get_their_outputs(tmp_path):
    for name in ("one.tif", "two.tif"):
        tifffile.imwrite(tmp_path / name, np.full((8, 8), 7, np.uint8))
    items = list_items([str(tmp_path)], GROUND).items
    assert len({item.key for item in items}) == 2


def test_same_stem_in_two_folders_keeps_both_outputs(tmp_path):
    for sub, value in (("x", 1), ("y", 2)):
        (tmp_path / sub).mkdir()
        tifffile.imwrite(tmp_path / sub / "cells.tif", np.full((8, 8), value, np.uint8))
    names = [item.name for item in list_items([str(tmp_path / "x"), str(tmp_path / "y")], GROUND).items]
    assert len(set(names)) == 2 and all(name.startswith("cells-") for name in names)


def test_ome_zarr_input(tmp_path):
    import zarr

    path = tmp_path / "plate.ome.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0", shape=(3, 2, 64, 80), chunks=(1, 1, 32, 32), dtype="uint16")
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": n} for n in "tcyx"],
                                   "datasets": [{"path": "0"}]}]
    listing = list_items([str(tmp_path)], GROUND)
    assert [item.name for item in listing.items] == ["plate_T0", "plate_T1", "plate_T2"]
    assert listing.items[0].shape == (64, 80)


def test_unreadable_file_is_an_item_with_its_problem(tmp_path):
    (tmp_path / "broken.tif").write_bytes(b"II*\x00" + b"\xff" * 64)
    item = list_items([str(tmp_path)], GROUND).items[0]
    assert item.problem and "broken.tif" in item.problem


def test_segment_needs_a_region_file_beside_each_image(tmp_path):
    folder = _write_inputs(tmp_path / "in")
    options = BatchOptions(Actions(segment=True), model_fingerprint="m")
    items = {item.name: item for item in list_items([str(folder / "a.tif"), str(folder / "b.png")], options).items}
    assert items["a"].regions.endswith("a.geojson") and items["a"].problem is None
    assert "no region file b.geojson beside it" in items["b"].problem
    with pytest.raises(BatchError, match="must contain"):
        Actions(segment=True, regions_pattern="regions.geojson")
    with pytest.raises(BatchError, match="nothing to do"):
        Actions()
