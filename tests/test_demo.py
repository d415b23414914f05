"""`medplib demo`: the bundled model answers about the sample and the labels file is written."""

import csv

import numpy as np
import pytest
import tifffile

from napari_medplib import demo
from napari_medplib.cli import EXIT_BAD_INPUT, main
from napari_medplib.paths import bundled_model_dir

needs_bundled_model = pytest.mark.skipif(
    not (bundled_model_dir() / "model.safetensors").is_file(), reason="no bundled model in this checkout"
)


@needs_bundled_model
def test_headless_demo_prints_the_answer_and_writes_the_labels(tmp_path, capsys):
    out = tmp_path / "demo-out"
    assert main(["demo", "--headless", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Answer: " in printed and demo.QUESTION in printed
    labels = tifffile.imread(out / demo.LABELS_FILE)
    assert labels.shape == demo.sample_image().shape[:2]
    ids = np.unique(labels[labels > 0])
    assert len(ids) >= 5  # the sample holds a few dozen nuclei; the bundled model finds most of them
    with open(out / demo.TABLE_FILE, newline="") as file:
        rows = list(csv.DictReader(file))
    assert sorted(int(row["label"]) for row in rows) == ids.tolist()
    assert f"Wrote {len(ids)} object(s)" in printed

    # the demo replaces its own files on a second run
    assert main(["demo", "--headless", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([demo.LABELS_FILE, demo.TABLE_FILE])


def test_without_a_display_the_demo_runs_headless(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(demo, "has_display", lambda: False)
    monkeypatch.setattr(demo, "run_headless", lambda **options: calls.append(("headless", options)))
    monkeypatch.setattr(demo, "run_napari", lambda **options: calls.append(("napari", options)))
    notes = []
    demo.run_demo(out=tmp_path, echo=notes.append)
    assert [kind for kind, _ in calls] == ["headless"]
    assert notes == ["Running headless: no display."]


def test_with_a_display_and_napari_the_demo_opens_napari(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(demo, "has_display", lambda: True)
    monkeypatch.setattr(demo, "napari_missing", lambda: None)
    monkeypatch.setattr(demo, "run_headless", lambda **options: calls.append("headless"))
    monkeypatch.setattr(demo, "run_napari", lambda **options: calls.append("napari"))
    demo.run_demo(out=tmp_path)
    demo.run_demo(True, out=tmp_path)  # --headless wins over a display
    assert calls == ["napari", "headless"]


def test_without_napari_the_demo_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "has_display", lambda: True)
    monkeypatch.setattr(demo, "napari_missing", lambda: "napari is not installed (pip install 'napari-medplib[all]')")
    monkeypatch.setattr(demo, "run_headless", lambda **options: "headless")
    notes = []
    assert demo.run_demo(out=tmp_path, echo=notes.append) == "headless"
    assert "napari-medplib[all]" in notes[0]


def test_display_detection_on_linux(monkeypatch):
    monkeypatch.setattr(demo.sys, "platform", "linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert not demo.has_display()
    monkeypatch.setenv("DISPLAY", ":99")
    assert demo.has_display()


def test_demo_out_that_is_a_file_is_bad_input(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("keep")
    assert main(["demo", "--headless", "--out", str(taken)]) == EXIT_BAD_INPUT
    assert "--out" in capsys.readouterr().err
    assert taken.read_text() == "keep"


@needs_bundled_model
@pytest.mark.viewer
def test_napari_demo_docks_the_widget_answers_and_saves_the_mask(tmp_path, qapp):
    result = demo.run_napari(out=tmp_path, block=False, echo=lambda line: None)
    viewer = result.viewer
    try:
        assert result.mode == "napari" and result.objects >= 5
        assert any("MedPLIB" in name for name in viewer.window.dock_widgets)
        labels = tifffile.imread(result.labels_path)
        assert labels.shape == demo.sample_image().shape[:2]
        assert len(np.unique(labels[labels > 0])) == result.objects
    finally:
        viewer.close()
