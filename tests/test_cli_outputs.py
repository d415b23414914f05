"""`medplib` bad input exits 2 (model folders, tokenizers, temperatures), and output files are never lost."""

import json
import os
import shutil

import numpy as np
import pytest
import tifffile

from napari_medplib import cli
from napari_medplib.cli import EXIT_BAD_INPUT, main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from napari_medplib.testing import make_tiny_model_folder

    return make_tiny_model_folder(tmp_path_factory.mktemp("cli-out") / "tiny-medplib")


@pytest.fixture
def image_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "cells.tif"
    tifffile.imwrite(path, (rng.random((60, 80)) * 3000).astype(np.uint16))
    return path


def _run(argv):
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse errors
        return exit_.code


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("medplib"), err
    assert "Traceback" not in err
    return err


# ---- exit 2 for bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-0.5", "warm"])
def test_temperature_must_be_a_finite_number_at_least_0(value, model_dir, image_file, capsys):
    rc = _run(["ask", str(image_file), "q", "--model", str(model_dir), f"--temperature={value}"])
    assert rc == EXIT_BAD_INPUT
    assert "--temperature" in _one_line_error(capsys)


def _broken_copy(model_dir, tmp_path, name):
    broken = tmp_path / name
    shutil.copytree(model_dir, broken)
    return broken


def test_corrupt_tokenizer_is_bad_input(model_dir, image_file, tmp_path, capsys):
    broken = _broken_copy(model_dir, tmp_path, "corrupt-tokenizer")
    (broken / "tokenizer.model").write_bytes(np.random.default_rng(1).bytes(2000))
    assert _run(["ask", str(image_file), "q", "--model", str(broken)]) == EXIT_BAD_INPUT
    assert str(broken) in _one_line_error(capsys)


@pytest.mark.parametrize("config", ["null", "[]", '"text"', "{"])
def test_malformed_config_is_bad_input(config, model_dir, image_file, tmp_path, capsys):
    broken = _broken_copy(model_dir, tmp_path, "bad-config")
    (broken / "config.json").write_text(config)
    assert _run(["segment", str(image_file), "--point", "5", "5", "--model", str(broken)]) == EXIT_BAD_INPUT
    _one_line_error(capsys)


def test_a_folder_without_weights_is_bad_input(model_dir, image_file, tmp_path, capsys):
    broken = _broken_copy(model_dir, tmp_path, "no-weights")
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    assert _run(["ask", str(image_file), "q", "--model", str(broken)]) == EXIT_BAD_INPUT
    _one_line_error(capsys)


def test_running_out_of_memory_is_not_bad_input(monkeypatch):
    with pytest.raises(RuntimeError), cli._model_folder_errors("some/folder"):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_the_bundled_model_failing_is_an_internal_error(monkeypatch):
    with pytest.raises(RuntimeError), cli._model_folder_errors(None):
        raise RuntimeError("could not parse ModelProto")


def test_finetune_names_the_train_extra_without_peft(model_dir, image_file, tmp_path, monkeypatch, capsys):
    real = cli._has_module
    monkeypatch.setattr(cli, "_has_module", lambda name: False if name == "peft" else real(name))
    labels = tmp_path / "labels.tif"
    tifffile.imwrite(labels, np.zeros((60, 80), np.uint16))
    rc = _run(["finetune", str(image_file), "--labels", str(labels), "--from", str(model_dir),
               "--out", str(tmp_path / "adapted")])
    assert rc == EXIT_BAD_INPUT
    err = _one_line_error(capsys)
    assert "napari-medplib[train]" in err and "--no-grounding" in err
    assert not (tmp_path / "adapted").exists()


# ---- --labels-out / --table: ask before replacing, write atomically -------------------------------------
def _segment(image_file, model_dir, out, *extra):
    return _run(["segment", str(image_file), "--point", "30", "40", "--model", str(model_dir),
                 "--labels-out", str(out), "--json", *extra])


def test_existing_labels_file_needs_overwrite(model_dir, image_file, tmp_path, capsys):
    out = tmp_path / "labels.tif"
    old = np.full((3, 3), 7, np.uint16)
    tifffile.imwrite(out, old)
    assert _segment(image_file, model_dir, out) == EXIT_BAD_INPUT
    assert "--overwrite" in _one_line_error(capsys)
    np.testing.assert_array_equal(tifffile.imread(out), old)

    assert _segment(image_file, model_dir, out, "--overwrite") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["masks"] == [1] and tifffile.imread(out).shape == (60, 80)


def test_existing_table_needs_overwrite(model_dir, image_file, tmp_path, capsys):
    table = tmp_path / "objects.csv"
    table.write_text("keep me\n")
    rc = _run(["segment", str(image_file), "--point", "30", "40", "--model", str(model_dir), "--table", str(table)])
    assert rc == EXIT_BAD_INPUT and "--overwrite" in _one_line_error(capsys)
    assert table.read_text() == "keep me\n"


def test_labels_out_that_is_a_folder_is_bad_input(model_dir, image_file, tmp_path, capsys):
    folder = tmp_path / "labels.tif"
    folder.mkdir()
    assert _segment(image_file, model_dir, folder, "--overwrite") == EXIT_BAD_INPUT
    assert "folder" in _one_line_error(capsys)


def test_a_failed_write_leaves_the_old_labels_file(model_dir, image_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "labels.tif"
    old = np.full((3, 3), 7, np.uint16)
    tifffile.imwrite(out, old)

    def disk_full(path, data, **_):
        with open(path, "wb") as file:
            file.write(b"II*\x00half a tiff")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tifffile, "imwrite", disk_full)
    assert _segment(image_file, model_dir, out, "--overwrite") != 0
    capsys.readouterr()
    monkeypatch.undo()
    np.testing.assert_array_equal(tifffile.imread(out), old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.tif", "labels.tif"]  # no temporary left


def test_atomic_path_keeps_permissions_and_cleans_up(tmp_path):
    new = tmp_path / "new.tif"
    with cli.atomic_path(new) as temporary:
        assert temporary.parent == tmp_path and temporary != new
        temporary.write_bytes(b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert new.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600

    old = tmp_path / "old.tif"
    old.write_bytes(b"old")
    old.chmod(0o640)
    with cli.atomic_path(old) as temporary:
        temporary.write_bytes(b"new")
    assert old.read_bytes() == b"new" and old.stat().st_mode & 0o777 == 0o640

    with pytest.raises(KeyboardInterrupt), cli.atomic_path(old) as temporary:
        temporary.write_bytes(b"partial")
        raise KeyboardInterrupt
    assert old.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.tif", "old.tif"]
