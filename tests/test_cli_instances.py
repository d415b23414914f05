"""`medplib ask/segment`: one label id per object in --labels-out, the per-object table in --json and
--table (atomic CSV), the measured count of how-many questions."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile

from napari_medplib.cli import main
from napari_medplib.engine.measure import COLUMNS


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from napari_medplib.testing import make_tiny_model_folder

    return make_tiny_model_folder(tmp_path_factory.mktemp("cli-instances") / "tiny-medplib")


@pytest.fixture
def image_file(tmp_path):
    image = np.full((64, 96), 300, np.uint16)
    image[10:30, 10:30] = 5000
    image[35:60, 50:90] = 9000
    path = tmp_path / "blobs.tif"
    tifffile.imwrite(path, image)
    return path, image


@pytest.fixture
def forced_seg(monkeypatch):
    """Sessions whose answers are all <SEG> (the tiny random model rarely says it by itself)."""
    import torch

    from napari_medplib.engine import Session

    load = Session.load.__func__

    def load_forcing_seg(cls, *args, **kwargs):
        session = load(cls, *args, **kwargs)
        bias = torch.zeros(session.model.config.vocab_size)
        bias[session.model.tokenizer.seg_token_id] = 1e4
        session.model.language_model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
        return session

    monkeypatch.setattr(Session, "load", classmethod(load_forcing_seg))


def test_ask_writes_objects_and_their_table(model_dir, image_file, tmp_path, capsys, forced_seg):
    path, image = image_file
    labels_out, table_out = tmp_path / "objects.tif", tmp_path / "objects.csv"
    rc = main(["ask", str(path), "Please segment the nuclei.", "--model", str(model_dir), "--max-new-tokens", "2",
               "--labels-out", str(labels_out), "--table", str(table_out), "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    result = json.loads(out)
    labels = tifffile.imread(labels_out)
    ids = sorted(int(i) for i in np.unique(labels) if i)
    assert len(result["instances"]) == 2 and sum(result["instances"]) == len(result["objects"])
    assert result["masks"] == [row["label"] for row in result["objects"]]
    assert set(ids) <= set(result["masks"])  # a later mask's object may lie under an earlier one
    assert result["masks"] == list(range(1, len(result["masks"]) + 1))  # the second mask's ids follow the first's
    with open(table_out, newline="") as file:
        rows = list(csv.DictReader(file))
    assert [int(r["label"]) for r in rows] == result["masks"]
    for row in result["objects"]:
        assert set(COLUMNS) <= set(row)
    assert not list(tmp_path.glob(".objects.csv.*"))  # the temporary file was renamed


def test_how_many_reports_the_measured_count(model_dir, image_file, capsys, forced_seg):
    path, _ = image_file
    rc = main(["ask", str(path), "How many nuclei are there?", "--model", str(model_dir), "--max-new-tokens", "1",
               "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    result = json.loads(out)
    assert result["count_noun"] == "nuclei" and isinstance(result["measured_count"], int)
    rc = main(["ask", str(path), "How many nuclei are there?", "--model", str(model_dir), "--max-new-tokens", "1"])
    _, err = capsys.readouterr()
    assert rc == 0 and "Measured: " in err and "nuclei (grounded instances)" in err


def test_segment_table(model_dir, image_file, tmp_path, capsys):
    path, image = image_file
    table_out = tmp_path / "box.csv"
    rc = main(["segment", str(path), "--box", "8", "8", "32", "32", "--model", str(model_dir),
               "--table", str(table_out), "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    result = json.loads(out)
    with open(table_out, newline="") as file:
        rows = list(csv.DictReader(file))
    assert [r["label"] for r in rows] == [str(o["label"]) for o in result["objects"]]
    assert all(o["area"] == a for o, a in zip(result["objects"], [a for a in result["mask_areas"] if a], strict=True))
    if rows:
        assert float(rows[0]["mean_intensity"]) > 0


def test_bad_table_path_is_one_line(model_dir, image_file, capsys):
    path, _ = image_file
    assert main(["ask", str(path), "Hi", "--model", str(model_dir), "--table", "out.txt"]) == 2
    assert "--table out.txt: must be a .csv file" in capsys.readouterr().err
    assert main(["segment", str(path), "--point", "5", "5", "--model", str(model_dir), "--table", "/no/such/t.csv"]) == 2
    assert "does not exist" in capsys.readouterr().err
