"""`batch(...)` in this process: outputs, tables, resume, refusals and per-item failures."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest
import tifffile
from batch_helpers import BlobSession, blobs

from napari_medplib.batch import Actions, BatchError, BatchOptions, batch
from napari_medplib.batch.tiles import read_labels

GROUND = "Please segment the nuclei."
CENTRES = [[(20, 20), (20, 60), (50, 40)], [(30, 30)], [(15, 15), (15, 75), (60, 15), (60, 75)]]


def _folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, centres in enumerate(CENTRES):
        tifffile.imwrite(folder / f"img{i}.tif", blobs((80, 90), centres))
    return folder


def _options(**kwargs):
    return BatchOptions(Actions(ask=("What is this?",), ground=(GROUND,)), **kwargs)


def test_outputs_tables_and_run_record(tmp_path):
    folder, out = _folder(tmp_path), tmp_path / "out"
    session = BlobSession()
    result = batch([str(folder)], out, _options(), session=session, command=["medplib", "batch", "x"])
    assert (result.total, result.done, result.failed) == (3, 3, 0)
    rows = list(__import__("csv").DictReader(open(out / "objects.csv")))
    assert len(rows) == sum(map(len, CENTRES))
    for i, centres in enumerate(CENTRES):
        labels = tifffile.imread(out / "labels" / f"img{i}__ground.tif")
        assert labels.max() == len(centres)
        mine = [r for r in rows if r["image"].endswith(f"img{i}.tif")]
        assert sorted(int(r["label"]) for r in mine) == list(range(1, len(centres) + 1))
        for r in mine:  # the row measures the label in the file
            assert int(float(r["area"])) == int((labels == int(r["label"])).sum())
            assert float(r["mean_intensity"]) == pytest.approx(200)
            assert r["question"] == GROUND and r["model"] == "blobs" and r["model_fingerprint"] == "blob-fingerprint"
    answers = [json.loads(line) for line in open(out / "answers.jsonl")]
    assert sorted(a["action"] for a in answers) == ["ask"] * 3 + ["ground"] * 3
    assert {a["measured_count"] for a in answers if a["action"] == "ground"} == {1, 3, 4}
    import pyarrow.parquet as pq

    assert pq.read_table(out / "objects.parquet").num_rows == len(rows)
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == ["medplib", "batch", "x"] and run["status"] == "finished"
    assert run["done"] == 3 and "napari-medplib" in run["versions"] and run["seconds"] >= 0


def test_rerun_resumes_and_new_images_join(tmp_path):
    folder, out = _folder(tmp_path), tmp_path / "out"
    batch([str(folder)], out, _options(), session=BlobSession())
    records = {p.name: p.read_bytes() for p in (out / "items").iterdir()}
    again = BlobSession()
    result = batch([str(folder)], out, _options(), session=again)
    assert (result.done, result.skipped) == (0, 3) and again.asked == []
    assert {p.name: p.read_bytes() for p in (out / "items").iterdir()} == records
    tifffile.imwrite(folder / "img3.tif", blobs((80, 90), [(40, 40)]))
    third = BlobSession()
    result = batch([str(folder)], out, _options(), session=third)
    assert (result.done, result.skipped) == (1, 3) and len(third.asked) == 2  # ask + ground of the new image
    assert len(list(__import__("csv").DictReader(open(out / "objects.csv")))) == sum(map(len, CENTRES)) + 1
    assert json.loads((out / "run.json").read_text())["runs"] == 3


def test_folder_of_another_run_is_refused_and_kept(tmp_path):
    folder, out = _folder(tmp_path), tmp_path / "out"
    batch([str(folder)], out, _options(), session=BlobSession())
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = BatchOptions(Actions(ground=("Please segment the cells.",)))
    with pytest.raises(BatchError, match="another run with other options.*new --out"):
        batch([str(folder)], out, other, session=BlobSession())
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.docx").write_text("precious")
    with pytest.raises(BatchError, match="not empty and is not a batch run"):
        batch([str(folder)], foreign, _options(), session=BlobSession())
    assert [p.name for p in foreign.iterdir()] == ["chapter1.docx"]


def test_bad_items_fail_alone_with_reasons(tmp_path):
    folder = _folder(tmp_path)
    (folder / "broken.tif").write_bytes(b"II*\x00" + b"\x00" * 40)
    tifffile.imwrite(folder / "six_d.tif", np.zeros((2, 2, 2, 3, 16, 16), np.uint8), photometric="minisblack",
                     metadata={"axes": "QTZCYX"})
    (folder / "img0.geojson").write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": {
        "type": "Polygon", "coordinates": [[[500, 500], [600, 500], [600, 600], [500, 500]]]}}))
    (folder / "img1.geojson").write_text("{not json")
    options = BatchOptions(Actions(ground=(GROUND,), segment=True))
    result = batch([str(folder)], tmp_path / "out", options, session=BlobSession())
    reasons = {f["image"].rsplit("/", 1)[-1]: f["error"] for f in result.failures}
    assert "broken.tif" in reasons["broken.tif"]
    assert "3 stack axes" in reasons["six_d.tif"] and "--plane" in reasons["six_d.tif"]
    assert "outside" in reasons["img0.tif"]  # the region lies outside its image
    assert "img1.geojson" in reasons["img1.tif"]
    assert "no region file img2.geojson" in reasons["img2.tif"]
    failed = list(__import__("csv").DictReader(open(tmp_path / "out" / "failed.csv")))
    assert {row["error"] for row in failed} >= set(reasons.values())


def test_full_disk_fails_the_item_with_a_clear_reason(tmp_path, monkeypatch):
    folder, out = _folder(tmp_path), tmp_path / "out"
    real = tifffile.imwrite

    def full(path, *args, **kwargs):
        if "img1" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(tifffile, "imwrite", full)
    result = batch([str(folder)], out, _options(), session=BlobSession(), retries=0)
    assert (result.done, result.failed) == (2, 1)
    assert "is full" in result.failures[0]["error"] and "run the same command again" in result.failures[0]["error"]
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # nothing half-written left
    monkeypatch.setattr(tifffile, "imwrite", real)
    result = batch([str(folder)], out, _options(), session=BlobSession())
    assert (result.done, result.skipped, result.failed) == (1, 2, 0)


def test_large_planes_are_tiled_into_ome_zarr(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    centres = [(y, x) for y in range(30, 600, 70) for x in range(30, 600, 90)]
    tifffile.imwrite(folder / "slide.tif", blobs((620, 640), centres), tile=(128, 128))
    options = BatchOptions(Actions(ground=(GROUND,)), tile_above=300, tile_size=256, tile_overlap=40)
    session = BlobSession()
    result = batch([str(folder)], tmp_path / "out", options, session=session)
    assert result.done == 1 and max(max(s) for s in session.asked) <= 256
    labels = read_labels(tmp_path / "out" / "labels" / "slide__ground.zarr")
    assert labels.max() == len(centres) == len(np.unique(labels)) - 1
    rows = list(__import__("csv").DictReader(open(tmp_path / "out" / "objects.csv")))
    assert len(rows) == len(centres)


def test_orphaned_temporaries_are_swept(tmp_path):
    folder, out = _folder(tmp_path), tmp_path / "out"
    batch([str(folder)], out, _options(), session=BlobSession())
    (out / "labels" / ".img9__ground.tif.abc.tmp.tif").write_bytes(b"half")
    (out / "labels" / ".big__ground.zarr.tmp-123").mkdir()
    batch([str(folder)], out, _options(), session=BlobSession())
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_real_session_grounding_labels_match_the_table(tmp_path):
    from engine_helpers import force_seg

    from napari_medplib.engine import Session
    from napari_medplib.testing import tiny_model

    model = tiny_model()
    force_seg(model)
    session = Session.from_model(model, name="tiny")
    folder, out = _folder(tmp_path), tmp_path / "out"
    options = BatchOptions(Actions(ground=(GROUND,)), max_new_tokens=3)
    result = batch([str(folder)], out, options, session=session)
    assert result.done == 3
    rows = list(__import__("csv").DictReader(open(out / "objects.csv")))
    for i in range(3):
        labels = tifffile.imread(out / "labels" / f"img{i}__ground.tif")
        mine = sorted(int(r["label"]) for r in rows if r["image"].endswith(f"img{i}.tif"))
        assert mine == sorted(int(v) for v in np.unique(labels) if v)
    assert rows and all(r["model"] == "tiny" for r in rows)


def test_dock_opens_tiled_outputs_lazily(tmp_path):
    import zarr

    from napari_medplib.ui.batch_panel import result_layers

    folder = tmp_path / "big"
    folder.mkdir()
    tifffile.imwrite(folder / "slide.tif", blobs((400, 420), [(50, 50), (300, 350)]), tile=(128, 128))
    tifffile.imwrite(folder / "small.tif", blobs((60, 60), [(30, 30)]))
    options = BatchOptions(Actions(ground=("Please segment the nuclei.",)), tile_above=300, tile_size=256,
                           tile_overlap=40)
    batch([str(folder)], tmp_path / "out", options, session=BlobSession())
    found, total = result_layers(tmp_path / "out")
    layers = dict(found)
    assert total == 2
    assert isinstance(layers["slide__ground"], zarr.Array)  # not read into memory on the Qt thread
    assert isinstance(layers["small__ground"], np.ndarray) and layers["small__ground"].max() == 1
    assert np.asarray(layers["slide__ground"][:]).max() == 2


def test_int8_llm_weights_load_quantised_and_change_the_fingerprint(tmp_path, tiny_model_folder, capsys):
    """``llm_weights="int8"`` reaches `Session.load`; it is part of the run's fingerprint (its answers
    differ), while runs in full precision keep the fingerprint they had before the option existed."""
    import hashlib
    from dataclasses import asdict

    from napari_medplib.batch.task import load_session
    from napari_medplib.cli import main

    full, int8 = _options(), _options(llm_weights="int8")
    kept = {k: v for k, v in asdict(full).items() if k not in ("device", "threads", "model", "llm_weights")}
    old = hashlib.blake2b(json.dumps(kept, sort_keys=True, default=str).encode(), digest_size=10).hexdigest()
    assert full.fingerprint() == old != int8.fingerprint()
    with pytest.raises(BatchError, match="full or int8"):
        _options(llm_weights="int4")
    session = load_session(str(tiny_model_folder), "cpu", None, 0, "int8")
    try:
        assert session.fingerprint.endswith("+int8")
    finally:
        session.close()
    folder = _folder(tmp_path)
    code = main(["batch", str(folder), "--out", str(tmp_path / "o"), "--ask", "What is this?",
                 "--server", "http://127.0.0.1:9", "--llm-weights", "int8"])
    assert code == 2 and "server chose its own" in capsys.readouterr().err
